"""The job table of running inferences: states, the step hook, cancel before and during sampling."""

from __future__ import annotations

import pytest

from diffkt3d.errors import Cancelled
from infer_tasks.common import TaskError
from infer_tasks.jobs import CANCELLED, DONE, FAILED, RUNNING, JobTable


def test_no_job_id_means_no_job():
    jobs = JobTable()
    with jobs.track({}, "dose") as job:
        assert job is None
    assert JobTable.step_hook(None) is None
    JobTable.start(None)


def test_a_job_runs_reports_steps_and_ends_done():
    jobs = JobTable()
    with jobs.track({"job_id": "j1"}, "dose") as job:
        assert jobs.get("j1").to_dict()["state"] == "queued"
        JobTable.start(job)
        hook = JobTable.step_hook(job)
        hook(1, 4)
        hook(2, 4)
        seen = jobs.get("j1").to_dict()
        assert seen["state"] == RUNNING and seen["step"] == 2 and seen["progress"] == 0.5
    assert jobs.get("j1").to_dict()["state"] == DONE


def test_cancel_during_sampling_stops_at_the_next_step_and_answers_409():
    jobs = JobTable()
    with pytest.raises(TaskError) as err, jobs.track({"job_id": "j2"}, "dose") as job:
        JobTable.start(job)
        hook = JobTable.step_hook(job)
        hook(1, 10)
        jobs.cancel("j2")
        hook(2, 10)  # raises Cancelled
        pytest.fail("the hook did not stop a cancelled job")
    assert err.value.status == 409 and "cancelled" in str(err.value) and "step 2 of 10" in str(err.value)
    assert jobs.get("j2").state == CANCELLED


def test_cancel_while_queued_never_starts():
    jobs = JobTable()
    with pytest.raises(TaskError), jobs.track({"job_id": "j3"}, "dose") as job:
        jobs.cancel("j3")
        JobTable.start(job)
    assert jobs.get("j3").state == CANCELLED and jobs.get("j3").step == 0


def test_failure_is_recorded_and_reraised():
    jobs = JobTable()
    with pytest.raises(RuntimeError), jobs.track({"job_id": "j4"}, "dose"):
        raise RuntimeError("model broke")
    assert jobs.get("j4").state == FAILED


def test_bad_or_running_ids_are_refused_and_finished_jobs_expire():
    jobs = JobTable(keep_s=0.0, max_jobs=2)
    with pytest.raises(TaskError) as err, jobs.track({"job_id": "../etc"}, "dose"):
        pass
    assert err.value.status == 422
    with jobs.track({"job_id": "a"}, "dose"):
        with pytest.raises(TaskError) as err, jobs.track({"job_id": "a"}, "dose"):
            pass
        assert err.value.status == 409
    assert jobs.get("a") is None  # keep_s = 0: gone once finished
    assert jobs.cancel("unknown") is None



def test_the_hook_raises_the_core_cancelled_error():
    """The core's `Cancelled` is what stops the sampler; `track` turns it into the 409 answer."""
    jobs = JobTable()
    with pytest.raises(TaskError), jobs.track({"job_id": "x"}, "dose") as job:
        job.cancel.set()
        with pytest.raises(Cancelled):
            JobTable.step_hook(job)(1, 1)
        raise Cancelled("propagated")
