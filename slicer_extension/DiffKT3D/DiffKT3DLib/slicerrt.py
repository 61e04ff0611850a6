"""SlicerRT's Isodose and Dose Volume Histogram modules for our doses, when SlicerRT is installed.

RT users know SlicerRT's isodose lines and surfaces (levels editable in its panel) and its DVH
(V / D metrics, CSV export). When Slicer has SlicerRT, the module hands each dose to them; without
it, the module's own isodose segmentation and DVH tables (scene.py) stay the display. Our dose
volumes already carry what SlicerRT's modules check (`DicomRtImport.DoseVolume` = "1", Gy), and
the isodose levels are given as % of the prescription in SlicerRT's relative representation.

The logics are passed in (`slicer.modules.isodose.logic()`, `slicer.modules.dosevolumehistogram
.logic()` in Slicer), so tests can check the exact calls without SlicerRT, which has no PyPI
package. The calls follow SlicerRT's `vtkSlicerIsodoseModuleLogic`, `vtkMRMLIsodoseNode`,
`vtkSlicerDoseVolumeHistogramModuleLogic` and `vtkMRMLDoseVolumeHistogramNode`.
"""

from __future__ import annotations

import logging
from typing import Any

from .constants import DOSE_VOLUME_ATTRIBUTE, ISODOSE_COLORS, ISODOSE_LEVELS_PCT

logger = logging.getLogger(__name__)

ISODOSE_NODE_CLASS = "vtkMRMLIsodoseNode"
DVH_NODE_CLASS = "vtkMRMLDoseVolumeHistogramNode"


def slicerrt_logics(modules: Any) -> tuple[Any, Any] | None:
    """(isodose logic, DVH logic) from `slicer.modules` when SlicerRT is installed, else None."""
    isodose, dvh = getattr(modules, "isodose", None), getattr(modules, "dosevolumehistogram", None)
    if isodose is None or dvh is None:
        return None
    return isodose.logic(), dvh.logic()


class SlicerRTDisplay:
    """Isodose lines and DVH of a dose through SlicerRT's own logic.

    Args:
        scene: the vtkMRMLScene.
        isodose_logic, dvh_logic: SlicerRT's module logics (see `slicerrt_logics`).
    """

    def __init__(self, scene, isodose_logic, dvh_logic):
        self.scene = scene
        self.isodose_logic = isodose_logic
        self.dvh_logic = dvh_logic

    def isodose(self, dose_node, prescription_gy: float, levels_pct: tuple[float, ...] = ISODOSE_LEVELS_PCT,
                node=None):
        """Isodose lines of `dose_node` at `levels_pct` % of the prescription (SlicerRT's isodose node).

        Raises:
            ValueError: no prescription, or SlicerRT failed to make the isodose surfaces.
        """
        if not prescription_gy or prescription_gy <= 0:
            raise ValueError(f"isodose levels need a prescription > 0 Gy, got {prescription_gy}")
        dose_node.SetAttribute(DOSE_VOLUME_ATTRIBUTE, "1")  # what SlicerRT's modules accept as a dose
        if node is None or node.GetScene() is None:
            node = self.scene.AddNewNodeByClass(ISODOSE_NODE_CLASS, f"{dose_node.GetName()} isodose")
        node.SetAndObserveDoseVolumeNode(dose_node)
        colors = self.isodose_logic.SetupColorTableNodeForDoseVolumeNode(dose_node)
        node.SetAndObserveColorTableNode(colors)
        node.SetDoseUnits(node.Gy)
        node.SetRelativeRepresentationFlag(True)  # levels in % of ReferenceDoseValue
        node.SetReferenceDoseValue(float(prescription_gy))
        self.isodose_logic.SetNumberOfIsodoseLevels(node, len(levels_pct))
        for i, pct in enumerate(levels_pct):  # SlicerRT reads each level from its colour's name
            r, g, b = ISODOSE_COLORS.get(pct, (1.0, 1.0, 1.0))
            colors.SetColor(i, f"{pct:g}", r, g, b, 1.0)
        node.SetShowIsodoseLines(True)
        node.SetShowIsodoseSurfaces(False)
        if not self.isodose_logic.CreateIsodoseSurfaces(node):
            raise ValueError(f"SlicerRT could not make the isodose lines of {dose_node.GetName()}")
        return node

    def dvh(self, dose_node, segmentation_node, segment_ids: list[str], node=None):
        """SlicerRT's DVH of the listed segments (its tables, chart and metrics panel).

        Raises:
            ValueError: SlicerRT's error message.
        """
        dose_node.SetAttribute(DOSE_VOLUME_ATTRIBUTE, "1")
        if node is None or node.GetScene() is None:
            node = self.scene.AddNewNodeByClass(DVH_NODE_CLASS, f"{dose_node.GetName()} DVH")
        node.SetAndObserveDoseVolumeNode(dose_node)
        node.SetAndObserveSegmentationNode(segmentation_node)
        node.SetSelectedSegmentIDs(list(segment_ids))
        error = self.dvh_logic.ComputeDvh(node)
        if error:
            raise ValueError(f"SlicerRT DVH of {dose_node.GetName()}: {error}")
        return node
