"""POST/GET /diffkt3d/preferences: clinicians' choices between candidate doses (format:
docs/request-format.md §7).

A preference is a training label, so a write is checked for provenance before it is stored: its
case is a datastore case or a session this server served candidates for, and its candidates are
ones the server served for that case (`diffkt3d.preferences.ServedCandidates`) unless the record
says `"external": true`. A client-chosen `record_id` makes the write idempotent: a retry after a
timeout answers 200 with the stored record; the same id with another content is a 409.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, Request, Response

from diffkt3d.preferences import (
    PreferenceRecord,
    PreferenceStore,
    RecordIdConflict,
    ServedCandidates,
    UnknownCaseError,
    UnservedCandidatesError,
)
from monailabel_app.auth import STATE_AUDIT, STATE_IDENTITY, Identity, UserDep

log = logging.getLogger(__name__)

PREFERENCES_PATH = "/diffkt3d/preferences"


@dataclass(frozen=True)
class Provenance:
    """What the server knows about where a preference's case and candidates came from.

    Args:
        served: the served-candidates registry the dose task writes.
        has_case: whether a case id is in the datastore.
    """

    served: ServedCandidates
    has_case: Callable[[str], bool]


def preference_router(store: PreferenceStore, provenance: Provenance, rater_from_token: bool) -> APIRouter:
    """The preference routes.

    Args:
        store: the preference store.
        provenance: checks a record's case and candidates against what the server served.
        rater_from_token: authentication is on: the rater is the logged-in user, whatever the body says.
    """
    router = APIRouter(prefix=PREFERENCES_PATH, tags=["DiffKT3D preferences"])

    @router.post("", status_code=201, summary="Record a clinician's choice between candidate doses")
    def add_preference(request: Request, response: Response, payload: Annotated[Any, Body()],
                       user: UserDep) -> dict[str, Any]:
        audit = getattr(request.state, STATE_AUDIT, {})
        identity: Identity | None = getattr(request.state, STATE_IDENTITY, None)
        if isinstance(payload, dict) and rater_from_token and identity is not None:
            # A label is only worth learning from if we know who gave it: the token says who.
            if payload.get("rater") not in (None, identity.username):
                audit["ignored_body_rater"] = True
            payload = {**payload, "rater": identity.username}
        try:
            record = PreferenceRecord.from_dict(payload, new=True)
        except (ValueError, TypeError) as exc:
            raise HTTPException(status_code=422, detail=f"invalid preference record: {exc}") from None
        try:
            provenance.served.check(record, in_datastore=provenance.has_case(record.case_id))
            stored, created = store.add_once(record)
        except UnknownCaseError as exc:
            raise HTTPException(status_code=404, detail=f"preference refused: {exc}") from None
        except UnservedCandidatesError as exc:
            raise HTTPException(status_code=422, detail=f"preference refused: {exc}") from None
        except RecordIdConflict as exc:
            raise HTTPException(status_code=409, detail=f"preference refused: {exc}") from None
        audit.update(record_id=stored.record_id, case_id=stored.case_id, chosen_id=stored.chosen_id)
        if not created:
            response.status_code = 200
            audit["retry"] = True
            log.info("preference %s was already stored (retry)", stored.record_id)
        else:
            log.info("preference %s stored (case %s, chosen %s)", stored.record_id, stored.case_id,
                     stored.chosen_id)
        return {"record": stored.to_dict()}

    @router.get("", summary="List preference records")
    def list_preferences(user: UserDep, case_id: Annotated[str | None, Query()] = None,
                         rater: Annotated[str | None, Query()] = None) -> dict[str, Any]:
        result = store.read()
        records = [r.to_dict() for r in result.records
                   if (case_id is None or r.case_id == case_id) and (rater is None or r.rater == rater)]
        return {"records": records, "count": len(records),
                "skipped_lines": [{"line": n, "reason": why} for n, why in result.skipped]}

    return router
