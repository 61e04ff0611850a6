"""MRML primitives the module's scene logic is built from: volumes and segments to and from arrays
and files, table contents, node lookups.

Works on a `vtkMRMLScene` passed in (Slicer's `slicer.mrmlScene`, or a bare scene from the
`slicer-core` wheel in tests) with MRML / segmentation-logic calls that both provide; temporary
nodes are always removed again, so the user's scene only gains the nodes the logic returns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from slicer import util as slicer_util


class SceneNodes:
    """Node-level operations on one scene, shared by the request export and the result display.

    Args:
        scene: vtkMRMLScene (slicer.mrmlScene in Slicer).
    """

    def __init__(self, scene):
        self.scene = scene

    @staticmethod
    def reference_volume(segmentation_node):
        """The volume that defines the segmentation's grid.

        Raises:
            ValueError: the segmentation has none (then a CT must be selected).
        """
        reference = segmentation_node.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if reference is None:
            raise ValueError(f"segmentation {segmentation_node.GetName()} has no reference volume: "
                             "select a CT or set the segmentation geometry from a volume")
        return reference

    def segment_mask(self, segmentation_node, segment_id: str, reference_node) -> np.ndarray:
        """(K, J, I) uint8 mask of one segment resampled on `reference_node`'s grid."""
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DiffKT3D_temp__")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_node)
            if not ok:
                raise ValueError(f"could not export segment {segment_id} of {segmentation_node.GetName()}")
            return (slicer_util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
        finally:
            self._remove_with_display(labelmap)

    def write_volume(self, volume_node, path: Path) -> None:
        """Write a volume node to NIfTI (ITK writer: RAS node geometry -> NIfTI affine)."""
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            storage.SetUseCompression(1)
            if not storage.WriteData(volume_node):
                raise ValueError(f"could not write {volume_node.GetName()} to {path}")
        finally:
            self.scene.RemoveNode(storage)

    def write_array(self, array: np.ndarray, reference_node, path: Path) -> None:
        """Write a (K, J, I) array with `reference_node`'s geometry to NIfTI."""
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "__DiffKT3D_temp__")
        try:
            self._copy_geometry(reference_node, node)
            slicer_util.updateVolumeFromArray(node, array)
            self.write_volume(node, path)
        finally:
            self._remove_with_display(node)

    def read_volume(self, path: str | Path, node) -> None:
        """Read a NIfTI/NRRD file into `node`; the node keeps no link to the (temporary) file."""
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            if not storage.ReadData(node):
                raise ValueError(f"could not read a volume from {path}")
        finally:
            self.scene.RemoveNode(storage)
        node.SetAndObserveStorageNodeID(None)

    def add_segment_from_array(self, segmentation_node, mask: np.ndarray, reference_node, name: str) -> str:
        """Add a segment from a (K, J, I) mask on `reference_node`'s grid; returns its id."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DiffKT3D_temp__")
        try:
            self._copy_geometry(reference_node, labelmap)
            slicer_util.updateVolumeFromArray(labelmap, (mask > 0).astype(np.uint8))
            segmentation = segmentation_node.GetSegmentation()
            before = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmap, segmentation_node):
                raise ValueError(f"could not add segment {name!r} to {segmentation_node.GetName()}")
            new = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                   if segmentation.GetNthSegmentID(i) not in before]
            if not new:  # an empty mask imports no segment: add an empty one so the name exists
                sid = segmentation.AddEmptySegment("", name)
            else:
                sid = new[0]
            segmentation.GetSegment(sid).SetName(name)
            return sid
        finally:
            self._remove_with_display(labelmap)

    @staticmethod
    def fill_table(table_node, columns: list[str], rows: list) -> None:
        """Replace a table node's content; a column is numeric when all its values are numbers."""
        table = table_node.GetTable()
        was_modifying = table_node.StartModify()
        table.Initialize()
        for c, name in enumerate(columns):
            values = [row[c] for row in rows]
            numeric = all(isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                          for v in values)
            array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
            array.SetName(name)
            array.SetNumberOfValues(len(values))
            for i, v in enumerate(values):
                array.SetValue(i, float(v) if numeric else _cell_text(v))
            table.AddColumn(array)
        table_node.Modified()
        table_node.EndModify(was_modifying)

    def _node_by_name_and_class(self, name: str, class_name: str):
        nodes = self.scene.GetNodesByClassByName(class_name, name)
        return nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() else None

    def _remove_with_display(self, node) -> None:
        for i in range(node.GetNumberOfDisplayNodes()):
            display = node.GetNthDisplayNode(i)
            if display is not None:
                self.scene.RemoveNode(display)
        self.scene.RemoveNode(node)

    @staticmethod
    def _copy_geometry(source, target) -> None:
        matrix = vtk.vtkMatrix4x4()
        source.GetIJKToRASMatrix(matrix)
        target.SetIJKToRASMatrix(matrix)


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)
