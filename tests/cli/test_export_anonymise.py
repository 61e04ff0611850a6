"""`diffkt3d export dicom|cases --anonymise`: no trace of the original case id (which may be the
patient's name) in the export; same key -> same pseudonym; the data itself unchanged."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from diffkt3d.cli.main import main
from diffkt3d.data.case import Case, Grid, Structure
from diffkt3d.io.anonymise import pseudonym
from diffkt3d.io.case_folder import save_case_folder

PATIENT_FOLDER = "Doe_Janet_PHI-470815"
TRACES = (b"Doe", b"Janet", b"470815")


def _patient_case(root: Path) -> Path:
    """A small case in a folder named after the patient, with the name also in a NIfTI header."""
    shape = (16, 12, 6)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ptv = (abs(ii - 8) <= 2) & (abs(jj - 6) <= 2) & (kk >= 1) & (kk <= 4)
    case = Case(case_id=PATIENT_FOLDER, grid=Grid(shape=shape, affine=np.diag([3.0, 3.0, 2.5, 1.0])),
                ct_hu=(ii - 2 * jj + 3 * kk - 100).astype(np.float32),
                dose_gy=(ptv * 60.0 + 1.0).astype(np.float32), body=np.ones(shape, dtype=bool),
                structures={"PTV60": Structure("PTV60", ptv, "target", 60.0)})
    folder = save_case_folder(case, root / PATIENT_FOLDER)
    ct = nib.load(str(folder / "ct.nii.gz"))
    ct.header["descrip"] = b"Doe^Janet PHI-470815"  # what some converters leave in the header
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj), ct.affine, ct.header), str(folder / "ct.nii.gz"))
    return folder


def _all_bytes(root: Path) -> bytes:
    out = [str(p.relative_to(root)).encode() for p in root.rglob("*")]
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            out.append(gzip.decompress(data) if p.name.endswith(".gz") else data)
    return b"\n".join(out)


def test_export_cases_anonymised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _patient_case(tmp_path / "cases")
    assert b"Doe" in _all_bytes(src)  # the trace is there to begin with
    assert main(["export", "cases", str(src), "--out", str(tmp_path / "a"), "--anonymise",
                 "--anonymise-key", "k1"]) == 0
    name = pseudonym(PATIENT_FOLDER, "k1")
    assert [p.name for p in (tmp_path / "a").iterdir()] == [name] and name.startswith("anon-")
    exported = _all_bytes(tmp_path / "a")
    assert not any(t in exported for t in TRACES)
    assert not any(t.decode() in capsys.readouterr().out for t in TRACES)
    for f in ("ct.nii.gz", "dose.nii.gz", "PTV60.nii.gz"):
        a, b = nib.load(str(src / f)), nib.load(str(tmp_path / "a" / name / f))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
        assert a.get_data_dtype() == b.get_data_dtype()
    assert (src / "plan.json").read_text() == (tmp_path / "a" / name / "plan.json").read_text()
    # same key, same pseudonym; another key, another one; without --anonymise the name is kept
    assert main(["export", "cases", str(src), "--out", str(tmp_path / "b"), "--anonymise", "--anonymise-key", "k1"]) == 0
    assert (tmp_path / "b" / name).is_dir()
    assert main(["export", "cases", str(src), "--out", str(tmp_path / "c"), "--anonymise", "--anonymise-key", "k2"]) == 0
    assert not (tmp_path / "c" / name).exists()
    assert main(["export", "cases", str(src), "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / PATIENT_FOLDER).is_dir()


def test_export_dicom_anonymised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _patient_case(tmp_path / "cases")
    assert main(["export", "dicom", str(src), "--out", str(tmp_path / "dicom"), "--anonymise"]) == 0
    folders = list((tmp_path / "dicom").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("anon-")
    exported = _all_bytes(tmp_path / "dicom")
    assert not any(t in exported for t in TRACES)
    assert not any(t.decode() in capsys.readouterr().out for t in TRACES)
    rd = pydicom.dcmread(str(folders[0] / "RD.dcm"), stop_before_pixels=True)
    assert rd.PatientID == folders[0].name and str(rd.PatientName) == f"ANON^{folders[0].name}"
    rc = main(["export", "dicom", str(src), "--out", str(tmp_path / "x"), "--anonymise", "--patient-id", "P1"])
    assert rc == 2 and "drop --patient-id" in capsys.readouterr().err
