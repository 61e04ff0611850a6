"""OpenKBP sparse-CSV reader: arrays equal the NIfTI copies; bad files -> CaseError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.io.openkbp_csv import find_openkbp_csv_cases, read_openkbp_csv_case

CSV_ROOT = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp-csv/provided-data")
NIFTI_ROOT = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp")
needs_data = pytest.mark.skipif(not CSV_ROOT.is_dir() or not NIFTI_ROOT.is_dir(),
                                reason="OpenKBP CSV/NIfTI data not on this machine")


@needs_data
@pytest.mark.parametrize("csv_rel, nifti_rel", [("validation-pats/pt_201", "validation/pt_201"),
                                                ("train-pats/pt_1", "train/pt_1")])
def test_csv_equals_nifti_copy(csv_rel: str, nifti_rel: str) -> None:
    got = read_openkbp_csv_case(CSV_ROOT / csv_rel)
    ref = load_case_folder(NIFTI_ROOT / nifti_rel)
    # spacing: the NIfTI header stores float32, the CSV float64 -> equal to float32 precision
    np.testing.assert_allclose(got.grid.spacing_mm, ref.grid.spacing_mm, rtol=1e-6)
    np.testing.assert_allclose(got.grid.affine, ref.grid.affine, atol=1e-5)
    assert got.grid.shape == ref.grid.shape == (128, 128, 128)
    np.testing.assert_array_equal(got.ct_hu, ref.ct_hu)  # CT exactly (HU)
    assert float(got.ct_hu.min()) == -1000.0
    # dose: the NIfTI copy is uint16 x 0.002 Gy, so it rounds to within 1 mGy (+ float32 noise)
    assert np.abs(got.dose_gy - ref.dose_gy).max() <= 0.001 + 1e-5
    assert float(got.dose_gy.max()) > 60.0  # Gy, not cGy or normalised
    np.testing.assert_array_equal(got.body, ref.body)
    assert sorted(got.structures) == sorted(ref.structures)
    for name, s in ref.structures.items():
        np.testing.assert_array_equal(got.structures[name].mask, s.mask, err_msg=name)
        assert got.structures[name].role == s.role
        assert got.structures[name].prescription_gy == s.prescription_gy
    assert got.plan.beams is not None and len(got.plan.beams.gantry_angles_deg) == 9
    np.testing.assert_allclose(got.plan.beams.isocenter_mm, ref.plan.beams.isocenter_mm, atol=1e-3)
    assert any("OpenKBP preset" in note for note in got.plan.inferred)


@needs_data
def test_find_cases_under_root() -> None:
    found = find_openkbp_csv_cases(CSV_ROOT)
    assert [p.name for p in found] == ["pt_1", "pt_201"]


# -- tiny synthetic cases ------------------------------------------------------------------------
SHAPE = (4, 5, 6)


def write_csv(path: Path, rows: list[tuple], header: str = ",data") -> None:
    lines = [header] + [",".join("" if v is None else str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def tiny_case(folder: Path) -> dict[str, np.ndarray]:
    """Write a 4x5x6 CSV case; returns the expected dense arrays built with np.unravel_index."""
    folder.mkdir(parents=True)
    (folder / "voxel_dimensions.csv").write_text("3.5\n3.5\n2.0\n")
    ct_idx, ct_val = [0, 7, 119], [1000.0, 1040.0, 0.5]
    dose_idx, dose_val = [7, 8, 100], [70.125, 1.5, 0.002]
    ptv_idx = [7, 8, 9]
    write_csv(folder / "ct.csv", list(zip(ct_idx, ct_val, strict=True)))
    write_csv(folder / "dose.csv", list(zip(dose_idx, dose_val, strict=True)))
    write_csv(folder / "PTV70.csv", [(i, None) for i in ptv_idx])
    write_csv(folder / "possible_dose_mask.csv", [(i, None) for i in range(0, 120, 2)])
    write_csv(folder / "Larynx.csv", [])  # header only: an empty structure is allowed for OARs
    ct = np.full(SHAPE, -1000.0)
    for i, v in zip(ct_idx, ct_val, strict=True):
        ct[np.unravel_index(i, SHAPE)] = v - 1000.0
    dose = np.zeros(SHAPE)
    for i, v in zip(dose_idx, dose_val, strict=True):
        dose[np.unravel_index(i, SHAPE)] = v
    ptv = np.zeros(SHAPE, bool)
    for i in ptv_idx:
        ptv[np.unravel_index(i, SHAPE)] = True
    return {"ct": ct, "dose": dose, "ptv": ptv}


def test_tiny_case_values(tmp_path: Path) -> None:
    expected = tiny_case(tmp_path / "pt_9")
    case = read_openkbp_csv_case(tmp_path / "pt_9", shape=SHAPE)
    np.testing.assert_allclose(case.ct_hu, expected["ct"], atol=1e-4)
    np.testing.assert_allclose(case.dose_gy, expected["dose"], atol=1e-6)
    np.testing.assert_array_equal(case.structures["PTV70"].mask, expected["ptv"])
    assert case.structures["PTV70"].prescription_gy == 70.0
    assert not case.structures["Larynx"].mask.any()
    assert case.body.sum() == 60
    np.testing.assert_allclose(case.grid.affine, np.diag([3.5, 3.5, 2.0, 1.0]))


def test_missing_voxel_dimensions(tmp_path: Path) -> None:
    tiny_case(tmp_path / "pt_9")
    (tmp_path / "pt_9" / "voxel_dimensions.csv").unlink()
    with pytest.raises(CaseError, match="voxel_dimensions.csv is missing") as err:
        read_openkbp_csv_case(tmp_path / "pt_9", shape=SHAPE)
    assert err.value.case == "pt_9" and err.value.file.endswith("voxel_dimensions.csv")


def test_bad_voxel_dimensions(tmp_path: Path) -> None:
    tiny_case(tmp_path / "pt_9")
    (tmp_path / "pt_9" / "voxel_dimensions.csv").write_text("3.5\n3.5\n")
    with pytest.raises(CaseError, match="three positive spacings") as err:
        read_openkbp_csv_case(tmp_path / "pt_9", shape=SHAPE)
    assert err.value.file.endswith("voxel_dimensions.csv")


def test_index_out_of_range(tmp_path: Path) -> None:
    tiny_case(tmp_path / "pt_9")
    write_csv(tmp_path / "pt_9" / "PTV70.csv", [(3, None), (120, None)])  # 4*5*6 = 120 voxels
    with pytest.raises(CaseError, match=r"voxel index 120 out of range .*0\.\.119") as err:
        read_openkbp_csv_case(tmp_path / "pt_9", shape=SHAPE)
    assert err.value.file.endswith("PTV70.csv")


def test_negative_or_fractional_index(tmp_path: Path) -> None:
    tiny_case(tmp_path / "pt_9")
    write_csv(tmp_path / "pt_9" / "dose.csv", [(3.5, 1.0)])
    with pytest.raises(CaseError, match="integer voxel indices") as err:
        read_openkbp_csv_case(tmp_path / "pt_9", shape=SHAPE)
    assert err.value.file.endswith("dose.csv")


def test_non_numeric_value(tmp_path: Path) -> None:
    tiny_case(tmp_path / "pt_9")
    write_csv(tmp_path / "pt_9" / "ct.csv", [(0, 1000.0), (1, "abc")])
    with pytest.raises(CaseError, match="non-numeric") as err:
        read_openkbp_csv_case(tmp_path / "pt_9", shape=SHAPE)
    assert err.value.file.endswith("ct.csv") and "pt_9" in str(err.value)


def test_empty_value_in_dose(tmp_path: Path) -> None:
    tiny_case(tmp_path / "pt_9")
    write_csv(tmp_path / "pt_9" / "dose.csv", [(0, 1.0), (1, None)])
    with pytest.raises(CaseError) as err:
        read_openkbp_csv_case(tmp_path / "pt_9", shape=SHAPE)
    assert err.value.file.endswith("dose.csv")


def test_wrong_header(tmp_path: Path) -> None:
    tiny_case(tmp_path / "pt_9")
    write_csv(tmp_path / "pt_9" / "Larynx.csv", [(1, None)], header="index,value")
    with pytest.raises(CaseError, match="header ',data'") as err:
        read_openkbp_csv_case(tmp_path / "pt_9", shape=SHAPE)
    assert err.value.file.endswith("Larynx.csv")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match="does not exist"):
        read_openkbp_csv_case(tmp_path / "nope")
