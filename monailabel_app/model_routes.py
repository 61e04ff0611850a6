"""HTTP routes of the model versions (`diffkt3d.models.registry`): list them, promote one.

    GET  /diffkt3d/models                     served pointer + every version (physicist, admin)
    GET  /diffkt3d/models/{version}           one version with its recipe and full validation report
    POST /diffkt3d/models/{version}/promote   serve it from the next request on (admin); rolling back
                                              is promoting an earlier version, `shipped` included

A promotion is audited by AuthMiddleware (`model.promote`, with the version and the one it replaced).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Request

from diffkt3d.models.registry import ModelRegistry, ModelVersion, UnknownVersionError
from monailabel_app.auth import STATE_AUDIT, STATE_IDENTITY, UserDep

MODELS_PATH = "/diffkt3d/models"
# What a listing shows of a version's validation report (the per-case rows are in the version's own record).
SUMMARY_KEYS = ("cases", "reference_version", "decision", "reasons", "candidate_means", "reference_means",
                "paired_mean_difference")


def version_summary(version: ModelVersion, served_id: str) -> dict[str, Any]:
    """A version without its recipe and per-case rows, for listings, `/info/` and the Slicer panel."""
    report = version.validation
    return {"id": version.id, "task": version.task, "parent": version.parent, "created": version.created,
            "digest": version.digest, "served": version.id == served_id, "data": version.data,
            "validation": {k: report.get(k) for k in SUMMARY_KEYS} if report else None}


def served_summary(registry: ModelRegistry) -> dict[str, Any]:
    """The served version, who put it in service and why, and the figures it was accepted on."""
    pointer = registry.served()
    try:
        version = version_summary(registry.get(pointer["version"]), pointer["version"])
    except UnknownVersionError as exc:  # a pointer to a removed folder: say so instead of failing /info/
        version = {"id": pointer["version"], "error": str(exc)}
    return {**version, "since": pointer.get("since"), "by": pointer.get("by"), "reason": pointer.get("reason")}


def model_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter(prefix=MODELS_PATH, tags=["DiffKT3D model versions"])

    @router.get("", summary="Model versions: the served one and every trained one, with their validation")
    def list_versions(user: UserDep) -> dict[str, Any]:
        served = registry.served_id()
        versions = [version_summary(v, served) for v in registry.list()]
        return {"served": served_summary(registry), "versions": versions, "count": len(versions)}

    @router.get("/{version}", summary="One model version with its recipe and full validation report")
    def get_version(version: str, user: UserDep) -> dict[str, Any]:
        try:
            return {**registry.get(version).to_dict(), "served": registry.served_id() == version}
        except UnknownVersionError as exc:
            raise HTTPException(404, str(exc)) from None

    @router.post("/{version}/promote", summary="Serve this version from the next request on (also: roll back)")
    def promote(version: str, request: Request, user: UserDep,
                reason: Annotated[str, Body(embed=True, max_length=500)] = "") -> dict[str, Any]:
        details = getattr(request.state, STATE_AUDIT, {})
        details["version"] = version[:80]
        identity = getattr(request.state, STATE_IDENTITY, None)  # "anonymous" with auth off, as in the audit
        try:
            pointer = registry.promote(version, by=identity.username if identity else user.username, reason=reason or "promoted by an administrator")
        except UnknownVersionError as exc:
            raise HTTPException(404, str(exc)) from None
        details["previous"] = pointer["previous"]
        return {"served": served_summary(registry), "previous": pointer["previous"]}

    return router
