"""Progress and cancel of a running dose request, and a case download, on a REAL server.

The server runs a random `tiny` model on a 32^3 working grid (about 0.1-0.3 s per sampling step
of two candidates on one CPU thread), so a 30-step request lasts long enough to watch its steps
and a 100-step one long enough to be cancelled in the middle.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import requests
from server_process import start_server, stop_server
from tiny_model import write_tiny_checkpoint

pytestmark = pytest.mark.server

VALIDATION = Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation"
CASE = "pt_201"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (VALIDATION / CASE).is_dir():
        pytest.skip("OpenKBP validation case not available")
    pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
    root = tmp_path_factory.mktemp("jobs")
    shutil.copytree(VALIDATION / CASE, root / "studies" / CASE)
    model = write_tiny_checkpoint(root / "tiny32.pt", grid=32)
    conf = {"model": str(model), "model_dir": str(root / "model"), "state_dir": str(root / "state"),
            "device": "cpu"}
    try:
        proc, url = start_server(root, root / "studies", conf)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url
    stop_server(proc)


class _Request(threading.Thread):
    """POST /infer/dose in the background (the job is watched from the test thread)."""

    def __init__(self, url: str, params: dict):
        super().__init__(daemon=True)
        self.url, self.params = url, params
        self.response: requests.Response | None = None
        self.ended = 0.0

    def run(self) -> None:
        self.response = requests.post(f"{self.url}/infer/dose", params={"image": CASE, "output": "json"},
                                      data={"params": json.dumps(self.params)}, timeout=600)
        self.ended = time.monotonic()


def _job(url: str, job_id: str) -> requests.Response:
    return requests.get(f"{url}/diffkt3d/jobs/{job_id}", timeout=30)


def _watch(url: str, job_id: str, request: _Request, until=lambda state: False) -> list[dict]:
    """Job states read every 0.1 s while the request runs (or until `until(state)`)."""
    states = []
    while request.is_alive():
        r = _job(url, job_id)
        if r.status_code == 200:
            states.append(r.json())
            if until(states[-1]):
                break
        time.sleep(0.1)
    return states


def test_progress_is_reported_per_sampling_step(server):
    job_id = uuid.uuid4().hex
    request = _Request(server, {"steps": 30, "candidates": 2, "job_id": job_id})
    request.start()
    states = _watch(server, job_id, request)
    request.join(600)
    assert request.response is not None and request.response.status_code == 200, request.response.text
    running = [s for s in states if s["state"] == "running"]
    steps = [s["step"] for s in running]
    assert len(set(steps)) >= 3, f"too few distinct steps seen: {steps}"
    assert steps == sorted(steps) and steps[-1] > steps[0]
    assert all(s["total_steps"] == 30 for s in running if s["step"])
    assert all(0.0 <= s["progress"] <= 1.0 for s in running)
    final = _job(server, job_id).json()
    assert final["state"] == "done" and final["step"] == final["total_steps"] == 30 and final["progress"] == 1.0
    # a malformed job id is refused before any work
    r = requests.post(f"{server}/infer/dose", params={"image": CASE, "output": "json"},
                      data={"params": json.dumps({"steps": 1, "job_id": "../x"})}, timeout=120)
    assert r.status_code == 422 and "job_id" in r.json()["detail"]


def test_cancel_stops_the_job_early_and_frees_the_model(server):
    job_id = uuid.uuid4().hex
    request = _Request(server, {"steps": 100, "candidates": 2, "job_id": job_id})
    request.start()
    states = _watch(server, job_id, request, until=lambda s: s["step"] >= 3)
    assert states and states[-1]["step"] >= 3, f"the job never reached step 3: {states[-3:]}"
    per_step_s = max(states[-1]["elapsed_s"], 0.01) / states[-1]["step"]
    cancelled_at = time.monotonic()
    r = requests.delete(f"{server}/diffkt3d/jobs/{job_id}", timeout=30)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    request.join(600)
    answer = request.response
    assert answer is not None and answer.status_code == 409, answer.text
    assert "cancelled" in answer.json()["detail"]
    final = _job(server, job_id).json()
    assert final["state"] == "cancelled" and final["step"] < 50, final
    # stopped early: far sooner than the remaining steps would have taken
    remaining_s = (100 - final["step"]) * per_step_s
    assert request.ended - cancelled_at < max(5.0, 0.5 * remaining_s), (request.ended - cancelled_at, remaining_s)
    # the model is free: a 1-step request right after is answered at once
    t0 = time.monotonic()
    r = requests.post(f"{server}/infer/dose", params={"image": CASE, "output": "json"},
                      data={"params": json.dumps({"steps": 1, "candidates": 1})}, timeout=120)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 60
    # cancelling a finished job changes nothing
    again = requests.delete(f"{server}/diffkt3d/jobs/{job_id}", timeout=30).json()
    assert again["state"] == "cancelled"


def test_unknown_and_malformed_job_ids(server):
    assert _job(server, uuid.uuid4().hex).status_code == 404
    assert requests.delete(f"{server}/diffkt3d/jobs/{uuid.uuid4().hex}", timeout=30).status_code == 404
    assert _job(server, "bad%20id").status_code == 400


def test_case_download_holds_the_case_files(server):
    r = requests.get(f"{server}/diffkt3d/cases/{CASE}", timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        names = set(archive.namelist())
        assert names == {p.name for p in (VALIDATION / CASE).glob("*.nii.gz")}
        assert archive.read("ct.nii.gz") == (VALIDATION / CASE / "ct.nii.gz").read_bytes()
    assert requests.get(f"{server}/diffkt3d/cases/pt_999", timeout=30).status_code == 404
    assert requests.get(f"{server}/diffkt3d/cases/..%2Fsecret", timeout=30).status_code in (400, 404)
