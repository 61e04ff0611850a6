"""Scene inputs -> request files: segment roles, and the CT plus used segments written as a case
folder (docs/request-format.md) for the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import vtk

from . import roles
from .constants import (
    BODY_FILE,
    CT_FILE,
    DOSE_FILE,
    IGNORE_ROLE,
    PLAN_FILE,
    PRESCRIPTION_ATTRIBUTE,
    ROLE_ATTRIBUTE,
)
from .scene_nodes import SceneNodes


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


class SceneInputs(SceneNodes):
    """Reads what the user set up in the scene and writes it as a request."""

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

    def export_reference_dose(self, dose_node, ct_node, exported: ExportedCase) -> None:
        """Add the reference dose (Gy) to an exported case as dose.nii.gz, for the server to compare with.

        Raises:
            ValueError: no CT, or the dose is not on the CT's grid (the server compares voxel by voxel;
                resample it onto the CT first, e.g. with Resample Scalar/Vector/DWI Volume).
        """
        if ct_node is None:
            raise ValueError("a comparison with a reference dose needs the CT (the dose must lie on its grid)")
        if dose_node.GetParentTransformNode() is not None:
            raise ValueError(f"{dose_node.GetName()} is under a transform: harden it first")
        ct_matrix, dose_matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        ct_node.GetIJKToRASMatrix(ct_matrix)
        dose_node.GetIJKToRASMatrix(dose_matrix)
        same_grid = dose_node.GetImageData() is not None and \
            dose_node.GetImageData().GetDimensions() == ct_node.GetImageData().GetDimensions() and \
            all(abs(ct_matrix.GetElement(i, j) - dose_matrix.GetElement(i, j)) < 1e-3
                for i in range(4) for j in range(4))
        if not same_grid:
            raise ValueError(f"reference dose {dose_node.GetName()} is not on the grid of CT {ct_node.GetName()} "
                             "(dimensions or geometry differ): resample it onto the CT first")
        self.write_volume(dose_node, exported.folder / DOSE_FILE)
        exported.files[DOSE_FILE] = exported.folder / DOSE_FILE
