"""MRML side of the module: scene inputs -> request files, server results -> scene nodes.

The request export is `scene_inputs`, the node primitives both use are `scene_nodes`; this module
adds the display of results (dose, isodose, DVH, Scorecard, imputations) and is the entry point.

Everything here works on a `vtkMRMLScene` passed in (Slicer's `slicer.mrmlScene`, or a bare
scene from the `slicer-core` wheel in tests) and uses only MRML / segmentation-logic calls that
both provide; nothing needs `slicer.app`, Qt or SlicerRT. Runs on the main thread only.

Conventions (SlicerRT's where it has one, so SlicerRT and its users read our nodes as theirs):
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
import logging
from pathlib import Path
from typing import Any

import numpy as np
import slicer
from slicer import util as slicer_util

from . import dvh, roles, scorecard
from .constants import (
    ATTRIBUTE_PREFIX,
    CANDIDATE_ATTRIBUTE,
    CANDIDATE_LINE_STYLES,
    DOSE_COLOR_TABLE_NAME,
    DOSE_SCALE_GY,
    DOSE_VOLUME_ATTRIBUTE,
    DOSE_WINDOW_FRACTION,
    DVH_BIN_WIDTH_GY,
    DVH_DOSE_COLUMN,
    IMPUTED_ATTRIBUTE,
    ISODOSE_COLORS,
    ISODOSE_LEVELS_PCT,
    PRESCRIPTION_ATTRIBUTE,
    ROLE_ATTRIBUTE,
    SCORECARD_COLUMNS,
)
from .scene_inputs import SceneInputs

logger = logging.getLogger(__name__)

DVH_CHART_NAME = "DiffKT3D DVH"
COMPARISON_TABLE_NAME = "DiffKT3D Scorecard comparison"
REFERENCE_TABLE_NAME = "DiffKT3D dose comparison"


class SceneLogic(SceneInputs):
    """MRML operations of the module on one scene: the request export (`SceneInputs`) and the
    display of server results (below).

    Args:
        scene: vtkMRMLScene (slicer.mrmlScene in Slicer).
    """

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

    def reference_comparison_table(self, comparison: dict[str, Any]):
        """Candidates against the reference dose: gamma, dose and DVH score, Scorecard total; and the
        reference's Scorecard joins the side-by-side Scorecard table as column "reference score"."""
        columns, rows = scorecard.reference_rows(comparison)
        table = self._node_by_name_and_class(REFERENCE_TABLE_NAME, "vtkMRMLTableNode") or \
            self.scene.AddNewNodeByClass("vtkMRMLTableNode", REFERENCE_TABLE_NAME)
        self.fill_table(table, columns, rows)
        return table

    # ------------------------------------------------------------------------------------------
    # Imputation results
    # ------------------------------------------------------------------------------------------
    def load_imputed_volume(self, path: str | Path, name: str):
        """Imputed CT (HU) as a new scalar volume (grey window -1000..1000 HU)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        self.read_volume(path, node)
        node.SetAttribute(IMPUTED_ATTRIBUTE, "1")
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
                segment.SetTag(IMPUTED_ATTRIBUTE, "1")
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


def _hsv_to_rgb(h_deg: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h_deg / 360.0, s, v)
