"""PacsWriteAudit (monailabel_app/pacs_audit.py) on a real audit log: the user comes from the request
context, the attempt is journalled before the outcome is recorded, and an outcome the trail cannot
take goes to the journal instead of being lost."""

from __future__ import annotations

import pytest

pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
from diffkt3d.audit import AuditLog
from monailabel_app.auth import Identity, journal_for
from monailabel_app.pacs_audit import ACTION, UNKNOWN_USER, PacsWriteAudit, acting_as

DETAILS = {"case_id": "1.2.3", "task": "dose", "modality": "RTDOSE", "series": "1.2.3.4", "sop_instance": "1.2.3.5",
           "model_version": "m@1"}


def test_the_requesting_user_is_recorded_before_and_after(tmp_path):
    audit = AuditLog(tmp_path / "audit")
    with acting_as(Identity("dr.smith", ("clinician",))):
        writes = PacsWriteAudit(audit, "/infer/dose")
    request_id = writes.before(DETAILS)
    writes.after(request_id, 201, DETAILS)
    [before], _ = journal_for(audit).read(action=ACTION)
    [after], _ = audit.read(action=ACTION)
    assert (before.user, before.status, before.details["stage"]) == ("dr.smith", 0, "before")
    assert (after.user, after.roles, after.status, after.path) == ("dr.smith", ["clinician"], 201, "/infer/dose")
    assert after.details == {"request": request_id, **DETAILS} and before.details["request"] == request_id


def test_outside_a_request_the_user_is_unknown(tmp_path):
    audit = AuditLog(tmp_path / "audit")
    writes = PacsWriteAudit(audit, "/batch/infer")
    writes.after(writes.before(DETAILS), 502, {**DETAILS, "reason": "refused"})
    [entry], _ = audit.read(action=ACTION)
    assert (entry.user, entry.roles, entry.status, entry.details["reason"]) == (UNKNOWN_USER, [], 502, "refused")


def test_an_outcome_the_trail_cannot_take_goes_to_the_journal(tmp_path):
    audit = AuditLog(tmp_path / "audit")
    writes = PacsWriteAudit(audit, "/infer/dose", Identity("phys.jones", ("physicist",)))
    request_id = writes.before(DETAILS)
    audit.path.mkdir()  # the trail's file cannot be opened for appending
    writes.after(request_id, 201, DETAILS)
    entries, _ = journal_for(audit).read(action=ACTION)
    assert [(e.status, e.details["request"]) for e in entries] == [(0, request_id), (201, request_id)]


def test_the_journal_failing_stops_the_write(tmp_path):
    audit = AuditLog(tmp_path / "audit")
    (audit.root / "journal").write_text("not a directory")
    with pytest.raises(OSError):
        PacsWriteAudit(audit, "/infer/dose").before(DETAILS)
