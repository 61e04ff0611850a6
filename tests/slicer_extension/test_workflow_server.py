"""The module's workflow on a real MRML scene (slicer-core) against a real DiffKT3D server.

The server runs as a subprocess (fixture `diffkt3d_server`) with a random `tiny` model: the
values are not clinically meaningful, but every number in the scene must equal what the server
sent. Expected values come from independent HTTP calls made here with `requests` and parsed with
requests-toolbelt / nibabel, not through the Lib.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib import constants
from DiffKT3DLib.client import DiffKT3DClient, ServerError
from DiffKT3DLib.worker import ThreadRunner, wait_for
from DiffKT3DLib.workflow import DoseRequest, Workflow

pytestmark = [pytest.mark.server, pytest.mark.slow]

STEPS = 2  # a tiny model on 2 CPU cores: keep requests short


def _fetch_candidate(url: str, session_id: str, request_id: str, candidate_id: str):
    """(JSON, dose in Slicer's (K, J, I) order) of one candidate, fetched independently of the Lib."""
    import gzip
    import io

    import nibabel as nib
    from requests_toolbelt.multipart import decoder

    resp = requests.post(f"http://{url}/infer/dose", params={"session_id": session_id, "output": "all"},
                         data={"params": json.dumps({"request_id": request_id, "candidate_id": candidate_id})},
                         timeout=300)
    assert resp.status_code == 200, resp.text
    parts = {}
    for part in decoder.MultipartDecoder.from_response(resp).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        name = disposition.split('name="')[1].split('"')[0]
        parts[name] = part.content
    raw = parts["image"]
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    img = nib.Nifti1Image.from_stream(io.BytesIO(raw))
    return json.loads(parts["params"]), np.asarray(img.get_fdata(dtype=np.float32)).transpose(2, 1, 0), img.affine


@pytest.fixture
def workflow(scene, diffkt3d_server, tmp_path):
    wf = Workflow(scene, DiffKT3DClient(diffkt3d_server), ThreadRunner(), work_dir=tmp_path / "work")
    errors: list[BaseException] = []
    job = wf.connect(on_error=errors.append)
    wait_for(wf.runner, job, 60)
    assert not errors, errors
    yield wf
    wf.close()


def _run(wf, job, timeout_s=600):
    wait_for(wf.runner, job, timeout_s)
    return job


def test_dose_candidates_scorecards_dvh_preference(workflow, loaded_case, diffkt3d_server, nifti_kji):
    from slicer import util

    wf = workflow
    assert wf.tasks["dose"] == ["dose"] and set(wf.tasks["impute"]) == {"impute_ct", "impute_ptv", "impute_oar"}
    assert "preference" in wf.tasks["strategies"]
    ct, seg = loaded_case
    structure_roles = wf.scene_logic.segment_roles(seg)
    errors, progress = [], []
    request = DoseRequest(ct, seg, structure_roles, candidates=2, steps=STEPS, seed=3)
    job = _run(wf, wf.request_dose(request, on_error=errors.append, on_progress=lambda f, m: progress.append(m)))
    assert not errors, errors
    assert job.state == "done" and "uploading the case" in progress
    cset = wf.candidate_set
    assert len(cset.candidates) == 2 and cset.active_id == cset.best_id
    session_id = cset.session_id  # the uploaded case stays on the server for independent fetches
    assert session_id

    ct_matrix = _ijk_to_ras(ct)
    for cand in cset.candidates:
        node = wf.dose_nodes[cand.id]
        expected_json, expected_dose, _ = _fetch_candidate(diffkt3d_server, session_id, cset.request_id, cand.id)
        # dose volume == the server's NIfTI, on the CT's geometry, marked as a dose
        np.testing.assert_allclose(util.arrayFromVolume(node), expected_dose, atol=1e-6)
        np.testing.assert_allclose(_ijk_to_ras(node), ct_matrix, atol=1e-4)
        assert node.GetAttribute(constants.DOSE_VOLUME_ATTRIBUTE) == "1"
        assert node.GetDisplayNode().GetWindowLevelMax() == pytest.approx(77.0)
        # Scorecard table rows == the candidate's JSON
        card = expected_json.get("scorecard") or cand.scorecard
        table = wf.scorecard_tables[cand.id]
        items = card["items"]
        assert table.GetNumberOfRows() == len(items) + 1
        np.testing.assert_allclose(util.arrayFromTableColumn(table, "Score")[:-1], [it["score"] for it in items])
        np.testing.assert_allclose(util.arrayFromTableColumn(table, "Value")[:-1], [it["value"] for it in items])
        assert [table.GetCellText(r, 0) for r in range(len(items))] == [it["structure"] for it in items]
        assert util.arrayFromTableColumn(table, "Score")[-1] == pytest.approx(card["total"])
        assert cand.total == pytest.approx(card["total"])

    # DVH: one series per (candidate, target/OAR), candidate line styles differ
    chart = wf.scene_logic.dvh_chart()
    n_struct = sum(r.role in ("target", "oar") for r in structure_roles)
    assert chart.GetNumberOfPlotSeriesNodes() == 2 * n_struct
    # comparison table holds both totals
    comp = scene_node(wf, "DiffKT3D Scorecard comparison")
    total_row = [comp.GetCellText(r, 0) for r in range(comp.GetNumberOfRows())].index("Total")
    assert [float(comp.GetCellText(total_row, c)) for c in (2, 3)] == pytest.approx(
        [c.total for c in cset.candidates], rel=1e-3)

    # switching the active candidate switches isodose lines and the Scorecard table
    other = [c.id for c in cset.candidates if c.id != cset.active_id][0]
    table = wf.set_active_candidate(other)
    assert table is wf.scorecard_tables[other]
    iso = wf.isodose_node
    dose_other = util.arrayFromVolume(wf.dose_nodes[other])
    sid80 = iso.GetSegmentation().GetNthSegmentID(0)
    mask80 = wf.scene_logic.segment_mask(iso, sid80, wf.dose_nodes[other])
    np.testing.assert_array_equal(mask80 > 0, dose_other >= 0.8 * 70.0)

    # preference -> the server's store
    stored = []
    job = _run(wf, wf.send_preference(other, "dr_test", "less cord dose", on_done=stored.append, on_error=errors.append))
    assert not errors, errors
    got = requests.get(f"http://{diffkt3d_server}/diffkt3d/preferences", params={"rater": "dr_test"}, timeout=30).json()
    assert got["count"] == 1
    record = got["records"][0]
    assert record["chosen_id"] == other and record["comment"] == "less cord dose"
    assert [c["id"] for c in record["candidates"]] == [c.id for c in cset.candidates]
    assert stored[0]["record_id"] == record["record_id"]

    # active learning: a dict, and if a case, one of the studies
    nxt = []
    _run(wf, wf.next_case("dr_other", on_done=nxt.append, on_error=errors.append))
    assert not errors, errors
    assert isinstance(nxt[0], dict) and nxt[0].get("id") in (None, "pt_201")


def test_server_error_detail_reaches_the_panel(workflow, loaded_case):
    ct, seg = loaded_case
    errors = []
    request = DoseRequest(ct, seg, workflow.scene_logic.segment_roles(seg), steps=0)
    _run(workflow, workflow.request_dose(request, on_error=errors.append))
    assert isinstance(errors[0], ServerError) and errors[0].status == 422
    assert "steps" in str(errors[0])


def test_preview_after_a_segment_edit(workflow, loaded_case, set_segment, nifti_kji):
    """Editing PTV70 -> (debounced, fake clock) one 1-step preview updating dose and Scorecard."""
    from slicer import util

    ct, seg = loaded_case
    now = [0.0]
    workflow.debouncer.clock = lambda: now[0]
    request = DoseRequest(ct, seg, workflow.scene_logic.segment_roles(seg))
    workflow.enable_preview(request, True)
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("PTV70")
    mask = workflow.scene_logic.segment_mask(seg, sid, ct)
    grown = mask.copy()
    grown[:, :-1, :] |= mask[:, 1:, :]  # grow by one voxel along J
    set_segment(seg, sid, grown, ct)
    set_segment(seg, sid, grown, ct)  # a second stroke
    assert workflow.debouncer.pending
    workflow.poll()
    assert not workflow.preview_running  # still inside the quiet period
    now[0] += constants.PREVIEW_DEBOUNCE_S + 0.01
    workflow.poll()
    assert workflow.preview_running
    job = workflow.preview_job
    _run(workflow, job, 300)
    assert job.state == "done", job.state
    assert workflow.preview_set.preview and workflow.preview_set.steps == constants.PREVIEW_STEPS
    node = workflow.preview_node
    assert node.GetAttribute(constants.DOSE_VOLUME_ATTRIBUTE) == "1"
    assert util.arrayFromVolume(node).shape == util.arrayFromVolume(ct).shape
    exported = workflow.last_export.files["PTV70.nii.gz"]
    assert (nifti_kji(exported)[0] > 0).sum() == grown.sum()  # the preview used the edited segment
    # the preview's uploaded case was deleted on the server (previews are never re-fetched)
    url = workflow.client.server_url
    assert requests.get(f"{url}/session/{workflow.preview_set.session_id}", timeout=30).status_code == 404
    # disabled: an edit schedules nothing
    workflow.enable_preview(request, False)
    set_segment(seg, sid, mask, ct)
    assert not workflow.debouncer.pending
    assert exported.exists()


def test_impute_ptv_and_ct(workflow, loaded_case, nifti_kji):
    from slicer import util

    ct, seg = loaded_case
    rs = workflow.scene_logic.segment_roles(seg)
    for r in rs:  # a case without targets: PTV imputation
        if r.role == "target":
            r.role = "ignore"
    errors, out = [], []
    _run(workflow, workflow.request_imputation("ptv", ct, seg, rs, on_done=out.append, on_error=errors.append))
    assert not errors, errors
    # the served model has no passing PTV benchmark: the gate's warning reaches the module
    assert out[0]["warnings"] and out[0]["warnings"][0].startswith("ptv imputation is experimental")
    labels = out[0]["params"]["labels"]
    result_file = sorted((workflow.work_dir).glob("*impute_ptv/result/*.nii*"))[0]
    labelmap = nifti_kji(result_file)[0]
    # every structure with voxels in the server's label map became a segment, and only those
    assert set(out[0]["segments"]) == {n for n, v in labels.items() if (labelmap == v).any()}
    for name, sid in out[0]["segments"].items():
        mask = workflow.scene_logic.segment_mask(seg, sid, ct)
        np.testing.assert_array_equal(mask > 0, labelmap == labels[name])
    # CT imputation from the structures only
    out.clear()
    _run(workflow, workflow.request_imputation("ct", None, seg, workflow.scene_logic.segment_roles(seg),
                                               on_done=out.append, on_error=errors.append))
    assert not errors, errors
    node = out[0]["volume_node"]
    ct_file = sorted((workflow.work_dir).glob("*impute_ct/result/*.nii*"))[0]
    np.testing.assert_allclose(util.arrayFromVolume(node), nifti_kji(ct_file)[0], atol=1e-3)


def test_impute_only_the_structures_asked_for(workflow, loaded_case):
    ct, seg = loaded_case
    rs = workflow.scene_logic.segment_roles(seg)
    for r in rs:
        if r.role == "target":
            r.role = "ignore"
    errors, out = [], []
    _run(workflow, workflow.request_imputation("ptv", ct, seg, rs, on_done=out.append, on_error=errors.append,
                                               steps=1, structures=[" PTV70 ", ""]))
    assert not errors, errors
    assert list(out[0]["params"]["labels"]) == ["PTV70"]
    assert set(out[0]["segments"]) <= {"PTV70"}
    # a name the model does not impute: the server's answer names the ones it does
    _run(workflow, workflow.request_imputation("oar", ct, seg, rs, on_done=out.append, on_error=errors.append,
                                               steps=1, structures=["Heart"]))
    assert len(errors) == 1 and "Heart" in str(errors[0]) and "SpinalCord" in str(errors[0])
    with pytest.raises(ValueError, match="a CT imputation has none"):
        workflow.request_imputation("ct", None, seg, rs, structures=["PTV70"])


def test_module_selftest_flow(scene, diffkt3d_server, case_dir, case_structures):
    """The flow DiffKT3DTest runs inside Slicer, here on slicer-core (same function)."""
    from DiffKT3DLib.selftest import run_flow

    ticks = []
    summary = run_flow(scene, case_dir, diffkt3d_server, candidates=2, steps=STEPS,
                       tick=lambda: ticks.append(1), structures=case_structures)
    assert len(summary["candidates"]) == 2 and summary["preference_record"]
    assert len(ticks) > 10  # the caller's event loop kept running while waiting


def scene_node(wf, name):
    nodes = wf.scene_logic.scene.GetNodesByName(name)
    assert nodes.GetNumberOfItems() == 1, name
    return nodes.GetItemAsObject(0)


def _ijk_to_ras(node) -> np.ndarray:
    import vtk
    from slicer import util

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return util.arrayFromVTKMatrix(m)
