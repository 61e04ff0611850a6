"""Progress and cancel of a running dose or imputation request, and a case download, on a REAL server.

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
    """POST /infer/{task} in the background (the job is watched from the test thread)."""

    def __init__(self, url: str, params: dict, task: str = "dose"):
        super().__init__(daemon=True)
        self.url, self.params, self.task = url, params, task
        self.response: requests.Response | None = None
        self.ended = 0.0

    def run(self) -> None:
        self.response = requests.post(f"{self.url}/infer/{self.task}", params={"image": CASE, "output": "json"},
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


def test_imputation_progress_is_reported_per_sampling_step(server):
    job_id = uuid.uuid4().hex
    request = _Request(server, {"steps": 40, "job_id": job_id}, task="impute_oar")
    request.start()
    states = _watch(server, job_id, request)
    request.join(600)
    assert request.response is not None and request.response.status_code == 200, request.response.text
    running = [s for s in states if s["state"] == "running"]
    steps = [s["step"] for s in running]
    assert len(set(steps)) >= 3, f"too few distinct steps seen: {steps}"
    assert steps == sorted(steps) and steps[-1] > steps[0]
    assert all(s["total_steps"] == 40 and s["task"] == "impute_oar" for s in running if s["step"])
    final = _job(server, job_id).json()
    assert final["state"] == "done" and final["step"] == final["total_steps"] == 40 and final["progress"] == 1.0
    # the job id is refused as a dose request's is: malformed, or reused while its job runs
    r = requests.post(f"{server}/infer/impute_ct", params={"image": CASE, "output": "json"},
                      data={"params": json.dumps({"steps": 1, "job_id": "../x"})}, timeout=120)
    assert r.status_code == 422 and "job_id" in r.json()["detail"]


def test_a_cancelled_imputation_stops_early_and_frees_the_model(server):
    job_id = uuid.uuid4().hex
    request = _Request(server, {"steps": 100, "job_id": job_id}, task="impute_ct")
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
    assert final["state"] == "cancelled" and final["task"] == "impute_ct" and final["step"] < 50, final
    remaining_s = (100 - final["step"]) * per_step_s
    assert request.ended - cancelled_at < max(5.0, 0.5 * remaining_s), (request.ended - cancelled_at, remaining_s)
    # the model is free: the next request (an imputation with a job of its own) is served at once
    t0 = time.monotonic()
    next_id = uuid.uuid4().hex
    r = requests.post(f"{server}/infer/impute_ptv", params={"image": CASE, "output": "json"},
                      data={"params": json.dumps({"steps": 1, "job_id": next_id})}, timeout=120)
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 60
    assert _job(server, next_id).json()["state"] == "done"


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


def test_compare_scores_the_prediction_against_the_cases_own_dose(server):
    """`compare`: gamma pass rate, OpenKBP dose / DVH score and the reference's Scorecard, equal to the
    core's metrics computed here on the returned dose."""
    import gzip

    import nibabel as nib
    import numpy as np
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    from diffkt3d.io.case_folder import load_case_folder
    from diffkt3d.metrics import openkbp
    from diffkt3d.metrics.gamma import gamma_pass_rate
    from diffkt3d.scorecard import load_template, score_case

    r = requests.post(f"{server}/infer/dose", params={"image": CASE, "output": "all"},
                      data={"params": json.dumps({"steps": 2, "candidates": 1, "compare": True})}, timeout=600)
    assert r.status_code == 200, r.text
    parts = {p.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: p.content
             for p in MultipartDecoder.from_response(r).parts}
    meta = json.loads(parts["params"])
    dose = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(parts["image"])).get_fdata(dtype=np.float32))
    comparison = meta["comparison"]
    figures = comparison["candidates"][meta["chosen_id"]]
    case = load_case_folder(VALIDATION / CASE)
    expected = openkbp.score_case_object(case, dose)
    assert figures["dose_score"] == pytest.approx(expected.dose_score, rel=1e-4)
    assert figures["dvh_score"] == pytest.approx(expected.dvh_score, rel=1e-4)
    assert figures["gamma_pass_rate"] == pytest.approx(
        gamma_pass_rate(case.dose_gy, dose, case.grid.spacing_mm), abs=1e-6)
    reference = score_case(case.dose_gy, case, load_template("openkbp_hn"))
    assert comparison["reference"]["scorecard_total"] == pytest.approx(reference.total)
    assert figures["scorecard"] == pytest.approx(meta["scorecard"]["total"])
    # a case without its own dose cannot be compared: a clear 422, nothing computed
    files = [("files", (p.name, p.read_bytes())) for p in sorted((VALIDATION / CASE).glob("*.nii.gz"))
             if p.name != "dose.nii.gz"]
    session = requests.put(f"{server}/session/", files=files, timeout=120).json()["session_id"]
    r = requests.post(f"{server}/infer/dose", params={"session_id": session, "output": "json"},
                      data={"params": json.dumps({"steps": 1, "compare": True})}, timeout=120)
    assert r.status_code == 422 and "dose.nii.gz" in r.json()["detail"], r.text
