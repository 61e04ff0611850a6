"""Who stored what in the PACS: audit entries for the server's STOW-RS writes.

A write-back happens inside an inference (POST /infer/<task>), which the policy table treats as a
read and does not audit; the RTDOSE / RTSTRUCT it stores in the clinic's PACS is a change to the
clinic's records, and is audited here (action `pacs.store`).

Who asked: MONAI Label calls the app's `infer` hook with the request's parameters only, not the
HTTP request. The infer route (monailabel_app/routes.py) runs the task inside `acting_as(identity)`
with the identity `AuthMiddleware` established; the task runs synchronously in the route's worker
thread, so `CURRENT_IDENTITY` (a context variable) holds that identity when the store happens.
Outside such a route (e.g. MONAI Label's batch inference, audited itself as `batch_infer`) the
user is recorded as "unknown".

Same rule as the middleware: the attempt goes into the write-ahead journal (status 0) before the
STOW-RS request and, if that entry cannot be written, nothing is stored; the outcome (201 stored,
502 refused by the PACS) goes into the trail afterwards. Details are ids only: case id, task,
modality, study / series / SOP instance UIDs, model version.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from diffkt3d.audit import AuditEntry, AuditLog
from monailabel_app.auth import Identity, journal_for

log = logging.getLogger(__name__)

ACTION = "pacs.store"
UNKNOWN_USER = "unknown"
CURRENT_IDENTITY: ContextVar[Identity | None] = ContextVar("diffkt3d_request_identity", default=None)


@contextmanager
def acting_as(identity: Identity | None) -> Iterator[None]:
    """Run the block (an inference) on behalf of `identity`: PACS writes made in it name that user."""
    token = CURRENT_IDENTITY.set(identity)
    try:
        yield
    finally:
        CURRENT_IDENTITY.reset(token)


class PacsWriteAudit:
    """Audit entries of the PACS writes of one inference request.

    Args:
        audit: the server's audit log (the journal is `journal_for(audit)`).
        path: the HTTP request that caused the write, e.g. "/infer/dose".
        identity: who asked (default: `CURRENT_IDENTITY` at construction).
    """

    def __init__(self, audit: AuditLog, path: str, identity: Identity | None = None):
        self.audit, self.path = audit, path
        self.identity = identity if identity is not None else CURRENT_IDENTITY.get()

    def _entry(self, status: int, details: dict[str, Any]) -> AuditEntry:
        who = self.identity
        return AuditEntry(user=who.username if who is not None else UNKNOWN_USER,
                          roles=list(who.roles) if who is not None else [], action=ACTION, method="POST",
                          path=self.path, status=status, details=details)

    def before(self, details: dict[str, Any]) -> str:
        """Journal the attempt; returns the id the outcome repeats. Raises when the journal cannot
        be written (then the caller must not store)."""
        request_id = uuid.uuid4().hex
        journal_for(self.audit).append(self._entry(0, {"stage": "before", "request": request_id, **details}))
        return request_id

    def after(self, request_id: str, status: int, details: dict[str, Any]) -> None:
        """Record the outcome in the trail (in the journal if the trail cannot be written; logged)."""
        entry = self._entry(status, {"request": request_id, **details})
        try:
            self.audit.append(entry)
            return
        except Exception:  # the PACS already holds (or refused) the object: losing the entry must be loud
            log.exception("AUDIT LOG WRITE FAILED for the PACS store %s by %s", details.get("series"), entry.user)
        try:
            journal_for(self.audit).append(entry)
        except Exception:
            log.exception("AUDIT JOURNAL WRITE FAILED for the outcome of the PACS store %s", details.get("series"))
