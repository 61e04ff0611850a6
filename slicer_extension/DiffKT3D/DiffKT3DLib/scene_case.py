"""A case folder into the scene, and the subject hierarchy: results live in the CT's study.

In Slicer a planner browses data in the Data module's subject hierarchy (patient -> study ->
series). Doses, isodose lines and imputed volumes the module makes are put in the study of the CT
they were computed on, so they sit next to the images they belong to and move / save with them. A
CT that is not in a study yet (loaded from NIfTI, not from DICOM) gets a patient and study named
after it. Uses `vtkMRMLSubjectHierarchyNode` only (present in slicer-core as in Slicer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import slicer

from . import roles
from .constants import (
    ATTRIBUTE_PREFIX,
    CT_FILE,
    DOSE_FILE,
    DOSE_VOLUME_ATTRIBUTE,
    IMPUTED_ATTRIBUTE,
    IMPUTED_BY_ATTRIBUTE,
    PLAN_FILE,
    PRESCRIPTION_ATTRIBUTE,
    ROLE_ATTRIBUTE,
)

logger = logging.getLogger(__name__)

CASE_ATTRIBUTE = ATTRIBUTE_PREFIX + "CaseId"
REFERENCE_DOSE_NAME = "reference dose"


@dataclass
class LoadedCase:
    """Nodes of a case loaded from a folder: CT (None if the case has none), structures, and the
    case's own dose (the reference a prediction is compared with) when it has one."""

    case_id: str
    ct_node: object | None
    segmentation_node: object
    reference_dose_node: object | None = None


def _subject_hierarchy(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def _item_of(sh, node) -> int:
    """The node's subject-hierarchy item (created when no plugin logic made one, as on slicer-core)."""
    item = sh.GetItemByDataNode(node)
    return item or sh.CreateItem(sh.GetSceneItemID(), node)


def study_of(scene, node, create: bool = True) -> int:
    """The study item holding `node` (its parent's study); with `create`, a new patient + study
    named after the node when it has none. Returns 0 when there is none and `create` is False."""
    sh = _subject_hierarchy(scene)
    item = _item_of(sh, node)
    parent = sh.GetItemParent(item)
    while parent and parent != sh.GetSceneItemID():
        if sh.GetItemLevel(parent) == slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy():
            return parent
        parent = sh.GetItemParent(parent)
    if not create:
        return 0
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), node.GetName())
    study = sh.CreateStudyItem(patient, "DiffKT3D")
    sh.SetItemParent(item, study)
    return study


def place_in_study_of(scene, node, anchor_node) -> int:
    """Move `node` into the study of `anchor_node` (the CT, or the segmentation when there is no
    CT); returns the study item (0 when there is no anchor)."""
    if anchor_node is None or node is None:
        return 0
    study = study_of(scene, anchor_node)
    sh = _subject_hierarchy(scene)
    sh.SetItemParent(_item_of(sh, node), study)
    return study


def load_case_folder(scene, folder: str | Path, structures: tuple[str, ...] | None = None,
                     as_case: bool = False) -> LoadedCase:
    """Load a case folder (ct.nii.gz, one mask per structure, optional plan.json and dose.nii.gz).

    Each `<Name>.nii.gz` becomes segment `<Name>`; roles and prescriptions come from plan.json when
    it names them, else from the names (stored as segment tags, like the user's own choices). A
    structure plan.json marks `imputed_by` (e.g. written by `diffkt3d impute --write-case`) keeps its
    name and gets the tags `Imputed` = "1" and `ImputedBy` = the model version, as the module's own
    imputations do, so it is not taken for a clinician's contour.
    `as_case` (a case fetched from the server): node names start with the case id, the case's
    dose.nii.gz is loaded as a dose volume ("<case> reference dose") and all nodes go into one
    patient / study named after the case.
    """
    folder = Path(folder)
    case_id = folder.name
    ct = None
    if (folder / CT_FILE).exists():
        ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{case_id} CT" if as_case else "CT")
        _read(scene, folder / CT_FILE, ct)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{case_id} structures" if as_case else "Structures")
    if ct is not None:
        seg.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    names = structures or tuple(sorted(p.name[:-7] for p in folder.glob("*.nii.gz")
                                       if p.name not in (CT_FILE, DOSE_FILE)))
    for name in names:
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        _read(scene, folder / f"{name}.nii.gz", labelmap)
        if ct is None and seg.GetSegmentation().GetNumberOfSegments() == 0:
            seg.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
        segmentation = seg.GetSegmentation()
        before = segmentation.GetNumberOfSegments()
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg):
            raise ValueError(f"case {case_id}: could not import {name}.nii.gz as a segment")
        if segmentation.GetNumberOfSegments() > before:
            segmentation.GetSegment(segmentation.GetNthSegmentID(before)).SetName(name)
        scene.RemoveNode(labelmap)
    _tag_roles(seg, _plan_roles(folder))
    loaded = LoadedCase(case_id, ct, seg)
    if as_case and (folder / DOSE_FILE).exists():
        dose = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{case_id} {REFERENCE_DOSE_NAME}")
        _read(scene, folder / DOSE_FILE, dose)
        dose.SetAttribute(DOSE_VOLUME_ATTRIBUTE, "1")
        loaded.reference_dose_node = dose
    if as_case:
        anchor = ct if ct is not None else seg
        for node in (anchor, seg, loaded.reference_dose_node):
            if node is not None:
                node.SetAttribute(CASE_ATTRIBUTE, case_id)
        sh = _subject_hierarchy(scene)
        patient = sh.CreateSubjectItem(sh.GetSceneItemID(), case_id)
        study = sh.CreateStudyItem(patient, "DiffKT3D")
        for node in (anchor, seg, loaded.reference_dose_node):
            if node is not None:
                sh.SetItemParent(_item_of(sh, node), study)
    return loaded


def _plan_roles(folder: Path) -> dict[str, tuple[str, float | None, str | None]]:
    """{structure: (role, prescription Gy, imputed_by)} from plan.json's `structures` (empty when absent)."""
    path = folder / PLAN_FILE
    if not path.exists():
        return {}
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"case {folder.name}: {PLAN_FILE} is not readable JSON ({exc})") from None
    out = {}
    for name, entry in (plan.get("structures") or {}).items():
        if isinstance(entry, dict) and entry.get("role"):
            rx, by = entry.get("prescription_gy"), entry.get("imputed_by")
            out[str(name)] = (str(entry["role"]), float(rx) if rx is not None else None, str(by) if by else None)
    return out


def _tag_roles(seg, plan_roles: dict[str, tuple[str, float | None, str | None]]) -> None:
    if not plan_roles:
        return
    segmentation = seg.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetSegment(segmentation.GetNthSegmentID(i))
        role, rx, imputed_by = plan_roles.get(segment.GetName(), (*roles.infer_role(segment.GetName()), None))
        segment.SetTag(ROLE_ATTRIBUTE, role)
        segment.SetTag(PRESCRIPTION_ATTRIBUTE, "" if rx is None else repr(rx))
        if imputed_by:
            segment.SetTag(IMPUTED_ATTRIBUTE, "1")
            segment.SetTag(IMPUTED_BY_ATTRIBUTE, imputed_by)


def _read(scene, path: Path, node) -> None:
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    ok = storage.ReadData(node)
    scene.RemoveNode(storage)
    if not ok:
        raise ValueError(f"could not read {path}")
