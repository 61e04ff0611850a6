"""MRML side of the module: scene inputs -> request files, server results -> scene nodes.

Everything here works on a `vtkMRMLScene` passed in (Slicer's `slicer.mrmlScene`, or a bare
scene from the `slicer-core` wheel in tests) and uses only MRML / segmentation-logic calls that
both provide; nothing needs `slicer.app`, Qt or SlicerRT. Runs on the main thread only.

Conventions (SlicerRT's, and what its users ask for):
* the dose is a float32 vtkMRMLScalarVolumeNode in Gy with attribute DicomRtImport.DoseVolume="1",
  colour node Dose_ColorTable and a window of 0-110 % of the prescription;
* isodose levels are % of the prescription (80/90/100/105/110 %) with Eclipse-like colours, shown
  as a segmentation whose segments are "dose >= level" drawn as outlines (isodose lines) in 2D;
* DVH: one table per candidate (Dose [Gy] + one Volume [%] column per structure), one plot series
  per (candidate, structure) in colour of the segment with the candidate's line style, all in one
  plot chart;
* Scorecard: one table node per candidate (rows = items + Total), plus a comparison table.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from slicer import util as slicer_util

from . import dvh, roles, scorecard
from .constants import (
    ATTRIBUTE_PREFIX,
    BODY_FILE,
    CANDIDATE_ATTRIBUTE,
    CANDIDATE_LINE_STYLES,
    CT_FILE,
    DOSE_COLOR_TABLE_NAME,
    DOSE_SCALE_GY,
    DOSE_VOLUME_ATTRIBUTE,
    DOSE_WINDOW_FRACTION,
    DVH_BIN_WIDTH_GY,
    DVH_DOSE_COLUMN,
    IGNORE_ROLE,
    ISODOSE_COLORS,
    ISODOSE_LEVELS_PCT,
    PLAN_FILE,
    PRESCRIPTION_ATTRIBUTE,
    ROLE_ATTRIBUTE,
    SCORECARD_COLUMNS,
)

logger = logging.getLogger(__name__)

DVH_CHART_NAME = "DiffKT3D DVH"
COMPARISON_TABLE_NAME = "DiffKT3D Scorecard comparison"


@dataclass
class ExportedCase:
    """Files written for one request (case-folder layout, docs/request-format.md).

    Args:
        folder: the folder holding the files.
        files: file name -> path (ct.nii.gz, body.nii.gz, <stem>.nii.gz, plan.json).
        stems: segment id -> file stem of its mask (structure name on the server side).
        plan: the plan.json content.
    """

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    stems: dict[str, str] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)

    def segment_id_of(self, structure: str) -> str | None:
        """Segment id whose mask the server calls `structure` (None if unknown)."""
        for sid, stem in self.stems.items():
            if stem == structure:
                return sid
        return None


class SceneLogic:
    """MRML operations of the module on one scene.

    Args:
        scene: vtkMRMLScene (slicer.mrmlScene in Slicer).
    """

    def __init__(self, scene):
        self.scene = scene

    # ------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------
    def segment_roles(self, segmentation_node) -> list[roles.StructureRole]:
        """Role of every segment: the one stored on the segment (user edit) or the name default."""
        segmentation = segmentation_node.GetSegmentation()
        out = []
        for i in range(segmentation.GetNumberOfSegments()):
            sid = segmentation.GetNthSegmentID(i)
            segment = segmentation.GetSegment(sid)
            r = roles.default_role(sid, segment.GetName())
            role_tag, rx_tag = vtk.mutable(""), vtk.mutable("")
            if segment.GetTag(ROLE_ATTRIBUTE, role_tag) and str(role_tag):
                r.role = str(role_tag)
                r.prescription_gy = None
            if segment.GetTag(PRESCRIPTION_ATTRIBUTE, rx_tag) and str(rx_tag):
                r.prescription_gy = float(str(rx_tag))
            out.append(r)
        return out

    def store_roles(self, segmentation_node, structure_roles: list[roles.StructureRole]) -> None:
        """Keep the user's roles as segment tags (saved with the scene)."""
        segmentation = segmentation_node.GetSegmentation()
        for r in structure_roles:
            r.validate()
            segment = segmentation.GetSegment(r.segment_id)
            if segment is None:
                raise ValueError(f"segment {r.name!r} ({r.segment_id}) is not in {segmentation_node.GetName()}")
            segment.SetTag(ROLE_ATTRIBUTE, r.role)
            segment.SetTag(PRESCRIPTION_ATTRIBUTE, "" if r.prescription_gy is None else repr(r.prescription_gy))

    def export_case(self, ct_node, segmentation_node, structure_roles: list[roles.StructureRole],
                    folder: str | Path) -> ExportedCase:
        """Write the CT and the used segments (on the CT grid) as a case folder for the server.

        Args:
            ct_node: scalar volume in HU (None for a request without CT, e.g. CT imputation).
            segmentation_node: segmentation holding the structures.
            structure_roles: role per segment; "ignore" segments are not written.
            folder: output folder (created).

        Raises:
            ValueError: no reference volume, a volume under a transform, an empty target, or
                a segment export failure; the message names the node / segment.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = ExportedCase(folder=folder)
        for node in (ct_node, segmentation_node):
            if node is not None and node.GetParentTransformNode() is not None:
                raise ValueError(f"{node.GetName()} is under a transform: harden it first "
                                 "(the server needs the data on its own grid)")
        reference = ct_node
        if ct_node is not None:
            if ct_node.GetImageData() is None:
                raise ValueError(f"CT volume {ct_node.GetName()} has no image data")
            self.write_volume(ct_node, folder / CT_FILE)
            out.files[CT_FILE] = folder / CT_FILE
        else:
            reference = self.reference_volume(segmentation_node)
        taken: set[str] = set()
        for r in structure_roles:
            r.validate()
            if r.role == IGNORE_ROLE:
                continue
            mask = self.segment_mask(segmentation_node, r.segment_id, reference)
            if r.role == "target" and not mask.any():
                raise ValueError(f"target segment {r.name!r} is empty (no voxels on the CT grid)")
            if r.role == "body":
                name = BODY_FILE
            else:
                stem = roles.file_stem(r.name, taken)
                out.stems[r.segment_id] = stem
                name = f"{stem}.nii.gz"
            self.write_array(mask.astype(np.uint8), reference, folder / name)
            out.files[name] = folder / name
        out.plan = roles.request_plan(structure_roles, out.stems)
        (folder / PLAN_FILE).write_text(json.dumps(out.plan, indent=2))
        out.files[PLAN_FILE] = folder / PLAN_FILE
        return out

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

    # ------------------------------------------------------------------------------------------
    # Dose
    # ------------------------------------------------------------------------------------------
    def load_dose(self, path: str | Path, name: str, prescription_gy: float | None,
                  candidate_id: str = "", node=None):
        """Load a dose NIfTI (Gy) as a SlicerRT-style dose volume.

        Args:
            path: NIfTI from the server (float32 Gy on the request grid).
            name: node name.
            prescription_gy: sets the window (0-110 % Rx); None -> 0..DOSE_SCALE_GY.
            candidate_id: stored as node attribute.
            node: existing volume node to update (preview), else a new one.

        Returns:
            the vtkMRMLScalarVolumeNode.
        """
        if node is None or node.GetScene() is None:  # none yet, or removed (scene closed)
            node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        self.read_volume(path, node)
        array = slicer_util.arrayFromVolume(node)
        if array.dtype != np.float32:  # e.g. an integer file with scl_slope read raw
            slicer_util.updateVolumeFromArray(node, array.astype(np.float32))
        node.SetAttribute(DOSE_VOLUME_ATTRIBUTE, "1")
        if candidate_id:
            node.SetAttribute(CANDIDATE_ATTRIBUTE, candidate_id)
        if prescription_gy is not None:
            node.SetAttribute(PRESCRIPTION_ATTRIBUTE, repr(float(prescription_gy)))
        self.style_dose(node, prescription_gy)
        return node

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

    def style_dose(self, dose_node, prescription_gy: float | None) -> None:
        """Dose colour table, window 0-110 % of the prescription, colour legend."""
        if dose_node.GetDisplayNode() is None:
            dose_node.CreateDefaultDisplayNodes()
        display = dose_node.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.dose_color_table().GetID())
        top_gy = DOSE_SCALE_GY if prescription_gy is None else DOSE_WINDOW_FRACTION[1] * prescription_gy
        low_gy = 0.0 if prescription_gy is None else DOSE_WINDOW_FRACTION[0] * prescription_gy
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low_gy, top_gy)
        self._color_legend(dose_node, "Dose [Gy]")

    def dose_color_table(self):
        """SlicerRT's Dose_ColorTable if present, else an equivalent rainbow made once."""
        existing = self.scene.GetFirstNodeByName(DOSE_COLOR_TABLE_NAME)
        if existing is not None and existing.IsA("vtkMRMLColorNode"):
            return existing
        table = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", DOSE_COLOR_TABLE_NAME)
        table.SetTypeToUser()
        n = 256
        table.SetNumberOfColors(n)
        for i in range(n):
            # blue (240 deg) -> red (0 deg) through cyan, green, yellow: the usual dose wash.
            r, g, b = _hsv_to_rgb(240.0 * (1.0 - i / (n - 1)), 1.0, 1.0)
            table.SetColor(i, f"{i}", r, g, b, 0.0 if i == 0 else 1.0)  # 0 Gy transparent
        table.SetAttribute(ATTRIBUTE_PREFIX + "Generated", "1")
        return table

    def _color_legend(self, displayable_node, title: str) -> None:
        for i in range(displayable_node.GetNumberOfDisplayNodes()):
            if displayable_node.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode"):
                return
        # Created directly: a bare scene (no Colors module) has not registered this class.
        legend = self.scene.AddNode(slicer.vtkMRMLColorLegendDisplayNode())
        legend.SetAndObservePrimaryDisplayNode(displayable_node.GetDisplayNode())
        legend.SetTitleText(title)
        displayable_node.AddAndObserveDisplayNodeID(legend.GetID())

    def update_isodose(self, dose_node, prescription_gy: float,
                       levels_pct: tuple[float, ...] = ISODOSE_LEVELS_PCT, node=None):
        """Isodose segmentation: one segment per level, voxels with dose >= level % of Rx.

        Returns:
            the vtkMRMLSegmentationNode ("<dose> isodose"), outlines only in 2D.
        """
        if not prescription_gy or prescription_gy <= 0:
            raise ValueError(f"isodose levels need a prescription > 0 Gy, got {prescription_gy}")
        if node is None or node.GetScene() is None:  # none yet, or removed (scene closed)
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{dose_node.GetName()} isodose")
        node.SetReferenceImageGeometryParameterFromVolumeNode(dose_node)
        node.GetSegmentation().RemoveAllSegments()
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        dose = slicer_util.arrayFromVolume(dose_node)
        for pct in levels_pct:
            level_gy = pct / 100.0 * prescription_gy
            sid = self.add_segment_from_array(node, (dose >= level_gy).astype(np.uint8), dose_node,
                                              f"{pct:g} % ({level_gy:.1f} Gy)")
            color = ISODOSE_COLORS.get(pct, (1.0, 1.0, 1.0))
            node.GetSegmentation().GetSegment(sid).SetColor(*color)
            node.GetSegmentation().GetSegment(sid).SetTag(ATTRIBUTE_PREFIX + "IsodosePct", f"{pct:g}")
        display = node.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.SetVisibility3D(False)
        node.SetAttribute(ATTRIBUTE_PREFIX + "IsodoseOf", dose_node.GetID())
        return node

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

    # ------------------------------------------------------------------------------------------
    # DVH
    # ------------------------------------------------------------------------------------------
    def update_dvh(self, candidate_id: str, candidate_index: int, dose_node, segmentation_node,
                   segment_ids: list[str], bin_width_gy: float = DVH_BIN_WIDTH_GY):
        """DVH table + plot series of one candidate, added to the shared DVH chart.

        Args:
            candidate_id: label of the candidate (series and table names).
            candidate_index: picks the line style (one per candidate).
            dose_node: the candidate's dose volume (Gy).
            segmentation_node: structures; masks are resampled on the dose grid.
            segment_ids: segments to plot (empty ones are skipped with a log line).

        Returns:
            (chart node, table node).
        """
        dose = slicer_util.arrayFromVolume(dose_node)
        levels = dvh.dose_levels(float(dose.max()), bin_width_gy)
        columns: dict[str, np.ndarray] = {DVH_DOSE_COLUMN: levels}
        colors: dict[str, tuple[float, float, float]] = {}
        segmentation = segmentation_node.GetSegmentation()
        for sid in segment_ids:
            segment = segmentation.GetSegment(sid)
            mask = self.segment_mask(segmentation_node, sid, dose_node)
            if not mask.any():
                logger.info("DVH: segment %s is empty on the dose grid, skipped", segment.GetName())
                continue
            column = f"{segment.GetName()} Volume [%]"
            columns[column] = dvh.cumulative_dvh(dose, mask, levels)
            colors[column] = tuple(segment.GetColor())
        table_name = f"DVH {candidate_id}"
        table = self._node_by_name_and_class(table_name, "vtkMRMLTableNode") or \
            self.scene.AddNewNodeByClass("vtkMRMLTableNode", table_name)
        self.fill_table(table, list(columns), list(zip(*columns.values(), strict=True)))
        table.SetAttribute(CANDIDATE_ATTRIBUTE, candidate_id)
        chart = self.dvh_chart()
        style = CANDIDATE_LINE_STYLES[candidate_index % len(CANDIDATE_LINE_STYLES)]
        for column, color in colors.items():
            series_name = f"{column.removesuffix(' Volume [%]')} ({candidate_id})"
            series = self._node_by_name_and_class(series_name, "vtkMRMLPlotSeriesNode") or \
                self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", series_name)
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName(DVH_DOSE_COLUMN)
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            line_style = series.GetLineStyleFromString(style)
            if line_style < 0:
                raise ValueError(f"unknown plot line style {style!r}")
            series.SetLineStyle(line_style)
            series.SetColor(*color)
            series.SetAttribute(CANDIDATE_ATTRIBUTE, candidate_id)
            if not chart.HasPlotSeriesNodeID(series.GetID()):
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return chart, table

    def dvh_chart(self):
        chart = self._node_by_name_and_class(DVH_CHART_NAME, "vtkMRMLPlotChartNode")
        if chart is None:
            chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", DVH_CHART_NAME)
            chart.SetTitle("Cumulative DVH")
            chart.SetXAxisTitle(DVH_DOSE_COLUMN)
            chart.SetYAxisTitle("Volume [%]")
        return chart

    # ------------------------------------------------------------------------------------------
    # Scorecard
    # ------------------------------------------------------------------------------------------
    def scorecard_table(self, candidate_id: str, result: dict[str, Any]):
        """Scorecard table node of one candidate ("Scorecard <id>"), rows = items + Total."""
        name = f"Scorecard {candidate_id}"
        table = self._node_by_name_and_class(name, "vtkMRMLTableNode") or \
            self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        self.fill_table(table, list(SCORECARD_COLUMNS), scorecard.scorecard_rows(result))
        table.SetAttribute(CANDIDATE_ATTRIBUTE, candidate_id)
        return table

    def comparison_table(self, results: dict[str, dict[str, Any]]):
        """Side-by-side candidate Scorecards (one score column per candidate)."""
        columns, rows = scorecard.comparison_rows(results)
        table = self._node_by_name_and_class(COMPARISON_TABLE_NAME, "vtkMRMLTableNode") or \
            self.scene.AddNewNodeByClass("vtkMRMLTableNode", COMPARISON_TABLE_NAME)
        self.fill_table(table, columns, rows)
        return table

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

    # ------------------------------------------------------------------------------------------
    # Imputation results
    # ------------------------------------------------------------------------------------------
    def load_imputed_volume(self, path: str | Path, name: str):
        """Imputed CT (HU) as a new scalar volume (grey window -1000..1000 HU)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        self.read_volume(path, node)
        node.SetAttribute(ATTRIBUTE_PREFIX + "Imputed", "1")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(-1000.0, 1000.0)
        return node

    def add_imputed_labelmap(self, segmentation_node, labelmap_path: str | Path,
                             labels: dict[str, int], reference_node) -> dict[str, str]:
        """Add the structures of an imputed label map as segments "<name> (imputed)".

        Args:
            labelmap_path: uint8 NIfTI on the request grid (docs/request-format.md §6).
            labels: structure name -> label value.
            reference_node: the request's reference volume (its grid must match).

        Returns:
            structure name -> new segment id (structures with no voxel are skipped).
        """
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "__DiffKT3D_temp__")
        try:
            self.read_volume(labelmap_path, node)
            labelmap = slicer_util.arrayFromVolume(node)
            ref_shape = slicer_util.arrayFromVolume(reference_node).shape
            if labelmap.shape != ref_shape:
                raise ValueError(f"imputed label map {Path(labelmap_path).name} has shape {labelmap.shape}, "
                                 f"the reference volume {reference_node.GetName()} has {ref_shape}")
            out = {}
            for name, value in labels.items():
                mask = labelmap == int(value)
                if not mask.any():
                    logger.info("imputed structure %s has no voxel in the label map: skipped", name)
                    continue
                sid = self.add_segment_from_array(segmentation_node, mask, node, f"{name} (imputed)")
                segment = segmentation_node.GetSegmentation().GetSegment(sid)
                segment.SetTag(ATTRIBUTE_PREFIX + "Imputed", "1")
                role, rx = roles.infer_role(name)
                segment.SetTag(ROLE_ATTRIBUTE, role)
                segment.SetTag(PRESCRIPTION_ATTRIBUTE, "" if rx is None else repr(rx))
                out[name] = sid
            return out
        finally:
            self._remove_with_display(node)

    # ------------------------------------------------------------------------------------------
    # Views (no-ops on a headless scene: it has no slice composite nodes)
    # ------------------------------------------------------------------------------------------
    def show_in_slice_views(self, background_node, foreground_node, opacity: float = 0.5) -> int:
        """Show CT under the dose in every slice view; returns the number of views set."""
        composites = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        n = composites.GetNumberOfItems()
        for i in range(n):
            comp = composites.GetItemAsObject(i)
            if background_node is not None:
                comp.SetBackgroundVolumeID(background_node.GetID())
            comp.SetForegroundVolumeID(foreground_node.GetID() if foreground_node is not None else None)
            comp.SetForegroundOpacity(opacity)
        return n

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------
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


def _hsv_to_rgb(h_deg: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h_deg / 360.0, s, v)
