"""One case out of a DICOM study that holds more than one case's objects, and derived RT objects written
back into that study.

A study in a PACS is not a case folder: it may hold several CT series, several structure sets (a
first contouring, a revision, DiffKT3D's own imputations), plans, clinical doses and earlier
predictions. `select_case_objects` picks what belongs to the CT series the caller names, from the
instances' headers alone, and says what it chose and why:

* RTSTRUCT: those whose ReferencedFrameOfReferenceSequence names the CT series, skipping
  structure sets DiffKT3D imputed (SeriesDescription starting with `IMPUTED_PREFIX`); of several,
  the newest (StructureSetDate/Time, then InstanceCreationDate/Time, then SOP instance UID).
* RTPLAN: those whose ReferencedStructureSetSequence names the chosen RTSTRUCT; of several the
  newest. None is fine: the reader then applies the name rules and the preset (and reports it).
* RTDOSE (the reference dose, for training only): one referencing the chosen RTPLAN, never a
  DiffKT3D prediction (SeriesDescription starting with `PREDICTED_PREFIX`).

`derived_rtdose` / `derived_rtstruct` build the objects a prediction stores back: the study's own
patient and study attributes, the CT's frame of reference, references to the structure set (and
plan) they were computed from, and descriptions no one can mistake for a planned dose or a
clinician's contours. They reuse the exact writers of `diffkt3d.io.dicom_write_rt`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from diffkt3d.data.case import Case, Grid, Structure
from diffkt3d.errors import CaseError
from diffkt3d.io.dicom_common import RT_STRUCTURE_SET_STORAGE
from diffkt3d.io.dicom_write_modules import ExportUids
from diffkt3d.io.dicom_write_rt import write_rtdose, write_rtstruct

PREDICTED_PREFIX = "DiffKT3D predicted dose"
IMPUTED_PREFIX = "DiffKT3D imputed"
# Patient and study attributes a derived object copies from the study's CT, so the PACS files it
# under the same patient and study (and a viewer shows the same names).
STUDY_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                    "StudyDescription")


def _text(d: Dataset, keyword: str) -> str:
    value = d.get(keyword)
    return "" if value is None else str(value)


def is_derived(header: Dataset) -> bool:
    """True for a series DiffKT3D stored itself (a prediction or an imputation)."""
    return _text(header, "SeriesDescription").startswith((PREDICTED_PREFIX, IMPUTED_PREFIX))


def _newest(headers: list[Dataset], date: str, time: str) -> list[Dataset]:
    def key(d: Dataset) -> tuple[str, str, str, str, str]:
        return (_text(d, date), _text(d, time), _text(d, "InstanceCreationDate"),
                _text(d, "InstanceCreationTime"), _text(d, "SOPInstanceUID"))
    return sorted(headers, key=key, reverse=True)


def _structure_set_series(header: Dataset) -> set[str]:
    out = set()
    for frame in header.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                out.add(_text(series, "SeriesInstanceUID"))
    return out


def _referenced(header: Dataset, sequence: str) -> set[str]:
    return {_text(item, "ReferencedSOPInstanceUID") for item in header.get(sequence, [])}


@dataclass
class CaseSelection:
    """The objects of one case in a study (headers) and the reasons for each choice."""

    rtstruct: Dataset
    rtplan: Dataset | None = None
    rtdose: Dataset | None = None
    notes: list[str] = field(default_factory=list)

    def instances(self) -> dict[str, str]:
        """Modality -> SOP instance UID of what was chosen (the case's identity with its CT series)."""
        return {m: _text(h, "SOPInstanceUID") for m, h in
                (("RTSTRUCT", self.rtstruct), ("RTPLAN", self.rtplan), ("RTDOSE", self.rtdose)) if h is not None}


def select_case_objects(ct_series_uid: str, headers: dict[str, list[Dataset]], case_id: str) -> CaseSelection:
    """Choose the RTSTRUCT, RTPLAN and reference RTDOSE of a CT series among a study's instances.

    Args:
        ct_series_uid: the CT series the case is built on.
        headers: modality -> instance headers of the study (no pixel data needed).
        case_id: for messages.

    Raises:
        CaseError: no structure set of the study references the CT series.
    """
    notes: list[str] = []
    structure_sets = [h for h in headers.get("RTSTRUCT", []) if not is_derived(h)]
    matching = [h for h in structure_sets if ct_series_uid in _structure_set_series(h)]
    if not matching:
        found = ", ".join(f"{m} x{len(v)}" for m, v in sorted(headers.items()) if v) or "nothing"
        raise CaseError(f"the study has no RTSTRUCT that references CT series {ct_series_uid} (study holds: "
                        f"{found}; DiffKT3D's own imputed structure sets are not used as input)", case=case_id)
    rs = _newest(matching, "StructureSetDate", "StructureSetTime")[0]
    label = _text(rs, "StructureSetLabel") or _text(rs, "SeriesDescription")
    notes.append(f"RTSTRUCT {_text(rs, 'SOPInstanceUID')} ({label!r})"
                 + (f": newest of {len(matching)} structure sets referencing the CT series" if len(matching) > 1
                    else ": the structure set referencing the CT series"))
    rs_uid = _text(rs, "SOPInstanceUID")
    plans = [h for h in headers.get("RTPLAN", []) if rs_uid in _referenced(h, "ReferencedStructureSetSequence")]
    rp = _newest(plans, "RTPlanDate", "RTPlanTime")[0] if plans else None
    if rp is None:
        notes.append("RTPLAN: none references the structure set; roles, prescriptions and beams from the "
                     "structure names and the preset")
    else:
        notes.append(f"RTPLAN {_text(rp, 'SOPInstanceUID')} ({_text(rp, 'RTPlanLabel')!r}): prescriptions, "
                     "fractions and beams" + (f" (newest of {len(plans)} plans)" if len(plans) > 1 else ""))
    rd = None
    if rp is not None:
        rp_uid = _text(rp, "SOPInstanceUID")
        doses = [h for h in headers.get("RTDOSE", []) if not is_derived(h)
                 and rp_uid in _referenced(h, "ReferencedRTPlanSequence")
                 and _text(h, "DoseSummationType").upper() == "PLAN"]
        rd = _newest(doses, "InstanceCreationDate", "InstanceCreationTime")[0] if doses else None
    return CaseSelection(rtstruct=rs, rtplan=rp, rtdose=rd, notes=notes)


@dataclass(frozen=True)
class StudyRef:
    """What a derived object needs of the study it is stored in (all from headers of the case).

    Args:
        attributes: `STUDY_ATTRIBUTES` copied from the CT (missing ones empty).
        frame_of_reference_uid: the CT's FrameOfReferenceUID.
        ct_series_uid: the CT series.
        ct_instances: CT SOP instance UIDs in the order of grid axis 2 (slice k of the case).
        rtstruct_uid: SOP instance UID of the structure set the prediction used.
        rtplan_uid: SOP instance UID of the plan, when there was one.
        grid: the CT grid exactly as read from the headers (derived objects lie on it).
    """

    attributes: dict[str, str]
    frame_of_reference_uid: str
    ct_series_uid: str
    ct_instances: tuple[str, ...]
    rtstruct_uid: str
    rtplan_uid: str | None
    grid: Grid

    def to_dict(self) -> dict[str, Any]:
        return {"attributes": self.attributes, "frame_of_reference_uid": self.frame_of_reference_uid,
                "ct_series_uid": self.ct_series_uid, "ct_instances": list(self.ct_instances),
                "rtstruct_uid": self.rtstruct_uid, "rtplan_uid": self.rtplan_uid,
                "grid": {"shape": list(self.grid.shape), "affine": np.asarray(self.grid.affine).tolist()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyRef:
        return cls(attributes=dict(d["attributes"]), frame_of_reference_uid=d["frame_of_reference_uid"],
                   ct_series_uid=d["ct_series_uid"], ct_instances=tuple(d["ct_instances"]),
                   rtstruct_uid=d["rtstruct_uid"], rtplan_uid=d.get("rtplan_uid"),
                   grid=Grid(shape=tuple(d["grid"]["shape"]), affine=np.asarray(d["grid"]["affine"], dtype=np.float64)))

    @classmethod
    def of(cls, ct_headers: list[Dataset], selection: CaseSelection, grid: Grid) -> StudyRef:
        """From the CT headers (any order; sorted here as the reader sorts them), the selection and
        the case grid `read_dicom_case` made of them."""
        first = ct_headers[0]
        orient = np.asarray([float(v) for v in first.ImageOrientationPatient])
        normal = np.cross(orient[:3], orient[3:])
        order = sorted(ct_headers, key=lambda d: float(np.asarray([float(v) for v in d.ImagePositionPatient]) @ normal))
        return cls(attributes={k: _text(first, k) for k in STUDY_ATTRIBUTES},
                   frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
                   ct_series_uid=_text(first, "SeriesInstanceUID"),
                   ct_instances=tuple(_text(d, "SOPInstanceUID") for d in order),
                   rtstruct_uid=_text(selection.rtstruct, "SOPInstanceUID"),
                   rtplan_uid=None if selection.rtplan is None else _text(selection.rtplan, "SOPInstanceUID"),
                   grid=grid)


def _context(ref: StudyRef, uids: ExportUids) -> dict[str, str]:
    a = ref.attributes
    return {"patient_name": a["PatientName"], "patient_id": a["PatientID"], "study_uid": a["StudyInstanceUID"],
            "for_uid": ref.frame_of_reference_uid, "ct_series_uid": ref.ct_series_uid,
            "rs_uid": uids.new("rs"), "rp_uid": ref.rtplan_uid or "", "date": a["StudyDate"],
            "time": a["StudyTime"], "study_description": a["StudyDescription"]}


def _into_study(d: Dataset, ref: StudyRef, description: str, series_number: int) -> Dataset:
    """Copy the study's patient/study attributes and date the instance now."""
    import datetime as _dt
    for key in STUDY_ATTRIBUTES:
        setattr(d, key, ref.attributes.get(key, ""))
    now = _dt.datetime.now()
    d.SeriesDescription = description[:64]
    d.SeriesNumber = series_number
    d.SeriesDate = d.InstanceCreationDate = now.strftime("%Y%m%d")
    d.SeriesTime = d.InstanceCreationTime = now.strftime("%H%M%S")
    return d


def derived_rtdose(dose_gy: np.ndarray, ref: StudyRef, *, model_version: str, identity: str,
                   series_number: int, description: str, details: str) -> Dataset:
    """An RTDOSE of the predicted dose on the study's CT grid, marked as a prediction.

    Args:
        dose_gy: (I, J, K) Gy on `ref.grid`.
        identity: what makes this result what it is (inputs, model, parameters): UIDs are derived
            from it, so storing the same result twice gives the same SOP instance.
        description: SeriesDescription (must start with `PREDICTED_PREFIX`).
        details: ImageComments (free text: inputs, parameters). DoseComment (64 characters at
            most) says "PREDICTED by DiffKT3D, model <version>".

    Raises:
        CaseError: the dose is not on the CT grid.
    """
    if tuple(dose_gy.shape) != tuple(ref.grid.shape):
        raise CaseError(f"predicted dose has shape {tuple(dose_gy.shape)}, the study's CT grid is "
                        f"{tuple(ref.grid.shape)}", case=ref.ct_series_uid)
    assert description.startswith(PREDICTED_PREFIX), description
    uids = ExportUids(identity)
    with tempfile.TemporaryDirectory(prefix="diffkt3d-rtdose-") as tmp:
        path = write_rtdose(np.asarray(dose_gy, dtype=np.float32), ref.grid, Path(tmp), _context(ref, uids), uids,
                            16, ref.rtplan_uid is not None, ref.ct_series_uid)
        d = pydicom.dcmread(str(path))
    _into_study(d, ref, description, series_number)
    d.DoseComment = f"PREDICTED by DiffKT3D, model {model_version}"[:64]
    d.ImageComments = details[:10240]  # General Image module (grid-based RT Dose), LT
    rs = Dataset()
    rs.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
    rs.ReferencedSOPInstanceUID = ref.rtstruct_uid
    d.ReferencedStructureSetSequence = Sequence([rs])
    return d


def derived_rtstruct(masks: dict[str, tuple[np.ndarray, str]], ref: StudyRef, *, model_version: str, identity: str,
                     series_number: int, description: str, label: str) -> Dataset:
    """An RTSTRUCT of imputed structures on the study's CT (contours reference its slices).

    Args:
        masks: ROI name -> (bool mask on `ref.grid`, role "target" / "oar" / "other").
        model_version: the model that imputed them; every ROI says so in its ROIGenerationDescription.
        description: SeriesDescription (must start with `IMPUTED_PREFIX`).
        label: StructureSetLabel (16 characters at most are kept).
    """
    assert description.startswith(IMPUTED_PREFIX), description
    for name, (mask, _) in masks.items():
        if tuple(mask.shape) != tuple(ref.grid.shape):
            raise CaseError(f"imputed structure {name} has shape {tuple(mask.shape)}, the study's CT grid is "
                            f"{tuple(ref.grid.shape)}", case=ref.ct_series_uid)
    uids = ExportUids(identity)
    case = Case(case_id=ref.ct_series_uid, grid=ref.grid,
                structures={n: Structure(name=n, mask=np.asarray(m, dtype=bool), role=r,  # type: ignore[arg-type]
                                         imputed_by=model_version)
                            for n, (m, r) in masks.items()})
    ct_files = [(uid, Path(f"CT_{k}.dcm")) for k, uid in enumerate(ref.ct_instances)]
    with tempfile.TemporaryDirectory(prefix="diffkt3d-rtstruct-") as tmp:
        path, _ = write_rtstruct(case, ref.grid, False, ct_files, Path(tmp), _context(ref, uids), uids)
        d = pydicom.dcmread(str(path))
    _into_study(d, ref, description, series_number)
    d.StructureSetLabel = label[:16]
    d.StructureSetDate, d.StructureSetTime = d.InstanceCreationDate, d.InstanceCreationTime
    return d
