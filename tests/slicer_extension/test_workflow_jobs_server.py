"""The module's step progress, Cancel (dose and imputation), "Next case" and training controls
against a REAL server.

Same server as test_workflow_server.py (fixture `diffkt3d_server`: a random `tiny` model). What the
panel shows is compared with what the server says, read here independently with `requests`.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import requests

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib.client import DiffKT3DClient, ServerError
from DiffKT3DLib.parameters import CT_REFERENCE, REFERENCE_DOSE_REFERENCE, SEGMENTATION_REFERENCE
from DiffKT3DLib.scene_case import study_of
from DiffKT3DLib.worker import ThreadRunner, wait_for
from DiffKT3DLib.workflow import DoseRequest, Workflow

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture
def workflow(scene, diffkt3d_server, tmp_path):
    client = DiffKT3DClient(diffkt3d_server)
    client.job_poll_interval_s = 0.1
    wf = Workflow(scene, client, ThreadRunner(), work_dir=tmp_path / "work")
    errors: list[BaseException] = []
    wait_for(wf.runner, wf.connect(on_error=errors.append), 60)
    assert not errors, errors
    yield wf
    wf.close()


def _server_job(url: str, job_id: str) -> dict:
    r = requests.get(f"http://{url}/diffkt3d/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_progress_follows_the_sampling_steps(workflow, loaded_case, diffkt3d_server):
    wf = workflow
    ct, seg = loaded_case
    progress: list[tuple[float | None, str]] = []
    errors: list[BaseException] = []
    request = DoseRequest(ct, seg, wf.scene_logic.segment_roles(seg), candidates=2, steps=100, seed=1)
    job = wf.request_dose(request, on_error=errors.append, on_progress=lambda f, m: progress.append((f, m)))
    wait_for(wf.runner, job, 600)
    assert not errors and job.state == "done", errors
    steps = [(f, int(m.group(1))) for f, text in progress if (m := re.search(r"step (\d+) of 100", text))]
    assert len({s for _, s in steps}) >= 3, progress
    assert [s for _, s in steps] == sorted(s for _, s in steps)
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and 0.2 <= fractions[0] and fractions[-1] <= 0.6 + 1e-9
    # the panel's steps are the server's: the job it followed ended done at step 100 of 100
    final = _server_job(diffkt3d_server, wf.last_job_id)
    assert final["state"] == "done" and final["step"] == final["total_steps"] == 100


def test_cancel_in_the_panel_cancels_on_the_server(workflow, loaded_case, diffkt3d_server):
    wf = workflow
    ct, seg = loaded_case
    progress: list[str] = []
    request = DoseRequest(ct, seg, wf.scene_logic.segment_roles(seg), candidates=4, steps=100, seed=1)
    job = wf.request_dose(request, on_progress=lambda f, m: progress.append(m))
    deadline = time.monotonic() + 300
    while not any("step" in m for m in progress) and time.monotonic() < deadline and not job.finished:
        wf.poll()
        time.sleep(0.02)
    assert any("step" in m for m in progress), f"no step progress before the job ended: {progress}"
    wf.runner.cancel(job)  # what the panel's Cancel button does
    wf.poll()
    assert job.state == "cancelled"
    # the server stops the job at its next step (the module sent DELETE /diffkt3d/jobs/{id})
    deadline = time.monotonic() + 60
    while (state := _server_job(diffkt3d_server, wf.last_job_id))["state"] != "cancelled":
        assert time.monotonic() < deadline, f"the server job did not stop: {state}"
        time.sleep(0.1)
    assert state["step"] < state["total_steps"] == 100, state
    # and the model is free for the next request at once
    errors: list[BaseException] = []
    quick = DoseRequest(ct, seg, wf.scene_logic.segment_roles(seg), candidates=1, steps=1)
    t0 = time.monotonic()
    done = wf.request_dose(quick, on_error=errors.append)
    wait_for(wf.runner, done, 120)
    assert done.state == "done" and not errors and time.monotonic() - t0 < 60


def test_imputation_progress_follows_the_sampling_steps(workflow, loaded_case, diffkt3d_server):
    wf = workflow
    ct, seg = loaded_case
    progress: list[tuple[float | None, str]] = []
    errors: list[BaseException] = []
    out: list[dict] = []
    job = wf.request_imputation("oar", ct, seg, wf.scene_logic.segment_roles(seg), steps=100,
                                on_done=out.append, on_error=errors.append,
                                on_progress=lambda f, m: progress.append((f, m)))
    wait_for(wf.runner, job, 600)
    assert not errors and job.state == "done" and out[0]["segments"], errors
    steps = [(f, int(m.group(1))) for f, text in progress if (m := re.search(r"imputing oar: step (\d+) of 100", text))]
    assert steps, progress
    assert [s for _, s in steps] == sorted(s for _, s in steps)
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and 0.2 <= fractions[0] and fractions[-1] <= 0.95 + 1e-9
    # the steps the panel showed are the server's job: an imputation that ended at step 100 of 100
    final = _server_job(diffkt3d_server, wf.last_job_id)
    assert final["task"] == "impute_oar" and final["state"] == "done"
    assert final["step"] == final["total_steps"] == 100


def test_cancel_in_the_panel_cancels_an_imputation_on_the_server(workflow, loaded_case, diffkt3d_server):
    """Cancel pressed once the POST is on its way: the module's DELETE is sent again until the
    server knows the job, which then stops between two steps and frees the model."""
    wf = workflow
    ct, seg = loaded_case
    progress: list[str] = []
    job = wf.request_imputation("ct", None, seg, wf.scene_logic.segment_roles(seg), steps=100,
                                on_progress=lambda f, m: progress.append(m))
    deadline = time.monotonic() + 300
    while not any("waiting for the server" in m for m in progress) and time.monotonic() < deadline \
            and not job.finished:
        wf.poll()
        time.sleep(0.01)
    assert any("waiting for the server" in m for m in progress), progress
    wf.runner.cancel(job)  # what the panel's Cancel button does
    wf.poll()
    assert job.state == "cancelled"
    deadline = time.monotonic() + 60
    while True:
        r = requests.get(f"http://{diffkt3d_server}/diffkt3d/jobs/{wf.last_job_id}", timeout=30)
        if r.status_code == 200 and r.json()["state"] in ("cancelled", "done", "failed"):
            break
        assert time.monotonic() < deadline, f"the server job did not stop: {r.status_code} {r.text}"
        time.sleep(0.05)
    state = r.json()
    assert state["task"] == "impute_ct" and state["state"] == "cancelled", state
    assert state["step"] < 100, state
    # and the model is free for the next imputation at once
    errors: list[BaseException] = []
    t0 = time.monotonic()
    done = wf.request_imputation("oar", ct, seg, wf.scene_logic.segment_roles(seg), steps=1, on_error=errors.append)
    wait_for(wf.runner, done, 120)
    assert done.state == "done" and not errors and time.monotonic() - t0 < 60


def test_next_case_loads_the_case_from_the_server(workflow, diffkt3d_server, case_dir, nifti_kji):
    from slicer import util

    wf = workflow
    answers: list[dict] = []
    errors: list[BaseException] = []
    wait_for(wf.runner, wf.next_case("planner-a", on_done=answers.append, on_error=errors.append), 120)
    assert not errors, errors
    answer = answers[0]
    assert answer["id"] == case_dir.name
    case = answer["case"]
    # the CT, every structure and the reference dose, equal to the server's files (read with nibabel)
    ct_kji, _ = nifti_kji(case_dir / "ct.nii.gz")
    np.testing.assert_array_equal(util.arrayFromVolume(case.ct_node), ct_kji)
    dose_kji, _ = nifti_kji(case_dir / "dose.nii.gz")
    np.testing.assert_allclose(util.arrayFromVolume(case.reference_dose_node), dose_kji, atol=1e-5)
    assert case.reference_dose_node.GetAttribute("DicomRtImport.DoseVolume") == "1"
    segmentation = case.segmentation_node.GetSegmentation()
    names = {segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
             for i in range(segmentation.GetNumberOfSegments())}
    assert names == {p.name[:-7] for p in case_dir.glob("*.nii.gz")} - {"ct", "dose"}
    roles = {r.name: (r.role, r.prescription_gy) for r in wf.scene_logic.segment_roles(case.segmentation_node)}
    assert roles["PTV70"] == ("target", 70.0) and roles["possible_dose_mask"][0] == "body"
    ptv_kji, _ = nifti_kji(case_dir / "PTV70.nii.gz")
    ptv_id = segmentation.GetSegmentIdBySegmentName("PTV70")
    np.testing.assert_array_equal(wf.scene_logic.segment_mask(case.segmentation_node, ptv_id, case.ct_node),
                                  ptv_kji > 0.5)
    # the panel's inputs point at it, and it sits in one study
    assert wf.parameters.get_node(CT_REFERENCE) is case.ct_node
    assert wf.parameters.get_node(SEGMENTATION_REFERENCE) is case.segmentation_node
    assert wf.parameters.get_node(REFERENCE_DOSE_REFERENCE) is case.reference_dose_node
    scene = wf.scene_logic.scene
    study = study_of(scene, case.ct_node, create=False)
    assert study and study_of(scene, case.reference_dose_node, create=False) == study
    # doses predicted on it go into the same study, compared with the case's own dose
    errors.clear()
    request = DoseRequest(case.ct_node, case.segmentation_node, wf.scene_logic.segment_roles(case.segmentation_node),
                          candidates=2, steps=1, reference_dose_node=case.reference_dose_node)
    wait_for(wf.runner, wf.request_dose(request, on_error=errors.append), 600)
    assert not errors, errors
    for node in (*wf.dose_nodes.values(), wf.isodose_node):
        assert study_of(scene, node, create=False) == study, node.GetName()
    _check_reference_comparison(wf, case_dir)


def _table(node) -> dict[str, list[str]]:
    """{first cell: row cells} of a table node."""
    table = node.GetTable()
    rows = {}
    for r in range(table.GetNumberOfRows()):
        cells = [table.GetValue(r, c).ToString() for c in range(table.GetNumberOfColumns())]
        rows[cells[0]] = cells
    return rows


def _check_reference_comparison(wf, case_dir):
    """The comparison tables against the core's metrics, computed here on the doses in the scene."""
    from slicer import util

    from diffkt3d.io.case_folder import load_case_folder
    from diffkt3d.metrics import openkbp
    from diffkt3d.scorecard import load_template, score_case

    reference = load_case_folder(case_dir)
    rows = _table(wf.scene_logic.scene.GetFirstNodeByName("DiffKT3D dose comparison"))
    assert set(rows) == {*wf.dose_nodes, "reference"}
    for cid, node in wf.dose_nodes.items():
        dose_ijk = util.arrayFromVolume(node).transpose(2, 1, 0)
        expected = openkbp.score_case_object(reference, dose_ijk)
        gamma, dose_score, dvh_score, total = (float(x) for x in rows[cid][1:])
        assert dose_score == pytest.approx(expected.dose_score, rel=1e-3)
        assert dvh_score == pytest.approx(expected.dvh_score, rel=1e-3)
        assert 0.0 <= gamma <= 100.0
        assert total == pytest.approx(wf.candidate_set.get(cid).total, rel=1e-5)
    ref_total = score_case(reference.dose_gy, reference, load_template("openkbp_hn")).total
    assert float(rows["reference"][4]) == pytest.approx(ref_total, rel=1e-5)
    side_by_side = wf.scene_logic.scene.GetFirstNodeByName("DiffKT3D Scorecard comparison")
    columns = [side_by_side.GetColumnName(c) for c in range(side_by_side.GetNumberOfColumns())]
    assert columns[-1] == "reference score" and all(f"{cid} score" in columns for cid in wf.dose_nodes)
    assert float(_table(side_by_side)["Total"][-1]) == pytest.approx(ref_total, rel=1e-5)


def test_training_is_started_followed_and_stopped_from_the_panel(workflow):
    wf = workflow
    assert "any2any" in wf.tasks["trainers"]
    errors: list[BaseException] = []
    results: list = []

    def run(job, timeout=120):
        wait_for(wf.runner, job, timeout)
        assert not errors, errors
        return results.pop()

    with pytest.raises(ValueError, match="no training task"):
        wf.start_training("nonexistent")
    # 1. a short run: followed to the end, with its loss and validation lines
    params = {"from_scratch": True, "model_preset": "tiny", "model_overrides": {}, "grid": 16, "stages.any2any.steps": 2,
              "stages.dose.steps": 2, "stages.any2any.warmup_steps": 1, "stages.dose.warmup_steps": 1}
    run(wf.start_training("any2any", params, on_done=results.append, on_error=errors.append))
    deadline = time.monotonic() + 900
    seen = []
    while True:
        status = run(wf.training_status(on_done=results.append, on_error=errors.append))
        seen.append(status)
        if not status.running or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert status.state == "DONE", status
    assert status.task == "any2any" and status.step == status.total_steps == 2 and status.loss is not None
    assert status.progress == 1.0 and "loss" in status.summary()
    # 2. a long run, stopped from the panel
    long_params = {**params, "stages.any2any.steps": 5000}
    run(wf.start_training("any2any", long_params, on_done=results.append, on_error=errors.append))
    deadline = time.monotonic() + 300
    while not (status := run(wf.training_status(on_done=results.append, on_error=errors.append))).running:
        assert time.monotonic() < deadline, status
        time.sleep(1)
    run(wf.stop_training(on_done=results.append, on_error=errors.append))
    status = run(wf.training_status(on_done=results.append, on_error=errors.append))
    assert status.state == "STOPPED" and not status.running, status


def test_a_bad_training_request_shows_the_servers_message(diffkt3d_server):
    client = DiffKT3DClient(diffkt3d_server)
    with pytest.raises(ServerError) as err:
        client.start_training("any2any", {"no_such_key": 1})
    assert err.value.status in (400, 422) and "no_such_key" in str(err.value)
