"""DiffKT3D: dose prediction with a clinical Scorecard from a DiffKT3D MONAI Label server.

Metadata and wiring only; the logic is in DiffKT3DLib (plain Python, tested on slicer-core).
"""

import os

import slicer
from DiffKT3DLib.client import DiffKT3DClient
from DiffKT3DLib.slicerrt import SlicerRTDisplay, slicerrt_logics
from DiffKT3DLib.worker import ThreadRunner
from DiffKT3DLib.workflow import Workflow
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class DiffKT3D(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DiffKT3D"
        self.parent.categories = ["Radiotherapy"]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffKT3D developers"]
        self.parent.helpText = (
            "Predict a radiotherapy dose from the CT and structures in the scene with a DiffKT3D server, "
            "judge it on the institutional Scorecard, compare candidates, record the preferred one, "
            "impute a missing CT / PTV / OAR, and preview how editing a segment changes the dose. "
            "See docs/slicer.md in the DiffKT3D repository.")
        self.parent.acknowledgementText = (
            "Uses SlicerRT's Isodose and Dose Volume Histogram modules when installed. OpenKBP data: Babier et al., Med Phys 48:5549 (2021).")


class DiffKT3DWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from DiffKT3DLib.panel import Panel  # imports qt: only inside Slicer

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffKT3D.ui"))
        self.layout.addWidget(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DiffKT3DLogic()
        self.panel = Panel(slicer.util.childWidgetVariables(uiWidget), self.logic.workflow)

    def cleanup(self):
        self.panel.cleanup()


class DiffKT3DLogic(ScriptedLoadableModuleLogic):
    """Holds the Lib workflow (server client + worker thread + scene logic) for scripting."""

    def __init__(self, serverUrl=None):
        ScriptedLoadableModuleLogic.__init__(self)
        logics = slicerrt_logics(slicer.modules)  # SlicerRT's isodose and DVH when it is installed
        self.workflow = Workflow(slicer.mrmlScene, DiffKT3DClient(serverUrl), ThreadRunner(),
                                 slicerrt=SlicerRTDisplay(slicer.mrmlScene, *logics) if logics else None)


class DiffKT3DTest(ScriptedLoadableModuleTest):
    """Same flow as test_module_selftest_flow in tests/slicer_extension/test_workflow_server.py, inside Slicer.

    Needs a running server (DIFFKT3D_SERVER_URL, default http://127.0.0.1:8000) and a case folder
    (DIFFKT3D_TEST_CASE, default: the first case in the repository's sample-data/).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DoseFlow()

    def test_DoseFlow(self):
        from pathlib import Path

        from DiffKT3DLib.selftest import run_flow

        case = os.environ.get("DIFFKT3D_TEST_CASE")
        if not case:
            sample = Path(__file__).resolve().parents[2] / "sample-data"
            cases = sorted(p for p in sample.glob("*") if (p / "ct.nii.gz").exists())
            self.assertTrue(cases, f"no case folder in {sample}; set DIFFKT3D_TEST_CASE")
            case = str(cases[0])
        self.delayDisplay(f"Running the DiffKT3D flow on {case}")
        summary = run_flow(slicer.mrmlScene, case, os.environ.get("DIFFKT3D_SERVER_URL", ""),
                           tick=slicer.app.processEvents)
        self.delayDisplay(f"Test passed: {summary}")
