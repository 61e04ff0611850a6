"""GDP-HMM npz reader/writer on small files built with the GDP-HMM keys.

The geometry is checked against SimpleITK (the library GDP-HMM's DICOM2NPZ.py used to make the
files): the world position of a voxel computed by SimpleITK from origin/spacing/direction must
equal ours after LPS -> RAS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure
from diffkt3d.data.plates import add_plates, angle_plate, beam_plate
from diffkt3d.errors import CaseError
from diffkt3d.io.gdp_hmm import ptv_dict_entry, read_gdp_hmm, write_gdp_hmm

SHAPE_ZYX = (14, 8, 10)
SPACING_XYZ = (2.5, 2.5, 2.0)
ORIGIN_LPS = (-101.0, -120.5, 30.0)
# a head-first-supine CT with the slice order reversed (z runs inferior): direction diag(1, 1, -1)
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
PTV_DICT = {"pat01": {"PTV_High": {"OPTName": "PTV70OPT", "PDose": 70, "RingName": "RingPTV70"},
                      "PTV_Low": {"OPTName": "PTV56OPT", "PDose": 54.0, "StructName": "PTV56"}}}


def reference_image() -> sitk.Image:
    img = sitk.Image(SHAPE_ZYX[2], SHAPE_ZYX[1], SHAPE_ZYX[0], sitk.sitkInt16)  # size x, y, z
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN_LPS)
    img.SetDirection(DIRECTION)
    return img


def gdp_dict(spacing=SPACING_XYZ) -> dict:
    rng = np.random.default_rng(0)
    img = reference_image()
    ptv70 = np.zeros(SHAPE_ZYX, np.uint8)
    ptv70[5:8, 3:5, 4:6] = 1
    ptv56 = np.zeros(SHAPE_ZYX, np.uint8)
    ptv56[4:9, 2:6, 3:7] = 1
    ptv56[ptv70 > 0] = 0
    body = np.zeros(SHAPE_ZYX, np.uint8)
    body[:, 1:7, 1:9] = 1
    brainstem = np.zeros(SHAPE_ZYX, np.uint8)
    brainstem[10:12, 5:7, 4:6] = 1
    angle2d = np.zeros(SHAPE_ZYX[1:], np.float32)
    angle2d[1:4, 5] = 1
    return {
        "PTV70OPT": ptv70, "PTV56": ptv56, "PTV56OPT": ptv56.copy(), "Body": body, "Brainstem": brainstem,
        "RingPTV70": (ptv56 > 0).astype(np.uint8), "Larynx": np.zeros(SHAPE_ZYX, np.uint8),
        "img": rng.integers(-1000, 1500, SHAPE_ZYX).astype(np.int16),
        "dose": rng.integers(0, 80000, SHAPE_ZYX).astype(np.int32), "dose_scale": 0.001,
        "isVMAT": False, "isocenter": np.array([6, 4, 5], np.float32),
        "angle_list": np.array([0, 90, 180, 270], np.float32),
        "angle_plate": angle2d, "beam_plate": rng.random(SHAPE_ZYX).astype(np.float32),
        "origin": img.GetOrigin(), "spacing": spacing, "direction": img.GetDirection(),
        "size": img.GetSize(), "all_mask": ["PTV70OPT", "PTV56", "Body"],
    }


def write_raw(path: Path, data) -> Path:
    np.savez_compressed(path, data)  # exactly how GDP-HMM saved its files
    return path


def sitk_ras(zyx) -> np.ndarray:
    lps = reference_image().TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])
    return np.array([-lps[0], -lps[1], lps[2]])


def test_read_known_values(tmp_path: Path) -> None:
    raw = gdp_dict()
    case = read_gdp_hmm(write_raw(tmp_path / "pat01+plan2.npz", raw), PTV_DICT)
    assert case.case_id == "pat01+plan2"
    assert case.grid.shape == SHAPE_ZYX
    np.testing.assert_array_equal(case.ct_hu, raw["img"])
    np.testing.assert_allclose(case.dose_gy, raw["dose"] * 0.001, atol=1e-5)
    np.testing.assert_array_equal(case.body, raw["Body"] > 0)
    # prescriptions: OPTName and StructName get PDose; rings are helpers, not organs
    assert case.structures["PTV70OPT"].role == "target" and case.structures["PTV70OPT"].prescription_gy == 70
    assert case.structures["PTV56"].prescription_gy == 54.0 and case.structures["PTV56OPT"].prescription_gy == 54.0
    assert case.structures["Brainstem"].role == "oar"
    assert case.structures["RingPTV70"].role == "other"
    assert "Larynx" not in case.structures and "Larynx: empty mask, skipped" in case.plan.inferred
    # geometry: every corner and a middle voxel lands where SimpleITK puts it
    for zyx in [(0, 0, 0), (13, 7, 9), (6, 4, 5), (3.5, 2.25, 7.0)]:
        np.testing.assert_allclose(case.grid.index_to_world(np.array(zyx))[0], sitk_ras(zyx), atol=1e-9)
    np.testing.assert_allclose(case.grid.spacing_mm, (2.0, 2.5, 2.5))
    # plan
    b = case.plan.beams
    assert b.technique == "IMRT" and b.gantry_angles_deg == [0, 90, 180, 270]
    np.testing.assert_allclose(b.isocenter_mm, sitk_ras((6, 4, 5)), atol=1e-9)
    # plates: 3D beam plate as is, 2D angle plate repeated over slices int(iso_z)-5 .. +5 (end excl.)
    np.testing.assert_array_equal(case.beam_plate, raw["beam_plate"])
    for z in range(SHAPE_ZYX[0]):
        expected = raw["angle_plate"] if 1 <= z < 11 else np.zeros(SHAPE_ZYX[1:])
        np.testing.assert_array_equal(case.angle_plate[z], expected, err_msg=f"slice {z}")


def test_spacing_order_detected(tmp_path: Path) -> None:
    """The GDP-HMM documentation gives z-y-x ([2, 2.5, 2.5]); DICOM2NPZ.py stores SimpleITK x-y-z."""
    a = read_gdp_hmm(write_raw(tmp_path / "a.npz", gdp_dict(spacing=(2.5, 2.5, 2.0))))
    b = read_gdp_hmm(write_raw(tmp_path / "b.npz", gdp_dict(spacing=(2.0, 2.5, 2.5))))
    np.testing.assert_allclose(a.grid.affine, b.grid.affine)
    assert any("x-y-z" in n for n in a.plan.inferred)


def test_roundtrip_and_numpy_layout(tmp_path: Path) -> None:
    first = read_gdp_hmm(write_raw(tmp_path / "pat01.npz", gdp_dict()), PTV_DICT)
    out = write_gdp_hmm(first, tmp_path / "out" / "pat01.npz", dose_scale_gy=0.001)
    raw = np.load(out, allow_pickle=True)["arr_0"].item()  # how GDP-HMM code reads it
    assert raw["dose"].dtype.kind == "i" and raw["dose_scale"] == 0.001
    assert tuple(raw["spacing"]) == (2.0, 2.5, 2.5)  # z-y-x, the documented order
    assert tuple(raw["size"]) == (14, 8, 10) and raw["angle_plate"].shape == (8, 10)  # z-y-x like Body.shape
    np.testing.assert_allclose(raw["origin"], ORIGIN_LPS)
    np.testing.assert_allclose(raw["direction"], DIRECTION, atol=1e-12)
    np.testing.assert_allclose(raw["isocenter"], [6, 4, 5])
    back = read_gdp_hmm(out, {"pat01": ptv_dict_entry(first)})
    assert back.grid.same_as(first.grid, tol_mm=1e-9)
    np.testing.assert_array_equal(back.ct_hu, first.ct_hu)
    np.testing.assert_allclose(back.dose_gy, first.dose_gy, atol=1e-6)
    np.testing.assert_array_equal(back.beam_plate, first.beam_plate)
    np.testing.assert_array_equal(back.angle_plate, first.angle_plate)
    for name, s in first.structures.items():
        np.testing.assert_array_equal(back.structures[name].mask, s.mask)
    assert back.structures["PTV70OPT"].prescription_gy == 70.0
    np.testing.assert_allclose(back.plan.beams.isocenter_mm, first.plan.beams.isocenter_mm, atol=1e-4)


def test_unoriented_case_exported_with_orientation(tmp_path: Path) -> None:
    """An OpenKBP-layout case (affine diag(spacing): no orientation) is written in GDP-HMM (z, y, x)
    with a real orientation; plates rasterised on the re-read file equal the original's."""
    shape = (20, 22, 12)  # OpenKBP axes: anterior->posterior, right->left, superior->inferior
    ptv = np.zeros(shape, bool)
    ptv[8:12, 9:13, 5:8] = True
    grid = Grid(shape=shape, affine=np.diag([4.0, 4.0, 2.5, 1.0]))
    iso = tuple(float(v) for v in grid.index_to_world(np.argwhere(ptv).mean(0))[0])
    case = Case("pt_x", grid, ct_hu=np.zeros(shape, np.float32), body=np.ones(shape, bool),
                structures={"PTV70": Structure("PTV70", ptv, "target", 70.0)},
                plan=Plan(beams=BeamGeometry([0.0, 40.0, 80.0, 200.0], iso)))
    case = add_plates(case)
    back = read_gdp_hmm(write_gdp_hmm(case, tmp_path / "pt_x.npz"))
    perm = (2, 0, 1)  # z = superior-inferior axis, y = anterior-posterior, x = right-left
    np.testing.assert_array_equal(back.structures["PTV70"].mask, np.transpose(ptv, perm))
    np.testing.assert_allclose(beam_plate(back), np.transpose(case.beam_plate, perm), atol=1e-4)
    np.testing.assert_array_equal(angle_plate(back), np.transpose(case.angle_plate, perm))
    # RAS: +y world is anterior, and OpenKBP axis 0 (array y now) runs anterior -> posterior
    assert back.grid.affine[1, 1] < 0 and back.grid.affine[0, 2] < 0


def test_refuses_non_dict_payload(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match="must hold a dict") as err:
        read_gdp_hmm(write_raw(tmp_path / "arr.npz", np.arange(5)))
    assert err.value.file.endswith("arr.npz")
    np.savez(tmp_path / "other.npz", img=np.zeros(3))
    with pytest.raises(CaseError, match="'arr_0'"):
        read_gdp_hmm(tmp_path / "other.npz")


def test_truncated_and_bad_files(tmp_path: Path) -> None:
    good = write_raw(tmp_path / "good.npz", gdp_dict())
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CaseError, match="npz") as err:
        read_gdp_hmm(cut)
    assert err.value.file.endswith("cut.npz")
    with pytest.raises(CaseError, match="not found"):
        read_gdp_hmm(tmp_path / "missing.npz")


def test_inconsistent_keys(tmp_path: Path) -> None:
    raw = gdp_dict()
    raw["size"] = SHAPE_ZYX  # released files store Body.shape: accepted as well as GetSize()
    assert read_gdp_hmm(write_raw(tmp_path / "size_zyx.npz", raw)).grid.shape == SHAPE_ZYX
    raw["size"] = (10, 8, 13)
    with pytest.raises(CaseError, match="'size'"):
        read_gdp_hmm(write_raw(tmp_path / "size.npz", raw))
    raw = gdp_dict()
    raw["Brainstem"] = raw["Brainstem"][:-1]
    with pytest.raises(CaseError, match="'Brainstem' has shape"):
        read_gdp_hmm(write_raw(tmp_path / "mask.npz", raw))
    raw = gdp_dict()
    del raw["dose_scale"]
    with pytest.raises(CaseError, match="dose_scale"):
        read_gdp_hmm(write_raw(tmp_path / "scale.npz", raw))


def test_patient_not_in_ptv_dict(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "pat99+a.npz", gdp_dict())
    with pytest.raises(CaseError, match="'pat99' is not in the prescription table"):
        read_gdp_hmm(path, PTV_DICT)
