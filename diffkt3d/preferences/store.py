"""Append-only, durable store of preference records (one JSON object per line).

Preference labels are expensive clinician time, so the store must never lose an accepted record
and never show a half-written one. Why JSONL with these rules rather than one file per record:

* One append = one `os.write` of the whole line on a file opened with `O_APPEND`, followed by
  `fsync` before the caller is told "stored". The kernel positions every `O_APPEND` write at the
  end of file atomically, and a process killed with SIGKILL cannot stop in the middle of a
  regular-file `write` it has entered: either the line is there or it is not.
* Writers also take an inter-process file lock (`filelock`, works across processes and on every
  OS), so concurrent appends never interleave even on file systems where O_APPEND is weaker
  (NFS), and the torn-tail repair below is race-free.
* A power loss or a full disk can still leave a torn last line. The reader skips (and reports) any
  line that is not a complete, valid record; a writer that finds the file not ending in a newline
  first writes a newline, so the next record never glues onto the torn one. Earlier records are
  never rewritten, so they cannot be lost by a later append.
* One file per record would need a directory fsync per record and an index to list them in order;
  JSONL gives order for free, one fsync per record, and is trivial to back up or read elsewhere.

The write path is `diffkt3d.jsonl` (shared with the audit log).

Layout: `<root>/preferences.jsonl`, lock file `<root>/preferences.jsonl.lock`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from diffkt3d.jsonl import append_json_line, iter_json_lines
from diffkt3d.preferences.record import PreferenceRecord

log = logging.getLogger(__name__)

STORE_FILE = "preferences.jsonl"


class RecordIdConflict(ValueError):
    """A record id reused for a different record (HTTP 409 on the server)."""


@dataclass
class ReadResult:
    """Records read from the store, plus the lines that were skipped and why.

    Args:
        records: valid records in append order.
        skipped: (1-based line number, reason) for each unreadable line (e.g. a torn last line).
    """

    records: list[PreferenceRecord] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


class PreferenceStore:
    """Append-only preference store in a directory.

    Args:
        root: directory holding the store (created if missing).
        lock_timeout_s: how long a writer waits for the lock before giving up (TimeoutError).
    """

    def __init__(self, root: str | Path, lock_timeout_s: float = 30.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / STORE_FILE
        self._lock = FileLock(str(self.path) + ".lock", timeout=lock_timeout_s)

    def append(self, record: PreferenceRecord) -> PreferenceRecord:
        """Durably append one record; returns it once it is on disk (after fsync)."""
        append_json_line(self.path, self._lock, record.to_dict())
        return record

    def add_once(self, record: PreferenceRecord) -> tuple[PreferenceRecord, bool]:
        """Append `record` unless its `record_id` is stored: a client retrying after a timeout must
        not label the same choice twice.

        Returns:
            (the stored record, True if it was appended now / False if it was already there).
        Raises:
            RecordIdConflict: the id is stored with a different content.
        """
        with self._lock:  # reentrant: the lookup and the append are one step for other writers
            for stored in self.read().records:
                if stored.record_id == record.record_id:
                    if stored.same_choice(record):
                        return stored, False
                    raise RecordIdConflict(f"record_id {record.record_id!r} is already stored with a different "
                                           "content; a new choice needs a new record_id")
            self.append(record)
        return record, True

    def read(self) -> ReadResult:
        """All complete, valid records in append order; torn or invalid lines are skipped and listed."""
        out = ReadResult()
        for no, raw, is_last_unterminated in iter_json_lines(self.path):
            try:
                out.records.append(PreferenceRecord.from_dict(json.loads(raw)))
            except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                reason = ("torn last line (no newline)" if is_last_unterminated else "invalid record") + f": {exc}"
                out.skipped.append((no, reason))
                log.warning("preference store %s line %d skipped: %s", self.path, no, reason)
                continue
            if is_last_unterminated:
                # A complete JSON object without its newline: the write finished but for the final
                # byte, which a single write cannot do; keep it (it parsed) but report it.
                out.skipped.append((no, "valid record without trailing newline (kept)"))
        return out

    def query(self, case_id: str | None = None, rater: str | None = None) -> list[PreferenceRecord]:
        """Records filtered by case and/or rater, in append order."""
        return [r for r in self.read().records
                if (case_id is None or r.case_id == case_id) and (rater is None or r.rater == rater)]

    def labelled_cases(self, rater: str | None = None) -> set[str]:
        """Case ids that have at least one record (by `rater`, when given)."""
        return {r.case_id for r in self.query(rater=rater)}
