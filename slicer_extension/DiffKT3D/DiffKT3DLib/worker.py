"""Network work off the GUI thread.

The GUI (Qt, MRML) must only be touched from the main thread, and a hung server must never
freeze Slicer (the stock MONAI Label plugin calls HTTP on the GUI thread without timeouts).
So a request runs as a *job* in a worker thread; the job reports progress and its result
through a queue, and the main thread calls `Runner.poll()` (from a QTimer in Slicer, from a
loop in tests) which runs the callbacks there.

`Runner` is a small Protocol so the module's logic takes any runner: `ThreadRunner` in Slicer and
in the threading tests, `InlineRunner` (runs the job at submit time) for scripted tests.

Cancel: a cancelled job's callbacks are replaced by `on_cancel` at the next poll and its late
result is dropped. The job itself sees `ctx.cancelled` and stops at its next check (the client
checks between download chunks); an HTTP call already waiting ends at its own timeout.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside a job by `JobContext.check_cancelled()` once the user cancelled it."""


class JobContext:
    """Handed to a job function: cancellation flag and progress reporting (thread-safe)."""

    def __init__(self, job: Job, events: queue.Queue):
        self._job = job
        self._events = events

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelled(f"{self._job.description} was cancelled")

    def progress(self, fraction: float | None, message: str = "") -> None:
        """Report progress: fraction in [0, 1] (None = unknown) and a short message."""
        self._events.put((self._job, "progress", (fraction, message)))


@dataclass
class Job:
    """One submitted piece of work and its callbacks (all called on the polling thread)."""

    id: int
    description: str
    fn: Callable[[JobContext], Any]
    on_done: Callable[[Any], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    on_progress: Callable[[float | None, str], None] | None = None
    on_cancel: Callable[[], None] | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    state: str = "pending"  # pending, running, done, failed, cancelled
    submitted_s: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class Runner(Protocol):
    """What the module logic needs from a job runner."""

    def submit(self, fn: Callable[[JobContext], Any], *, description: str = "",
               on_done: Callable[[Any], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None,
               on_progress: Callable[[float | None, str], None] | None = None,
               on_cancel: Callable[[], None] | None = None) -> Job: ...

    def poll(self) -> int: ...

    def cancel(self, job: Job) -> None: ...

    @property
    def busy(self) -> bool: ...


class _QueueRunner:
    """Shared bookkeeping: the event queue and the main-thread dispatch."""

    def __init__(self) -> None:
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._active: dict[int, Job] = {}

    def _new_job(self, fn, description, on_done, on_error, on_progress, on_cancel) -> Job:
        job = Job(id=next(self._ids), description=description or getattr(fn, "__name__", "job"), fn=fn,
                  on_done=on_done, on_error=on_error, on_progress=on_progress, on_cancel=on_cancel)
        self._active[job.id] = job
        return job

    def _run(self, job: Job) -> None:
        """Body of a job; runs in the worker thread (ThreadRunner) or inline."""
        ctx = JobContext(job, self._events)
        job.state = "running"
        try:
            ctx.check_cancelled()
            result = job.fn(ctx)
        except JobCancelled:
            self._events.put((job, "cancelled", None))
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the GUI, not the log only
            self._events.put((job, "error", exc))
        else:
            self._events.put((job, "done", result))

    def cancel(self, job: Job) -> None:
        """Cancel now: `on_cancel` runs at the next poll; a late result or error is dropped."""
        if job.finished:
            return
        job.cancel()
        self._events.put((job, "cancelled", None))

    def cancel_all(self) -> None:
        for job in list(self._active.values()):
            self.cancel(job)

    @property
    def busy(self) -> bool:
        return bool(self._active)

    def poll(self) -> int:
        """Run pending callbacks on the calling thread (the GUI thread). Never blocks.

        Returns:
            the number of events handled.
        """
        handled = 0
        while True:
            try:
                job, kind, payload = self._events.get_nowait()
            except queue.Empty:
                return handled
            handled += 1
            if job.finished:
                continue  # e.g. the result of a job cancelled earlier
            if kind == "progress":
                if job.on_progress is not None and not job.cancel_event.is_set():
                    job.on_progress(*payload)
                continue
            self._active.pop(job.id, None)
            if kind == "cancelled" or job.cancel_event.is_set():
                job.state = "cancelled"
                logger.info("%s cancelled", job.description)
                if job.on_cancel is not None:
                    job.on_cancel()
            elif kind == "error":
                job.state = "failed"
                logger.warning("%s failed: %s", job.description, payload)
                if job.on_error is not None:
                    job.on_error(payload)
            else:
                job.state = "done"
                if job.on_done is not None:
                    try:
                        job.on_done(payload)
                    except Exception as exc:  # noqa: BLE001 - e.g. a result the scene cannot load
                        job.state = "failed"
                        logger.warning("%s: handling the result failed: %s", job.description, exc)
                        if job.on_error is None:
                            raise
                        job.on_error(exc)


class ThreadRunner(_QueueRunner):
    """Jobs run on a fixed set of daemon worker threads started up front.

    Threads are started in the constructor (module set-up), so `submit` only puts the job on a
    queue: it never waits for a thread to start, which can take long on a loaded machine.
    Several workers let a quick call (preference, info) run while a long dose request and a
    preview are in flight.

    Args:
        workers: number of worker threads.
    """

    def __init__(self, workers: int = 4):
        super().__init__()
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._jobs: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work_loop, name=f"DiffKT3D-worker-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:  # shutdown
                return
            if job.cancel_event.is_set():  # cancelled while queued: never started
                continue
            self._run(job)

    def submit(self, fn, *, description="", on_done=None, on_error=None, on_progress=None,
               on_cancel=None) -> Job:
        job = self._new_job(fn, description, on_done, on_error, on_progress, on_cancel)
        self._jobs.put(job)
        return job

    def shutdown(self) -> None:
        """Cancel everything and let the workers exit (a running HTTP call ends at its timeout)."""
        self.cancel_all()
        for _ in self._threads:
            self._jobs.put(None)


class InlineRunner(_QueueRunner):
    """Runs the job synchronously inside `submit`; callbacks still wait for `poll()`.

    For scripted use and tests where blocking is fine (never in the GUI).
    """

    def submit(self, fn, *, description="", on_done=None, on_error=None, on_progress=None,
               on_cancel=None) -> Job:
        job = self._new_job(fn, description, on_done, on_error, on_progress, on_cancel)
        self._run(job)
        return job


def wait_for(runner: Runner, job: Job, timeout_s: float, tick: Callable[[], None] | None = None,
             interval_s: float = 0.01) -> None:
    """Poll `runner` until `job` finished (tests and the module's self-test; not for the GUI).

    Raises:
        TimeoutError: the job did not finish in `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while not job.finished:
        runner.poll()
        if tick is not None:
            tick()
        if job.finished:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{job.description} did not finish within {timeout_s:.0f} s")
        time.sleep(interval_s)
