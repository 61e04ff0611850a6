"""The client's calls about long-running work: inference jobs, datastore cases, training runs.

Split from client.py (request plumbing, login, inference, preferences) to keep both readable;
`DiffKT3DClient` inherits these methods, so callers hold one client object.

* Inference jobs: a dose or imputation request carries a random `job_id`; while the POST waits for its answer,
  `follow_job` polls `GET /diffkt3d/jobs/{id}` from a second thread and turns the sampling step
  into progress, and once the user cancels it sends `DELETE /diffkt3d/jobs/{id}`: the server stops
  between two sampling steps and answers the POST with 409, so the model is free for the next
  request instead of finishing work nobody waits for.
* Cases: `GET /diffkt3d/cases/{id}` (a zip of the case folder) for "Next case".
* Training: MONAI Label's `POST /train/{task}`, `GET /train/` and `DELETE /train/`.
"""

from __future__ import annotations

import io
import logging
import threading
import urllib.parse
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .constants import CASE_DOWNLOAD_TIMEOUT_S, JOB_POLL_INTERVAL_S

logger = logging.getLogger(__name__)

JOBS_PATH = "/diffkt3d/jobs"
CASES_PATH = "/diffkt3d/cases"


def new_job_id() -> str:
    """A random job id: whoever knows it may read and cancel the job, so it must not be guessable."""
    return uuid.uuid4().hex


class JobCalls:
    """Mixin of `DiffKT3DClient`; uses its `_call` / `_json`."""

    job_poll_interval_s: float = JOB_POLL_INTERVAL_S  # how often `follow_job` reads a running job

    # -- inference jobs --------------------------------------------------------------------------
    def job_status(self, job_id: str) -> dict[str, Any]:
        """`GET /diffkt3d/jobs/{id}`: state, step, total_steps, progress (0-1) of a running inference."""
        path = f"{JOBS_PATH}/{urllib.parse.quote(job_id)}"
        return self._json(self._call("GET", path), path) or {}

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """`DELETE /diffkt3d/jobs/{id}`: the server stops the job at its next sampling step."""
        path = f"{JOBS_PATH}/{urllib.parse.quote(job_id)}"
        return self._json(self._call("DELETE", path), path) or {}

    @contextmanager
    def follow_job(self, job_id: str, ctx, span: tuple[float, float] = (0.2, 0.6), label: str = "sampling",
                   interval_s: float | None = None) -> Iterator[list[dict[str, Any]]]:
        """Report a server job's step progress to `ctx` while the `with` body (the POST) runs, and
        cancel it on the server once `ctx.cancelled`.

        Args:
            ctx: the worker job's context (`progress`, `cancelled`).
            span: the progress bar's range the sampling steps fill.
            interval_s: seconds between two reads (default: the client's `job_poll_interval_s`).
        Yields:
            the list of job states read so far (tests check the steps grow).
        """
        seen: list[dict[str, Any]] = []
        stop = threading.Event()
        interval_s = interval_s or self.job_poll_interval_s

        def watch() -> None:
            cancel_sent = False
            while not stop.wait(interval_s):
                try:
                    if ctx.cancelled and not cancel_sent:
                        # Sent again until it lands: before the server has registered the job (the
                        # POST still queued behind another request) the DELETE finds no job (404).
                        seen.append(self.cancel_job(job_id))
                        cancel_sent = True
                        ctx.progress(None, "cancelling on the server")
                        continue
                    status = self.job_status(job_id)
                except Exception as exc:  # noqa: BLE001 - 404 before the job starts, a busy server ...
                    logger.debug("job %s: %s", job_id, exc)
                    continue
                seen.append(status)
                total = int(status.get("total_steps") or 0)
                if total and not cancel_sent:
                    step = int(status.get("step") or 0)
                    ctx.progress(span[0] + (span[1] - span[0]) * step / total, f"{label}: step {step} of {total}")

        thread = threading.Thread(target=watch, name=f"DiffKT3D-job-{job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            stop.set()
            thread.join(timeout=interval_s + 1.0)

    # -- datastore cases ---------------------------------------------------------------------------
    def download_case(self, case_id: str, out_dir: str | Path) -> Path:
        """`GET /diffkt3d/cases/{id}`: the case's images (CT, structures, dose if any, plan.json)
        unpacked into `out_dir / case_id`; returns that folder."""
        path = f"{CASES_PATH}/{urllib.parse.quote(case_id)}"
        resp = self._call("GET", path, read_timeout_s=CASE_DOWNLOAD_TIMEOUT_S)
        folder = Path(out_dir) / Path(case_id).name
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(resp.body)) as archive:
            for member in archive.infolist():
                name = Path(member.filename).name  # never a path from the server
                if name and not member.is_dir():
                    (folder / name).write_bytes(archive.read(member))
        return folder

    # -- training ------------------------------------------------------------------------------------
    def start_training(self, task: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """`POST /train/{task}` (physicist / admin when the server has logins)."""
        path = f"/train/{urllib.parse.quote(task)}"
        return self._json(self._call("POST", path, json_body=params or {}), path) or {}

    def training_status(self) -> dict[str, Any]:
        """`GET /train/`: the latest training run (status, details lines with loss and validation)."""
        return self._json(self._call("GET", "/train/"), "/train/") or {}

    def stop_training(self) -> dict[str, Any]:
        """`DELETE /train/`: stop the running training."""
        return self._json(self._call("DELETE", "/train/"), "/train/") or {}
