"""End-to-end flow used by the module's Test class in Slicer and by pytest on slicer-core.

One function, two hosts: `DiffKT3DTest` (inside Slicer, ticking the Qt event loop) and
tests/slicer_extension/test_workflow_server.py (slicer-core scene, real server subprocess) run the
same `run_flow`, so what is verified outside Slicer is the code Slicer runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from slicer import util as slicer_util

from . import scene_case
from .client import DiffKT3DClient
from .constants import DOSE_VOLUME_ATTRIBUTE, PREVIEW_DEBOUNCE_S
from .worker import ThreadRunner, wait_for
from .workflow import DoseRequest, Workflow

logger = logging.getLogger(__name__)


def load_case_folder(scene, folder: str | Path, structures: tuple[str, ...] | None = None):
    """Load a case folder (ct.nii.gz + one mask per structure) as a CT volume and a segmentation.

    Returns:
        (CT volume node, segmentation node); each `<Name>.nii.gz` becomes segment `<Name>`.
    """
    loaded = scene_case.load_case_folder(scene, folder, structures)
    return loaded.ct_node, loaded.segmentation_node


def set_segment_voxels(segmentation_node, segment_id: str, mask_kji: np.ndarray, reference_node) -> None:
    """Replace a segment's voxels as Segment Editor effects do (fires the edit event)."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DiffKT3D_edit__")
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    slicer_util.updateVolumeFromArray(labelmap, mask_kji.astype(np.uint8))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = logic.CreateOrientedImageDataFromVolumeNode(labelmap)
    scene.RemoveNode(labelmap)
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise ValueError(f"could not edit segment {segment_id}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def run_flow(scene, case_folder: str | Path, server_url: str, *, candidates: int = 2, steps: int = 2,
             tick: Callable[[], None] | None = None, timeout_s: float = 900.0,
             structures: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Connect, predict N candidates, check the scene, switch candidate, rate, preview an edit.

    Args:
        tick: called while waiting (Slicer: slicer.app.processEvents) so the GUI keeps running.

    Returns:
        a summary (candidate ids and totals, preference record id, timings) for the log.

    Raises:
        AssertionError: a check failed (message says which); ClientError: the server failed.
    """
    ct, seg = load_case_folder(scene, case_folder, structures)
    now = [0.0]
    wf = Workflow(scene, DiffKT3DClient(server_url), ThreadRunner(), clock=lambda: now[0])
    errors: list[BaseException] = []
    summary: dict[str, Any] = {}
    try:
        def run(job, what: str):
            t0 = time.monotonic()
            wait_for(wf.runner, job, timeout_s, tick=tick)
            if errors:
                raise errors[0]
            _check(job.state == "done", f"{what}: job ended {job.state}")
            summary[f"{what}_s"] = round(time.monotonic() - t0, 2)

        # 1. Server and tasks
        run(wf.connect(on_error=errors.append), "connect")
        _check("dose" in wf.tasks["dose"], f"no dose task: {wf.tasks}")
        # 2. N candidates with Scorecards, DVH, isodose
        roles = wf.scene_logic.segment_roles(seg)
        request = DoseRequest(ct, seg, roles, candidates=candidates, steps=steps)
        run(wf.request_dose(request, on_error=errors.append), "dose")
        cset = wf.candidate_set
        _check(len(cset.candidates) == candidates, f"expected {candidates} candidates, got {len(cset.candidates)}")
        for cand in cset.candidates:
            node = wf.dose_nodes[cand.id]
            _check(node.GetAttribute(DOSE_VOLUME_ATTRIBUTE) == "1", f"{node.GetName()} is not marked as dose")
            table = wf.scorecard_tables[cand.id]
            _check(table.GetNumberOfRows() == len(cand.scorecard["items"]) + 1,
                   f"Scorecard table of {cand.id} has {table.GetNumberOfRows()} rows")
        n_struct = sum(r.role in ("target", "oar") for r in roles)
        chart = wf.scene_logic.dvh_chart()
        _check(chart.GetNumberOfPlotSeriesNodes() == candidates * n_struct,
               f"DVH chart has {chart.GetNumberOfPlotSeriesNodes()} series, expected {candidates * n_struct}")
        summary["candidates"] = {c.id: c.total for c in cset.candidates}
        # 3. Switch candidate; 4. preference
        other = cset.candidates[-1].id
        _check(wf.set_active_candidate(other) is wf.scorecard_tables[other], "switching did not switch the table")
        records: list[dict] = []
        run(wf.send_preference(other, "selftest", "module self-test", on_done=records.append,
                               on_error=errors.append), "preference")
        summary["preference_record"] = records[0].get("record_id")
        # 5. Edit the first target -> one debounced 1-step preview
        wf.enable_preview(request, True)
        target = next(r for r in roles if r.role == "target")
        mask = wf.scene_logic.segment_mask(seg, target.segment_id, ct)
        grown = mask.copy()
        grown[:, :-1, :] |= mask[:, 1:, :]
        set_segment_voxels(seg, target.segment_id, grown, ct)
        now[0] += PREVIEW_DEBOUNCE_S + 0.01
        wf.poll()
        _check(wf.preview_running, "a segment edit did not start a preview")
        run(wf.preview_job, "preview")
        _check(wf.preview_set is not None and wf.preview_set.preview, "preview result missing")
        return summary
    finally:
        wf.close()
