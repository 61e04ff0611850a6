"""Parameter node and subject hierarchy on a real MRML scene, through a saved and reloaded scene.

The scene is written as a Medical Reality Bundle (.mrb, what Slicer's "Save scene" writes by
default) and read into a new scene with MRML's own reader, so what survives is what Slicer would
read back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib.parameters import (
    CT_REFERENCE,
    MODULE_NAME,
    REFERENCE_DOSE_REFERENCE,
    SEGMENTATION_REFERENCE,
    ModuleSettings,
    ParameterNode,
)
from DiffKT3DLib.scene_case import load_case_folder, place_in_study_of, study_of
from DiffKT3DLib.scene_inputs import SceneInputs


def _reload(slicer, scene, folder: Path):
    """Save `scene` to an .mrb and read it into a fresh scene (MRML's reader, a cache dir as in Slicer)."""
    path = folder / "scene.mrb"
    assert scene.WriteToMRB(str(path)), "writing the .mrb failed"
    cache = folder / "cache"
    cache.mkdir()
    new = slicer.vtkMRMLScene()
    io_manager, cache_manager = slicer.vtkDataIOManager(), slicer.vtkCacheManager()
    cache_manager.SetRemoteCacheDirectory(str(cache))
    io_manager.SetCacheManager(cache_manager)
    new.SetDataIOManager(io_manager)
    new.SetCacheManager(cache_manager)
    assert new.ReadFromMRB(str(path)), "reading the .mrb failed"
    return new


def test_settings_inputs_and_roles_survive_saving_and_reloading_the_scene(slicer_core, scene, case_dir, tmp_path):
    from slicer import util

    case = load_case_folder(scene, case_dir, ("PTV70", "PTV56", "SpinalCord", "possible_dose_mask"), as_case=True)
    params = ParameterNode(scene)
    assert params.settings() == ModuleSettings()  # defaults before anything is stored
    chosen = ModuleSettings(steps=23, candidates=5, seed=77, template="my_template", rater="dr-b", preview=True)
    params.save_settings(chosen)
    params.set_node(CT_REFERENCE, case.ct_node)
    params.set_node(SEGMENTATION_REFERENCE, case.segmentation_node)
    params.set_node(REFERENCE_DOSE_REFERENCE, case.reference_dose_node)
    # the planner's own role mapping: the cord left out, PTV56 prescribed 57 Gy
    inputs = SceneInputs(scene)
    roles = inputs.segment_roles(case.segmentation_node)
    for r in roles:
        if r.name == "SpinalCord":
            r.role = "ignore"
        if r.name == "PTV56":
            r.prescription_gy = 57.0
    inputs.store_roles(case.segmentation_node, roles)
    expected_roles = {r.name: (r.role, r.prescription_gy) for r in roles}
    assert params.node is scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    ct_array = util.arrayFromVolume(case.ct_node).copy()
    dose_array = util.arrayFromVolume(case.reference_dose_node).copy()

    reloaded = _reload(slicer_core, scene, tmp_path)
    try:
        params2 = ParameterNode(reloaded)
        assert params2.node.GetModuleName() == MODULE_NAME
        assert params2.settings() == chosen
        ct2 = params2.get_node(CT_REFERENCE)
        seg2 = params2.get_node(SEGMENTATION_REFERENCE)
        dose2 = params2.get_node(REFERENCE_DOSE_REFERENCE)
        assert ct2.GetName() == case.ct_node.GetName() and seg2.GetName() == case.segmentation_node.GetName()
        np.testing.assert_array_equal(util.arrayFromVolume(ct2), ct_array)
        np.testing.assert_array_equal(util.arrayFromVolume(dose2), dose_array)
        assert dose2.GetAttribute("DicomRtImport.DoseVolume") == "1"
        roles2 = {r.name: (r.role, r.prescription_gy) for r in SceneInputs(reloaded).segment_roles(seg2)}
        assert roles2 == expected_roles
        # one study holds the case, as before saving
        study = study_of(reloaded, ct2, create=False)
        assert study and study_of(reloaded, seg2, create=False) == study == study_of(reloaded, dose2, create=False)
    finally:
        reloaded.Clear(1)


def test_unreadable_stored_values_fall_back_to_defaults(slicer_core, scene):
    params = ParameterNode(scene)
    params.node.SetParameter("steps", "many")
    params.node.SetParameter("preview", "true")
    assert params.settings() == ModuleSettings(preview=True)
    with pytest.raises(ValueError, match="unknown parameter node reference"):
        params.set_node("Dose", None)


def test_results_go_into_the_study_of_their_ct(slicer_core, scene, loaded_case):
    ct, seg = loaded_case
    assert study_of(scene, ct, create=False) == 0  # loaded from NIfTI: in no study yet
    dose = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "DiffKT3D dose c0")
    study = place_in_study_of(scene, dose, ct)
    sh = slicer_core.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemLevel(study) == "Study" and sh.GetItemLevel(sh.GetItemParent(study)) == "Patient"
    assert study_of(scene, ct, create=False) == study == study_of(scene, dose, create=False)
    # a second result joins the same study instead of making another one
    isodose = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "DiffKT3D dose c0 isodose")
    assert place_in_study_of(scene, isodose, dose) == study
    assert place_in_study_of(scene, isodose, None) == 0


def test_closing_the_scene_forgets_the_results(slicer_core, scene, loaded_case, tmp_path):
    from DiffKT3DLib.candidates import CandidateSet
    from DiffKT3DLib.worker import InlineRunner
    from DiffKT3DLib.workflow import Workflow

    wf = Workflow(scene, client=None, runner=InlineRunner(), work_dir=tmp_path)
    wf.candidate_set = CandidateSet.from_response({"candidates": [{
        "id": "c0", "seed": 0, "scorecard": {"items": []}, "scorecard_total": 1.0, "scorecard_items": {}}]})
    wf.dose_nodes = {"c0": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "DiffKT3D dose c0")}
    statuses: list[str] = []
    wf.on_status = statuses.append
    scene.Clear(0)  # File > Close Scene
    assert wf.candidate_set is None and wf.dose_nodes == {} and wf.isodose_node is None
    assert statuses[-1] == "scene closed"
    wf.close()
    scene.Clear(0)  # no observer left after close()
    assert statuses[-1] == "scene closed" and len(statuses) == 1
