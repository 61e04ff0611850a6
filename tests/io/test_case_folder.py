"""NIfTI case-folder reader: OpenKBP folders load as they are; each kind of
bad input gives one CaseError naming the case, the file and the problem.

Bad cases are made by copying a real OpenKBP case (validation pt_201) into tmp_path and breaking it.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder

OPENKBP = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp")
PT_201 = OPENKBP / "validation" / "pt_201"
pytestmark = pytest.mark.skipif(not PT_201.is_dir(), reason="OpenKBP validation data not on this machine")


@pytest.fixture
def case_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "pt_201"
    shutil.copytree(PT_201, dst)
    for p in dst.iterdir():
        p.chmod(0o644)  # the shared copy is read-only
    dst.chmod(0o755)
    return dst


def rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> None:
    img = nib.load(str(path))
    out = nib.Nifti1Image(data.astype(dtype or data.dtype), img.affine if affine is None else affine)
    path.unlink()
    nib.save(out, str(path))


def test_openkbp_case_loads_as_is() -> None:
    case = load_case_folder(PT_201)
    assert case.case_id == "pt_201" and case.grid.shape == (128, 128, 128)
    # body from possible_dose_mask.nii.gz (not a structure)
    ref_body = np.asarray(nib.load(str(PT_201 / "possible_dose_mask.nii.gz")).dataobj) > 0
    np.testing.assert_array_equal(case.body, ref_body)
    assert "possible_dose_mask" not in case.structures
    # roles and prescriptions from names, every guess reported
    assert {n: s.prescription_gy for n, s in case.targets.items()} == {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}
    assert set(case.oars) == {"Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus",
                              "Larynx", "Mandible"}
    notes = "\n".join(case.plan.inferred)
    assert "PTV70: role 'target' from its name, prescription 70 Gy" in notes
    assert "Mandible: role 'oar'" in notes
    assert "OpenKBP preset" in notes and case.plan.fractions == 35
    assert case.plan.beams.gantry_angles_deg == [float(a) for a in range(0, 360, 40)]
    # CT in HU and dose in Gy, straight from the headers
    assert case.ct_hu.min() == -1000.0 and 60.0 < case.dose_gy.max() < 90.0
    np.testing.assert_allclose(case.grid.spacing_mm, nib.load(str(PT_201 / "ct.nii.gz")).header.get_zooms(),
                               rtol=1e-6)


def test_case_without_ct_loads(case_dir: Path) -> None:
    (case_dir / "ct.nii.gz").unlink()
    case = load_case_folder(case_dir)
    assert case.ct_hu is None and not case.has("ct")
    assert case.has("dose") and case.has("ptv")
    case.validate(require=("ptv", "oar"))  # fine for modalities that are there


@pytest.mark.skipif(not (OPENKBP / "validation" / "pt_205").is_dir(), reason="pt_205 not here")
def test_real_case_without_ct() -> None:
    case = load_case_folder(OPENKBP / "validation" / "pt_205")  # published without CT
    assert case.ct_hu is None


def test_missing_ct_where_required(case_dir: Path) -> None:
    (case_dir / "ct.nii.gz").unlink()
    case = load_case_folder(case_dir)
    with pytest.raises(CaseError, match="missing ct, which is required") as err:
        case.validate(require=("ct", "ptv"))
    assert err.value.case == "pt_201"


def test_grid_mismatch_between_two_masks_names_both(case_dir: Path) -> None:
    # without CT and body the first mask read (Brainstem) is the reference grid
    (case_dir / "ct.nii.gz").unlink()
    (case_dir / "possible_dose_mask.nii.gz").unlink()
    larynx = case_dir / "Larynx.nii.gz"
    data = np.asarray(nib.load(str(larynx)).dataobj)
    rewrite(larynx, data, affine=np.diag([5.0, 5.0, 3.0, 1.0]))
    with pytest.raises(CaseError) as err:
        load_case_folder(case_dir)
    msg = str(err.value)
    assert "grid mismatch" in msg and "Larynx.nii.gz" in msg and "Brainstem.nii.gz" in msg
    assert "case pt_201" in msg and err.value.file.endswith("Larynx.nii.gz")
    assert "5.42" in msg and "5, 5, 3" in msg  # both spacings, expected vs found


def test_shape_mismatch_names_both(case_dir: Path) -> None:
    mand = case_dir / "Mandible.nii.gz"
    rewrite(mand, np.asarray(nib.load(str(mand)).dataobj)[:, :, :100])
    with pytest.raises(CaseError, match=r"Mandible.nii.gz has shape \(128, 128, 100\).*ct.nii.gz has shape"):
        load_case_folder(case_dir)


def test_empty_ptv(case_dir: Path) -> None:
    ptv = case_dir / "PTV63.nii.gz"
    rewrite(ptv, np.zeros((128, 128, 128), np.uint8))
    with pytest.raises(CaseError, match="PTV63 is empty") as err:
        load_case_folder(case_dir)
    assert err.value.case == "pt_201" and err.value.file.endswith("PTV63.nii.gz")


def test_nan_in_dose(case_dir: Path) -> None:
    dose_path = case_dir / "dose.nii.gz"
    dose = nib.load(str(dose_path)).get_fdata(dtype=np.float32)
    dose[60, 60, 60:63] = np.nan
    rewrite(dose_path, dose, dtype=np.float32)
    with pytest.raises(CaseError, match="3 NaN/Inf voxels") as err:
        load_case_folder(case_dir)
    assert err.value.case == "pt_201" and err.value.file.endswith("dose.nii.gz")
    # prediction never reads the dose, so the same folder is usable without it
    assert load_case_folder(case_dir, with_dose=False).dose_gy is None


def test_truncated_nifti(case_dir: Path) -> None:
    ct = case_dir / "ct.nii.gz"
    raw = ct.read_bytes()
    ct.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CaseError, match="truncated or corrupt") as err:
        load_case_folder(case_dir)
    assert err.value.file.endswith("ct.nii.gz") and err.value.case == "pt_201"


def test_not_a_nifti(case_dir: Path) -> None:
    (case_dir / "Larynx.nii.gz").write_bytes(gzip.compress(b"this is not an image" * 20))
    with pytest.raises(CaseError) as err:
        load_case_folder(case_dir)
    assert err.value.file.endswith("Larynx.nii.gz")


def test_plan_json_names_missing_structure(case_dir: Path) -> None:
    (case_dir / "plan.json").write_text(json.dumps(
        {"structures": {"PTV70": {"role": "target", "prescription_gy": 70}, "Parotid_L": {"role": "oar"}}}))
    with pytest.raises(CaseError, match="'Parotid_L' but Parotid_L.nii.gz is missing") as err:
        load_case_folder(case_dir)
    assert err.value.file.endswith("plan.json")


def test_bad_json(case_dir: Path) -> None:
    (case_dir / "plan.json").write_text('{"structures": {"PTV70": {"role": "target",}}')
    with pytest.raises(CaseError, match="not valid JSON") as err:
        load_case_folder(case_dir)
    assert err.value.file.endswith("plan.json") and err.value.case == "pt_201"
    (case_dir / "plan.json").write_text("[1, 2]")
    with pytest.raises(CaseError, match="JSON object"):
        load_case_folder(case_dir)


def test_plan_json_overrides_inference(case_dir: Path) -> None:
    (case_dir / "plan.json").write_text(json.dumps({
        "structures": {"PTV70": {"role": "target", "prescription_gy": 66.0}},
        "beams": {"gantry_angles_deg": [0, 180], "isocenter_mm": [300.0, 340.0, 180.0], "technique": "vmat"},
        "fractions": 33}))
    case = load_case_folder(case_dir)
    assert case.structures["PTV70"].prescription_gy == 66.0 and case.plan.fractions == 33
    assert case.plan.beams.technique == "VMAT" and case.plan.beams.isocenter_mm == (300.0, 340.0, 180.0)
    assert not any(n.startswith("PTV70:") for n in case.plan.inferred)


@pytest.mark.parametrize("plan, problem", [
    ({"structures": {"PTV70": {"role": "target", "prescription_gy": 1e6}}}, "in (0, 150] Gy, found 1000000.0"),
    ({"structures": {"PTV70": {"role": "target", "prescription_gy": -70}}}, "in (0, 150] Gy, found -70"),
    ({"structures": {"PTV70": {"role": "target", "prescription_gy": 0}}}, "in (0, 150] Gy, found 0"),
    ({"structures": {"PTV70": {"role": "target", "prescription_gy": float("nan")}}}, "finite"),
    ({"structures": {"PTV70": {"role": "target", "prescription_gy": "70"}}}, "must be a number of Gy, found '70'"),
    ({"structures": {"PTV70": 70}}, "'PTV70' must be an object"),
    ({"fractions": 0}, "'fractions' must be an integer >= 1, found 0"),
    ({"fractions": 2.5}, "'fractions' must be an integer >= 1, found 2.5"),
    ({"fractions": "35"}, "'fractions' must be an integer >= 1, found '35'"),
])
def test_plan_values_are_range_checked_while_loading(case_dir: Path, plan: dict, problem: str) -> None:
    # json.dumps writes NaN as the literal NaN, which json.loads (and so the reader) accepts
    (case_dir / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CaseError) as err:
        load_case_folder(case_dir)
    assert problem in str(err.value) and err.value.case == "pt_201"
    assert err.value.file == "plan.json"  # a bare name: the server passes it on without a path


def test_prescription_from_a_name_is_range_checked_too(case_dir: Path) -> None:
    (case_dir / "PTV70.nii.gz").rename(case_dir / "PTV_20000.nii.gz")  # 20000 cGy = 200 Gy
    with pytest.raises(CaseError, match=r"structure PTV_20000 \(prescription read from its name\).*found 200.0"):
        load_case_folder(case_dir)


def test_whole_float_fractions_are_accepted(case_dir: Path) -> None:
    (case_dir / "plan.json").write_text(json.dumps({"fractions": 30.0}))
    assert load_case_folder(case_dir).plan.fractions == 30


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match="does not exist"):
        load_case_folder(tmp_path / "pt_404")
