"""GET / DELETE /diffkt3d/jobs/{job_id}: progress of a running inference, and cancelling it.

The job table is infer_tasks/jobs.py, one per app; a dose or imputation request joins it by sending a
`job_id` parameter.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from diffkt3d.ids import check_id
from infer_tasks.jobs import Job, JobTable
from monailabel_app.auth import UserDep

JOBS_PATH = "/diffkt3d/jobs"


def _known(jobs: JobTable, job_id: str, job: Job | None) -> Job:
    try:
        check_id(job_id, "job id")
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} on this server (not started yet, or finished more than "
                                 f"{jobs.keep_s:.0f} s ago)")
    return job


def job_router(jobs: JobTable) -> APIRouter:
    router = APIRouter(prefix=JOBS_PATH, tags=["DiffKT3D jobs"])

    @router.get("/{job_id}", summary="Progress of an inference job (sampling step of the total)")
    def read_job(job_id: str, user: UserDep) -> dict[str, Any]:
        return _known(jobs, job_id, jobs.get(job_id)).to_dict()

    @router.delete("/{job_id}", summary="Cancel an inference job: it stops at its next sampling step")
    def cancel_job(job_id: str, user: UserDep) -> dict[str, Any]:
        return _known(jobs, job_id, jobs.cancel(job_id)).to_dict()

    return router
