"""Append-only audit trail: who did what, when, with what outcome (preference records, training
runs, model and data changes).

Same durability as the preference store (`diffkt3d.jsonl`: one fsynced O_APPEND line per entry
under a file lock; a torn last line is skipped by readers, never glued onto). Entries carry ids
(user name, case id, record id, task name), never patient names or file names.

Layout: `<root>/audit.jsonl`, lock file `<root>/audit.jsonl.lock`. One entry:

    {"time": "2026-11-22T05:01:02.345678+00:00", "user": "dr.smith", "roles": ["clinician"],
     "action": "preference.record", "method": "POST", "path": "/diffkt3d/preferences",
     "status": 201, "details": {"record_id": "...", "case_id": "pt_201"}}
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from diffkt3d.jsonl import append_json_line, iter_json_lines

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"


@dataclass
class AuditEntry:
    """One audited request.

    Args:
        user: authenticated user name ("anonymous" when authentication is off or failed).
        roles: the user's DiffKT3D roles (clinician / physicist / admin).
        action: what was attempted, e.g. "preference.record", "train.start", "model.upload".
        method, path: the HTTP request (path without query string).
        status: HTTP status of the answer (401/403 entries record refused attempts).
        details: ids that say what was touched (case id, record id, task name).
        time: ISO 8601 UTC; filled in when not given.
    """

    user: str
    roles: list[str]
    action: str
    method: str
    path: str
    status: int
    details: dict[str, Any] = field(default_factory=dict)
    time: str = ""

    def __post_init__(self) -> None:
        if not self.time:
            self.time = datetime.now(timezone.utc).isoformat()

    @classmethod
    def from_dict(cls, d: Any) -> AuditEntry:
        if not isinstance(d, dict):
            raise ValueError("audit entry must be a JSON object")
        missing = sorted({"user", "roles", "action", "method", "path", "status", "time"} - set(d))
        if missing:
            raise ValueError(f"audit entry is missing {missing}")
        return cls(user=str(d["user"]), roles=[str(r) for r in d["roles"]], action=str(d["action"]),
                   method=str(d["method"]), path=str(d["path"]), status=int(d["status"]),
                   details=dict(d.get("details") or {}), time=str(d["time"]))


class AuditLog:
    """Append-only audit log in a directory.

    Args:
        root: directory holding the log (created if missing).
        lock_timeout_s: how long a writer waits for the lock (filelock.Timeout after that).
    """

    def __init__(self, root: str | Path, lock_timeout_s: float = 30.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / AUDIT_FILE
        self._lock = FileLock(str(self.path) + ".lock", timeout=lock_timeout_s)

    def append(self, entry: AuditEntry) -> AuditEntry:
        """Durably append one entry (returns after fsync)."""
        append_json_line(self.path, self._lock, asdict(entry))
        return entry

    def read(self, user: str | None = None, action: str | None = None) -> tuple[list[AuditEntry], list[int]]:
        """(entries in append order, filtered by user / action prefix; line numbers skipped as unreadable)."""
        entries, skipped = [], []
        for no, raw, _ in iter_json_lines(self.path):
            try:
                entry = AuditEntry.from_dict(json.loads(raw))
            except (ValueError, TypeError) as exc:
                log.warning("audit log %s line %d skipped: %s", self.path, no, exc)
                skipped.append(no)
                continue
            if (user is None or entry.user == user) and (action is None or entry.action.startswith(action)):
                entries.append(entry)
        return entries, skipped


def model_validated(task: str, version: str, run_dir: Path, report: dict[str, Any]) -> AuditEntry:
    """Entry for a trained candidate's validation (action `model.validate`): its version, the model
    it was compared with, the decision, its reasons and the mean figures.

    The run itself has no user (it is a subprocess); who started it is the `train.start` entry
    before it.
    """
    return AuditEntry(user="training-run", roles=[], action="model.validate", method="TRAIN",
                      path=f"/train/{task}", status=200,
                      details={"task": task, "version": version, "run": run_dir.name,
                               "reference": report.get("reference_version"), "decision": report.get("decision"),
                               "reasons": report.get("reasons"), "cases": report.get("cases"),
                               "candidate_means": report.get("candidate_means"),
                               "reference_means": report.get("reference_means")})


def model_promoted(task: str, pointer: dict[str, Any]) -> AuditEntry:
    """Entry for a version the validation rule put in service (action `model.promote`); an
    administrator's promotion is audited from its request instead."""
    return AuditEntry(user="training-run", roles=[], action="model.promote", method="TRAIN",
                      path=f"/train/{task}", status=200,
                      details={"version": pointer["version"], "previous": pointer["previous"],
                               "reason": pointer["reason"]})
