"""The SlicerRT path: the exact calls made on SlicerRT's isodose and DVH logic and nodes.

SlicerRT is a Slicer extension with no PyPI package and slicer-core does not include it, so its
classes cannot be had here (docs/slicer.md). These tests record the calls on stand-ins that accept
exactly the methods of SlicerRT's public headers the module uses (`vtkSlicerIsodoseModuleLogic`,
`vtkMRMLIsodoseNode`, `vtkSlicerDoseVolumeHistogramModuleLogic`, `vtkMRMLDoseVolumeHistogramNode`);
a method the module calls that is not in that list fails the test. The fallback (no SlicerRT) is
the module's own display, tested on a real scene in test_scene_logic.py; here we check the switch.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip("slicer_core", reason="slicer-core (headless MRML) is not installed")
from DiffKT3DLib.constants import ISODOSE_COLORS, ISODOSE_LEVELS_PCT
from DiffKT3DLib.slicerrt import DVH_NODE_CLASS, ISODOSE_NODE_CLASS, SlicerRTDisplay, slicerrt_logics

# The methods of SlicerRT's classes the module may call (from its headers).
API = {
    "isodose_logic": {"SetupColorTableNodeForDoseVolumeNode", "SetNumberOfIsodoseLevels", "CreateIsodoseSurfaces"},
    "dvh_logic": {"ComputeDvh"},
    ISODOSE_NODE_CLASS: {"SetAndObserveDoseVolumeNode", "SetAndObserveColorTableNode", "SetDoseUnits",
                         "SetRelativeRepresentationFlag", "SetReferenceDoseValue", "SetShowIsodoseLines",
                         "SetShowIsodoseSurfaces", "GetScene"},
    DVH_NODE_CLASS: {"SetAndObserveDoseVolumeNode", "SetAndObserveSegmentationNode", "SetSelectedSegmentIDs",
                     "GetScene"},
    "color_table": {"SetColor"},
}


class Recorder:
    """Records `name(args)` calls; only the methods in API[kind] exist."""

    def __init__(self, kind: str, log: list, returns: dict | None = None):
        self._kind, self._log, self._returns = kind, log, returns or {}
        if kind == ISODOSE_NODE_CLASS:
            self.Gy = 0  # vtkMRMLIsodoseNode::DoseUnitsType::Gy

    def __getattr__(self, name):
        if name.startswith("_") or name not in API[self._kind]:
            raise AttributeError(f"{self._kind} has no method {name} in SlicerRT's API")

        def call(*args):
            self._log.append((self._kind, name, args))
            return self._returns.get(name)

        return call


class FakeScene:
    def __init__(self, log):
        self.log = log

    def AddNewNodeByClass(self, class_name, name):
        self.log.append(("scene", "AddNewNodeByClass", (class_name, name)))
        return Recorder(class_name, self.log, {"GetScene": self})


def _dose(slicer_core):
    scene = slicer_core.vtkMRMLScene()
    return scene, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "DiffKT3D dose c0")


def test_isodose_uses_slicerrt_with_the_levels_in_percent_of_the_prescription(slicer_core):
    log: list = []
    _, dose = _dose(slicer_core)
    colors = Recorder("color_table", log)
    logic = Recorder("isodose_logic", log, {"SetupColorTableNodeForDoseVolumeNode": colors,
                                            "CreateIsodoseSurfaces": True})
    display = SlicerRTDisplay(FakeScene(log), logic, Recorder("dvh_logic", log))
    node = display.isodose(dose, 70.0)
    assert dose.GetAttribute("DicomRtImport.DoseVolume") == "1"  # SlicerRT's modules accept it as a dose
    calls = [(k, n, a) for k, n, a in log]
    assert calls[0] == ("scene", "AddNewNodeByClass", (ISODOSE_NODE_CLASS, "DiffKT3D dose c0 isodose"))
    assert (ISODOSE_NODE_CLASS, "SetAndObserveDoseVolumeNode", (dose,)) in calls
    assert ("isodose_logic", "SetupColorTableNodeForDoseVolumeNode", (dose,)) in calls
    assert (ISODOSE_NODE_CLASS, "SetAndObserveColorTableNode", (colors,)) in calls
    assert (ISODOSE_NODE_CLASS, "SetDoseUnits", (0,)) in calls
    assert (ISODOSE_NODE_CLASS, "SetRelativeRepresentationFlag", (True,)) in calls
    assert (ISODOSE_NODE_CLASS, "SetReferenceDoseValue", (70.0,)) in calls
    assert ("isodose_logic", "SetNumberOfIsodoseLevels", (node, len(ISODOSE_LEVELS_PCT))) in calls
    set_colors = [a for k, n, a in calls if k == "color_table"]
    assert set_colors == [(i, f"{p:g}", *ISODOSE_COLORS[p], 1.0) for i, p in enumerate(ISODOSE_LEVELS_PCT)]
    # levels are named before the surfaces are made (SlicerRT reads a level from its colour's name)
    assert calls[-1] == ("isodose_logic", "CreateIsodoseSurfaces", (node,))
    assert calls.index(("isodose_logic", "SetNumberOfIsodoseLevels", (node, 5))) < \
        calls.index(("color_table", "SetColor", set_colors[0]))
    # the node is reused for the next candidate
    log.clear()
    assert display.isodose(dose, 70.0, node=node) is node
    assert not [c for c in log if c[1] == "AddNewNodeByClass"]


def test_isodose_failure_and_missing_prescription_are_clear_errors(slicer_core):
    log: list = []
    _, dose = _dose(slicer_core)
    logic = Recorder("isodose_logic", log, {"SetupColorTableNodeForDoseVolumeNode": Recorder("color_table", log),
                                            "CreateIsodoseSurfaces": False})
    display = SlicerRTDisplay(FakeScene(log), logic, Recorder("dvh_logic", log))
    with pytest.raises(ValueError, match="could not make the isodose lines of DiffKT3D dose c0"):
        display.isodose(dose, 70.0)
    with pytest.raises(ValueError, match="prescription"):
        display.isodose(dose, 0.0)


def test_dvh_uses_slicerrt_on_the_chosen_segments(slicer_core):
    log: list = []
    scene, dose = _dose(slicer_core)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Structures")
    display = SlicerRTDisplay(FakeScene(log), Recorder("isodose_logic", log), Recorder("dvh_logic", log,
                                                                                        {"ComputeDvh": ""}))
    node = display.dvh(dose, seg, ["PTV70", "SpinalCord"])
    assert log == [
        ("scene", "AddNewNodeByClass", (DVH_NODE_CLASS, "DiffKT3D dose c0 DVH")),
        (DVH_NODE_CLASS, "SetAndObserveDoseVolumeNode", (dose,)),
        (DVH_NODE_CLASS, "SetAndObserveSegmentationNode", (seg,)),
        (DVH_NODE_CLASS, "SetSelectedSegmentIDs", (["PTV70", "SpinalCord"],)),
        ("dvh_logic", "ComputeDvh", (node,)),
    ]
    failing = SlicerRTDisplay(FakeScene([]), Recorder("isodose_logic", []),
                              Recorder("dvh_logic", [], {"ComputeDvh": "Invalid dose volume"}))
    with pytest.raises(ValueError, match="SlicerRT DVH of DiffKT3D dose c0: Invalid dose volume"):
        failing.dvh(dose, seg, ["PTV70"])


def test_slicerrt_is_used_only_when_both_modules_are_there():
    isodose = types.SimpleNamespace(logic=lambda: "iso")
    dvh = types.SimpleNamespace(logic=lambda: "dvh")
    assert slicerrt_logics(types.SimpleNamespace(isodose=isodose, dosevolumehistogram=dvh)) == ("iso", "dvh")
    assert slicerrt_logics(types.SimpleNamespace(isodose=isodose)) is None
    assert slicerrt_logics(types.SimpleNamespace()) is None


def test_the_workflow_switches_between_slicerrt_and_its_own_display(slicer_core, scene, tmp_path, case_dir):
    from DiffKT3DLib.worker import InlineRunner
    from DiffKT3DLib.workflow import Workflow

    calls = []
    fake_rt = types.SimpleNamespace(isodose=lambda dose, rx, node=None: calls.append(("isodose", rx)) or "rt-node",
                                    dvh=lambda dose, seg, ids: calls.append(("dvh", tuple(ids))))
    wf = Workflow(scene, client=None, runner=InlineRunner(), work_dir=tmp_path, slicerrt=fake_rt)
    dose = wf.scene_logic.load_dose(case_dir / "dose.nii.gz", "DiffKT3D dose c0", 70.0, "c0")
    assert wf._isodose(dose, 70.0) == "rt-node"
    wf._dvh("c0", 0, dose, None, ["a"])
    assert calls == [("isodose", 70.0), ("dvh", ("a",))]
    assert scene.GetFirstNodeByName("DiffKT3D dose c0 isodose") is None  # no home-made isodose
    wf.close()
    own = Workflow(scene, client=None, runner=InlineRunner(), work_dir=tmp_path / "own")
    node = own._isodose(dose, 70.0)
    assert node.IsA("vtkMRMLSegmentationNode") and node.GetSegmentation().GetNumberOfSegments() == 5
    own.close()
