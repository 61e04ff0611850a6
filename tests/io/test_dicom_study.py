"""Case selection in a study with several objects, and derived RT objects written into an existing study
(read back by the project's own reader on the study's CT)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from diffkt3d.errors import CaseError
from diffkt3d.io.dicom import read_dicom_case
from diffkt3d.io.dicom_study import (
    IMPUTED_PREFIX,
    PREDICTED_PREFIX,
    StudyRef,
    derived_rtdose,
    derived_rtstruct,
    select_case_objects,
)

SAMPLE = Path(__file__).resolve().parents[2] / "sample-data" / "dicom" / "pt_201"


def _rs(uid: str, ct_series: str, date: str = "20240101", description: str = "clinical") -> Dataset:
    d = Dataset()
    d.SOPInstanceUID, d.SeriesDescription, d.StructureSetDate, d.StructureSetTime = uid, description, date, "1200"
    series = Dataset()
    series.SeriesInstanceUID = ct_series
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.RTReferencedStudySequence = Sequence([study])
    d.ReferencedFrameOfReferenceSequence = Sequence([frame])
    return d


def _ref(sequence: str, uid: str, **extra) -> Dataset:
    d = Dataset()
    item = Dataset()
    item.ReferencedSOPInstanceUID = uid
    setattr(d, sequence, Sequence([item]))
    for k, v in extra.items():
        setattr(d, k, v)
    return d


def test_selection_prefers_the_newest_clinical_structure_set_and_its_plan_and_dose() -> None:
    headers = {
        "RTSTRUCT": [_rs("1.1", "9.9", "20240101"), _rs("1.2", "9.9", "20240301"), _rs("1.3", "8.8", "20250101"),
                     _rs("1.4", "9.9", "20260101", f"{IMPUTED_PREFIX} OARs v1")],
        "RTPLAN": [_ref("ReferencedStructureSetSequence", "1.1", SOPInstanceUID="2.1"),
                   _ref("ReferencedStructureSetSequence", "1.2", SOPInstanceUID="2.2", RTPlanLabel="final")],
        "RTDOSE": [_ref("ReferencedRTPlanSequence", "2.2", SOPInstanceUID="3.1", DoseSummationType="PLAN"),
                   _ref("ReferencedRTPlanSequence", "2.2", SOPInstanceUID="3.2", DoseSummationType="PLAN",
                        SeriesDescription=f"{PREDICTED_PREFIX} v1")],
    }
    sel = select_case_objects("9.9", headers, "case")
    assert sel.instances() == {"RTSTRUCT": "1.2", "RTPLAN": "2.2", "RTDOSE": "3.1"}
    assert "newest of 2 structure sets" in sel.notes[0] and "'final'" in sel.notes[1]
    no_plan = select_case_objects("8.8", headers, "case")
    assert no_plan.rtplan is None and "name" in no_plan.notes[1]
    with pytest.raises(CaseError, match="no RTSTRUCT that references CT series 7.7"):
        select_case_objects("7.7", headers, "case")


@pytest.fixture(scope="module")
def sample():
    if not SAMPLE.is_dir():
        pytest.skip("sample-data/dicom/pt_201 missing")
    files = [pydicom.dcmread(str(p)) for p in sorted(SAMPLE.glob("*.dcm"))]
    by = {m: [d for d in files if d.Modality == m] for m in ("CT", "RTSTRUCT", "RTPLAN", "RTDOSE")}
    case = read_dicom_case(SAMPLE, with_dose=True)
    sel = select_case_objects(str(by["CT"][0].SeriesInstanceUID), by, "pt_201")
    return by, case, StudyRef.of(by["CT"][::-1], sel, case.grid)  # any order of the CT headers


def _reread(tmp_path: Path, extra: Dataset, with_structures: bool = False):
    folder = tmp_path / "study"
    folder.mkdir()
    for p in SAMPLE.glob("CT_*.dcm"):
        shutil.copy(p, folder / p.name)
    extra.save_as(str(folder / "extra.dcm"), write_like_original=False)
    return read_dicom_case(folder, with_dose=not with_structures)


def test_derived_rtdose_lies_on_the_study_ct_and_is_marked_predicted(sample, tmp_path: Path) -> None:
    by, case, ref = sample
    d = derived_rtdose(case.dose_gy * 0.5, ref, model_version="m@1", identity="x", series_number=9001,
                       description=f"{PREDICTED_PREFIX} v1", details="PREDICTED ... not a planned dose")
    assert d.DoseComment == "PREDICTED by DiffKT3D, model m@1" and d.SeriesDescription.endswith("v1")
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "FrameOfReferenceUID"):
        assert d.get(key) == by["CT"][0].get(key), key
    assert d.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == by["RTSTRUCT"][0].SOPInstanceUID
    assert d.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == by["RTPLAN"][0].SOPInstanceUID
    assert "OperatorsName" in d
    again = derived_rtdose(case.dose_gy * 0.5, ref, model_version="m@1", identity="x", series_number=9001,
                           description=f"{PREDICTED_PREFIX} v1", details="")
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (d.SeriesInstanceUID, d.SOPInstanceUID)
    back = _reread(tmp_path, d)
    assert np.abs(back.dose_gy - case.dose_gy * 0.5).max() <= float(d.DoseGridScaling) / 2 + 1e-5
    with pytest.raises(CaseError, match="CT grid"):
        derived_rtdose(case.dose_gy[:-1], ref, model_version="m", identity="x", series_number=1,
                       description=PREDICTED_PREFIX, details="")


def test_derived_rtstruct_contours_reference_the_study_ct_and_read_back_exactly(sample, tmp_path: Path) -> None:
    by, case, ref = sample
    masks = {n: (s.mask, s.role) for n, s in case.structures.items() if n in ("Brainstem", "PTV70")}
    d = derived_rtstruct(masks, ref, model_version="m@2", identity="y", series_number=9101,
                         description=f"{IMPUTED_PREFIX} OARs v1", label="DiffKT3D imputed")
    ct_uids = {c.SOPInstanceUID for c in by["CT"]}
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for roi in d.ROIContourSequence
            for c in roi.ContourSequence}
    assert refs and refs <= ct_uids and "OperatorsName" in d
    assert d.StudyInstanceUID == by["CT"][0].StudyInstanceUID
    back = _reread(tmp_path, d, with_structures=True)
    for name, (mask, _) in masks.items():
        assert np.array_equal(back.structures[name].mask, mask), name
        assert back.structures[name].imputed_by == "m@2", name  # the ROIs say who imputed them
    assert {r.ROIGenerationDescription for r in d.StructureSetROISequence} == {"IMPUTED by DiffKT3D, model m@2"}
