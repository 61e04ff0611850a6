"""`diffkt3d export dicom CASE... --out ROOT`: one DICOM RT folder per case, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from diffkt3d.cli.main import main
from diffkt3d.data.case import Case, Grid, Structure
from diffkt3d.io.case_folder import save_case_folder
from diffkt3d.io.dicom import read_dicom_case


def _case_folder(root: Path, case_id: str) -> Path:
    shape = (16, 12, 6)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ptv = (abs(ii - 8) <= 2) & (abs(jj - 6) <= 2) & (kk >= 1) & (kk <= 4)
    case = Case(case_id=case_id, grid=Grid(shape=shape, affine=np.diag([3.0, 3.0, 2.5, 1.0])),
                ct_hu=(ii - 2 * jj + 3 * kk - 100).astype(np.float32),
                dose_gy=(ptv * 60.0 + 1.0).astype(np.float32), body=np.ones(shape, dtype=bool),
                structures={"PTV60": Structure("PTV60", ptv, "target", 60.0)})
    return save_case_folder(case, root / case_id)


def test_export_two_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [_case_folder(tmp_path / "cases", name) for name in ("c1", "c2")]
    rc = main(["export", "dicom", *map(str, cases), "--out", str(tmp_path / "dicom"),
               "--patient-id", "Anon-{case}", "--patient-name", "DiffKT3D^Sample"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "c1: 6 CT slices" in out and "c2:" in out
    for name in ("c1", "c2"):
        folder = tmp_path / "dicom" / name
        assert {p.name for p in folder.iterdir()} >= {"CT_0001.dcm", "RS.dcm", "RP.dcm", "RD.dcm"}
        rd = pydicom.dcmread(str(folder / "RD.dcm"), stop_before_pixels=True)
        assert rd.PatientID == f"Anon-{name}" and str(rd.PatientName) == "DiffKT3D^Sample"
        back = read_dicom_case(folder)
        assert back.structures["PTV60"].prescription_gy == 60.0
        assert float(np.abs(back.dose_gy - np.where(back.structures["PTV60"].mask, 61.0, 1.0)).max()) <= 0.01


def test_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", "dicom", str(tmp_path / "missing_case"), "--out", str(tmp_path / "dicom")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "missing_case" in err and "does not exist" in err

    case = _case_folder(tmp_path / "cases", "c1")
    assert main(["export", "dicom", str(case), "--out", str(tmp_path / "dicom")]) == 0
    rc = main(["export", "dicom", str(case), "--out", str(tmp_path / "dicom")])  # second time
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not empty" in err and len(err.splitlines()) == 1
    assert main(["export", "dicom", str(case), "--out", str(tmp_path / "dicom"), "--overwrite"]) == 0
