"""Workflow logic without a server: input checks and preview coalescing (fake client, real scene)."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib import constants
from DiffKT3DLib.client import InferResult
from DiffKT3DLib.worker import ThreadRunner, wait_for
from DiffKT3DLib.workflow import DoseRequest, Workflow


class FakeClient:
    """Stands in for DiffKT3DClient: answers every dose call with the case's reference dose.

    `gate` (if set) holds each infer call until the test releases it, to have a request in flight.
    """

    server_url = "http://fake:8000"

    def __init__(self, dose_file: Path, candidate: dict):
        self.dose_file, self.candidate = dose_file, candidate
        self.calls: list[tuple[str, dict]] = []
        self.gate: threading.Semaphore | None = None

    def upload_case(self, files, expiry_s=3600, cancel=None):
        self.calls.append(("upload", {"files": sorted(files)}))
        return f"s{len(self.calls)}"

    def delete_session(self, session_id):
        self.calls.append(("delete", {"session": session_id}))

    @contextlib.contextmanager
    def follow_job(self, job_id, ctx, **_kw):  # no server to read a job's steps from
        yield []

    def infer(self, task, out_dir, *, image=None, session_id=None, params=None, output="all",
              read_timeout_s=None, cancel=None):
        self.calls.append(("infer", dict(params or {})))
        if self.gate is not None:
            assert self.gate.acquire(timeout=30)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.dose_file, out_dir / "dose.nii.gz")
        answer = {"case": {"id": "session-x"}, "model_version": "fake", "steps": params.get("steps", 10),
                  "preview": bool(params.get("preview")), "chosen_id": "c0", "request_id": "r",
                  "scorecard": self.candidate["scorecard"], "candidates": [self.candidate]}
        return InferResult(json.loads(json.dumps(answer)), out_dir / "dose.nii.gz")


@pytest.fixture(scope="module")
def reference_candidate(case_dir):
    """The reference dose as the one candidate of a dose answer, in the core's form."""
    from diffkt3d.inference import Candidate
    from diffkt3d.io.case_folder import load_case_folder
    from diffkt3d.scorecard.engine import score_case

    case = load_case_folder(case_dir)
    return Candidate(id="c0", seed=0, dose_gy=case.dose_gy, scorecard=score_case(case.dose_gy, case, "openkbp_hn")).to_dict()


@pytest.fixture
def fake_workflow(scene, case_dir, reference_candidate, tmp_path):
    now = [0.0]
    client = FakeClient(case_dir / "dose.nii.gz", reference_candidate)
    wf = Workflow(scene, client, ThreadRunner(), work_dir=tmp_path / "work", clock=lambda: now[0])
    yield wf, client, now
    if client.gate is not None:
        client.gate.release(10)
    wf.close()


def test_bad_inputs_fail_before_any_network_call(fake_workflow, loaded_case):
    wf, client, _ = fake_workflow
    ct, seg = loaded_case
    roles = wf.scene_logic.segment_roles(seg)
    with pytest.raises(ValueError, match="select a CT"):
        wf.request_dose(DoseRequest(None, seg, roles))
    no_rx = [r for r in roles if r.role != "target"]
    with pytest.raises(ValueError, match="no target segment with a prescription"):
        wf.request_dose(DoseRequest(ct, seg, no_rx))
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        wf.request_dose(DoseRequest(ct, seg, roles, candidates=0))
    with pytest.raises(ValueError, match="no candidates to rate"):
        wf.send_preference("c0", "dr")
    with pytest.raises(ValueError, match="rater"):
        wf.next_case("  ")
    assert client.calls == []


def test_edits_during_a_running_preview_give_exactly_one_more(fake_workflow, loaded_case, set_segment):
    wf, client, now = fake_workflow
    ct, seg = loaded_case
    client.gate = threading.Semaphore(0)
    request = DoseRequest(ct, seg, wf.scene_logic.segment_roles(seg))
    wf.enable_preview(request, True)
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("PTV70")
    mask = wf.scene_logic.segment_mask(seg, sid, ct)

    def edit_and_wait():
        mask[:, :-1, :] |= mask[:, 1:, :]
        set_segment(seg, sid, mask, ct)
        now[0] += constants.PREVIEW_DEBOUNCE_S + 0.01
        wf.poll()

    edit_and_wait()
    first = wf.preview_job
    assert first is not None and wf.preview_running
    edit_and_wait()  # two more edits while the first preview is in flight
    edit_and_wait()
    assert wf.preview_job is first  # not started in parallel
    client.gate.release()  # the first preview finishes
    wait_for(wf.runner, first, 30)
    second = wf.preview_job
    assert second is not first and wf.preview_running  # one follow-up for both edits
    client.gate.release()
    wait_for(wf.runner, second, 30)
    wf.poll()
    infers = [p for kind, p in client.calls if kind == "infer"]
    assert len(infers) == 2 and all(p["preview"] and p["steps"] == constants.PREVIEW_STEPS for p in infers)
    assert sum(kind == "delete" for kind, _ in client.calls) == 2  # preview sessions freed
    assert wf.preview_node.GetAttribute(constants.DOSE_VOLUME_ATTRIBUTE) == "1"
    assert wf.preview_set.preview


def test_only_the_last_request_folders_are_kept(fake_workflow):
    wf, _, _ = fake_workflow
    folders = [wf._new_request_dir("dose") for _ in range(constants.KEEP_REQUEST_DIRS + 4)]
    kept = sorted(p for p in wf.work_dir.iterdir())
    assert kept == folders[-constants.KEEP_REQUEST_DIRS:]
