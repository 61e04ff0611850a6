"""Running inference jobs: per-step progress a client can read, and cancellation it can ask for.

A client names its request with a `job_id` parameter (its own pseudonymous id, so it can ask about
the job while the POST /infer/ it sent is still waiting for its answer). The task registers the job
here and passes `JobTable.step_hook` to the core sampler, which calls it after every sampling step
(and once more after a full-resolution stage, when the model has one);
the hook records the step and raises `Cancelled` once a client has asked to stop, so the sampler
stops between two steps, the model lock is released and the next request runs. Read and cancelled
through GET / DELETE /diffkt3d/jobs/{job_id} (monailabel_app/job_routes.py). The `dose` and the
`impute_*` tasks share the app's one table, so a client follows any of them the same way (the job's
`task` says which it is).

Anyone who may run inference may read or cancel a job whose id they know: the client draws the id
at random (a UUID), so it is known only to the client that sent the request.

In memory only: a job lives as long as its request plus `keep_s` (so the client can read how it
ended); a server restart forgets them, as it forgets the requests themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from diffkt3d.errors import Cancelled
from diffkt3d.flow.sampler import StepCallback
from diffkt3d.ids import check_id
from infer_tasks.common import TaskError

JOB_ID_KEY = "job_id"
# States, in order: queued (waiting for the model), running (sampling), then one of the last three.
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})


@dataclass
class Job:
    """What a client may read about a job (`to_dict`); `cancel` is the flag the step hook checks."""

    job_id: str
    task: str
    state: str = QUEUED
    step: int = 0
    total_steps: int = 0
    detail: str = ""
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_dict(self) -> dict[str, Any]:
        progress = self.step / self.total_steps if self.total_steps else (1.0 if self.state == DONE else 0.0)
        return {"job_id": self.job_id, "task": self.task, "state": self.state, "step": self.step,
                "total_steps": self.total_steps, "progress": round(progress, 4),
                "cancel_requested": self.cancel.is_set(), "detail": self.detail,
                "elapsed_s": round(self.updated - self.started, 3)}


class JobTable:
    """The server's running (and recently finished) inference jobs.

    Args:
        keep_s: how long a finished job stays readable.
        max_jobs: at most this many jobs are kept (a client cannot fill the memory with ids).
    """

    def __init__(self, keep_s: float = 600.0, max_jobs: int = 1000):
        self.keep_s = keep_s
        self.max_jobs = max_jobs
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._evict()
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop at its next sampling step (a finished job is left as it ended)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state not in FINISHED:
                job.cancel.set()
                job.detail = "cancel requested"
                job.updated = time.time()
            return job

    @contextmanager
    def track(self, request: dict[str, Any], task: str) -> Iterator[Job | None]:
        """Register the request's job (None when the client sent no `job_id`) for the `with` body.

        The job ends `done`, `cancelled` (the body raised `Cancelled`) or `failed` (anything else).

        Raises:
            TaskError: 422 for a malformed id, 409 when a job of that id is still running.
        """
        job_id = request.get(JOB_ID_KEY)
        if job_id is None:
            yield None
            return
        try:
            check_id(job_id, f"parameter {JOB_ID_KEY!r}")
        except ValueError as exc:
            raise TaskError(422, str(exc)) from None
        with self._lock:
            self._evict()
            old = self._jobs.get(job_id)
            if old is not None and old.state not in FINISHED:
                raise TaskError(409, f"job {job_id!r} is already running; send a new job_id per request")
            if len(self._jobs) >= self.max_jobs:
                raise TaskError(503, f"too many jobs ({self.max_jobs}) on the server; retry later")
            job = self._jobs[job_id] = Job(job_id, task)
        try:
            yield job
        except Cancelled:
            self._finish(job, CANCELLED, f"cancelled after step {job.step} of {job.total_steps}")
            raise TaskError(409, f"job {job_id!r} was cancelled by the client after step {job.step} of "
                                 f"{job.total_steps}; nothing was stored") from None
        except BaseException as exc:
            self._finish(job, FAILED, type(exc).__name__)
            raise
        self._finish(job, DONE, "")

    @staticmethod
    def start(job: Job | None) -> None:
        """The job got the model: from `queued` to `running` (or stop now if cancelled meanwhile)."""
        if job is None:
            return
        if job.cancel.is_set():
            raise Cancelled(f"job {job.job_id} cancelled before it started")
        job.state, job.updated = RUNNING, time.time()

    @staticmethod
    def step_hook(job: Job | None) -> StepCallback | None:
        """The core sampler's `on_step` for this job: record the step, stop if cancelled."""
        if job is None:
            return None

        def on_step(done: int, total: int) -> None:
            job.step, job.total_steps, job.updated = done, total, time.time()
            if job.cancel.is_set():
                raise Cancelled(f"job {job.job_id} cancelled at step {done} of {total}")

        return on_step

    def _finish(self, job: Job, state: str, detail: str) -> None:
        with self._lock:
            job.state, job.detail, job.updated = state, detail, time.time()

    def _evict(self) -> None:
        now = time.time()
        for jid in [j for j, job in self._jobs.items() if job.state in FINISHED and now - job.updated > self.keep_s]:
            del self._jobs[jid]
