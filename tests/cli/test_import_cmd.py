"""`diffkt3d import openkbp|gdp-hmm|dicom`: writes case folders, never overwrites
unless --overwrite, bad input -> exit 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from diffkt3d.cli.main import main
from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.io.gdp_hmm import write_gdp_hmm

CSV_201 = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp-csv/provided-data/validation-pats/pt_201")
NIFTI_201 = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation/pt_201")


def tiny_case(case_id: str = "pat01") -> Case:
    """RAS-oriented 12x10x8 case (axis 0 = slice axis, as GDP-HMM and DICOM exports expect)."""
    shape = (8, 10, 12)
    affine = np.array([[0, 0, -2.5, 10.0], [0, -2.5, 0, 20.0], [2.0, 0, 0, -30.0], [0, 0, 0, 1]])
    grid = Grid(shape=shape, affine=affine)
    rng = np.random.default_rng(1)
    ptv = np.zeros(shape, bool)
    ptv[3:5, 4:7, 5:8] = True
    oar = np.zeros(shape, bool)
    oar[3:5, 1:3, 2:4] = True
    iso = tuple(float(v) for v in grid.index_to_world(np.argwhere(ptv).mean(0))[0])
    return Case(case_id, grid, ct_hu=rng.integers(-1000, 1000, shape).astype(np.float32),
                dose_gy=(rng.random(shape) * 70).astype(np.float32), body=np.ones(shape, bool),
                structures={"PTV70": Structure("PTV70", ptv, "target", 70.0),
                            "Brainstem": Structure("Brainstem", oar, "oar")},
                plan=Plan(beams=BeamGeometry([0.0, 120.0, 240.0], iso), fractions=35))


@pytest.mark.slow  # writes a 128^3 case three times (~5 s CPU); guards the no-overwrite promise
@pytest.mark.skipif(not CSV_201.is_dir(), reason="OpenKBP CSV data not on this machine")
def test_import_openkbp_and_refuse_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cases"
    assert main(["import", "openkbp", str(CSV_201), "--out", str(out)]) == 0
    case = load_case_folder(out / "pt_201")
    # independent reference: the published NIfTI copy of the same patient
    np.testing.assert_array_equal(case.ct_hu, nib.load(str(NIFTI_201 / "ct.nii.gz")).get_fdata())
    np.testing.assert_array_equal(
        case.structures["PTV70"].mask, np.asarray(nib.load(str(NIFTI_201 / "PTV70.nii.gz")).dataobj) > 0)
    plan = json.loads((out / "pt_201" / "plan.json").read_text())
    assert plan["structures"]["PTV56"] == {"role": "target", "prescription_gy": 56.0}
    stamp = (out / "pt_201" / "ct.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["import", "openkbp", str(CSV_201), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exist" in err[0] and "--overwrite" in err[0]
    assert (out / "pt_201" / "ct.nii.gz").stat().st_mtime_ns == stamp  # untouched
    (out / "pt_201" / "extra.txt").write_text("old")
    assert main(["import", "openkbp", str(CSV_201), "--out", str(out), "--overwrite", "--plates"]) == 0
    assert not (out / "pt_201" / "extra.txt").exists()  # replaced, not merged
    again = load_case_folder(out / "pt_201")
    assert again.beam_plate is not None and again.angle_plate is not None


def test_import_gdp_hmm_with_ptv_dict(tmp_path: Path) -> None:
    src = tmp_path / "npz"
    case = tiny_case()
    case.structures["PTV70"].prescription_gy = None  # the npz itself holds no prescription
    write_gdp_hmm(case, src / "pat01+plan1.npz")
    (tmp_path / "PTV_DICT.json").write_text(json.dumps({"pat01": {"PTV_High": {"OPTName": "PTV70", "PDose": 66}}}))
    out = tmp_path / "cases"
    assert main(["import", "gdp-hmm", str(src), "--out", str(out), "--ptv-dict", str(tmp_path / "PTV_DICT.json"),
                 "--plates"]) == 0
    back = load_case_folder(out / "pat01+plan1")
    assert back.structures["PTV70"].prescription_gy == 66.0
    np.testing.assert_allclose(back.grid.affine, case.grid.affine, atol=1e-9)
    np.testing.assert_array_equal(back.ct_hu, case.ct_hu)
    np.testing.assert_allclose(back.dose_gy, case.dose_gy, atol=1e-4)
    assert back.plan.beams.gantry_angles_deg == [0.0, 120.0, 240.0]
    assert back.beam_plate is not None and back.beam_plate.max() > 0


def test_import_dicom(tmp_path: Path) -> None:
    dicom = pytest.importorskip("diffkt3d.io.dicom")
    case = tiny_case("dcm01")
    dicom.write_dicom_case(case, tmp_path / "dicom" / "dcm01", uid_seed="test")
    out = tmp_path / "cases"
    assert main(["import", "dicom", str(tmp_path / "dicom" / "dcm01"), "--out", str(out)]) == 0
    back = load_case_folder(out / "dcm01")
    assert back.grid.shape == case.grid.shape or sorted(back.grid.shape) == sorted(case.grid.shape)
    assert back.structures["PTV70"].mask.sum() == case.structures["PTV70"].mask.sum()


def test_bad_sources_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["import", "openkbp", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["import", "gdp-hmm", str(tmp_path / "junk.npz"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.npz" in err[0]
    assert not (tmp_path / "o" / "junk").exists()
