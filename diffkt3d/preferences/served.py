"""Which candidate doses the server handed out for which case: the provenance a preference needs.

A preference is a label ScardNFT learns from, so it must be about candidates this server actually
produced for that case; otherwise any client could post made-up choices for made-up cases. The
dose task appends one line per multi-candidate answer (case id, request id, candidate ids) to
`<store root>/served_candidates.jsonl`, next to the preference store and with its durability rules
(`diffkt3d.jsonl`). Candidates made elsewhere (another planning system, an older server) are
accepted only when the record says so (`"external": true`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from filelock import FileLock

from diffkt3d.jsonl import append_json_line, iter_json_lines
from diffkt3d.preferences.record import PreferenceRecord

log = logging.getLogger(__name__)

SERVED_FILE = "served_candidates.jsonl"


class UnknownCaseError(LookupError):
    """The record's case is neither in the datastore nor a case the server served candidates for."""


class UnservedCandidatesError(ValueError):
    """The record names candidates the server never served for its case (and is not `external`)."""


class ServedCandidates:
    """Append-only registry of the candidate ids served per case.

    Args:
        root: directory (the preference store's root).
        lock_timeout_s: how long a writer waits for the lock.
    """

    def __init__(self, root: str | Path, lock_timeout_s: float = 30.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / SERVED_FILE
        self._lock = FileLock(str(self.path) + ".lock", timeout=lock_timeout_s)

    def add(self, case_id: str, request_id: str, candidate_ids: list[str]) -> None:
        """Durably record that `candidate_ids` were served for `case_id` in request `request_id`."""
        append_json_line(self.path, self._lock, {"case_id": case_id, "request_id": request_id,
                                                 "candidates": list(candidate_ids)})

    def served_ids(self, case_id: str) -> set[str] | None:
        """Candidate ids served for `case_id` over all requests; None when none ever were."""
        found: set[str] | None = None
        for no, raw, _ in iter_json_lines(self.path):
            try:
                entry = json.loads(raw)
                if entry["case_id"] == case_id:
                    found = (found or set()) | {str(c) for c in entry["candidates"]}
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s line %d skipped: %s", self.path, no, exc)
        return found

    def check(self, record: PreferenceRecord, in_datastore: bool) -> None:
        """Refuse a record whose case or candidates this server cannot vouch for.

        Args:
            record: the incoming record.
            in_datastore: its case is a datastore case (a session case is known from this registry).
        Raises:
            UnknownCaseError: the case is not in the datastore and no candidates were served for it.
            UnservedCandidatesError: candidates not served for the case, and the record is not external.
        """
        served = self.served_ids(record.case_id)
        if not in_datastore and served is None:
            raise UnknownCaseError(f"case {record.case_id!r} is not in the datastore and this server never "
                                   "served candidates for a session of that name")
        if record.external:
            return
        unserved = [c.id for c in record.candidates if c.id not in (served or set())]
        if unserved:
            raise UnservedCandidatesError(
                f"candidates {unserved} were never served for case {record.case_id!r} by this server "
                f"(served: {sorted(served or [])}); a record about candidates made elsewhere must say "
                "\"external\": true")
