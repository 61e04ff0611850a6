"""DICOM RT round trip: case -> DICOM RT -> case keeps CT, masks and dose.

Promises checked: CT exact, Dice >= 0.95 per structure, dose max error <= 0.01 Gy (and
<= DoseGridScaling / 2), beams/prescriptions/fractions kept, world geometry (LPS <-> RAS) right.
The written files are also read with SimpleITK/GDCM, an independent DICOM reader, and compared
value-at-world-position with the original case.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.io.dicom import read_dicom_case, write_dicom_case

PT_201 = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation/pt_201")
SAMPLE = Path(__file__).resolve().parents[2] / "sample-data" / "dicom" / "pt_201"
needs_openkbp = pytest.mark.skipif(not PT_201.is_dir(), reason="OpenKBP validation data not on this machine")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def crop_case(case: Case, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> Case:
    """Sub-block [lo, hi) of a case, affine origin moved accordingly; empty structures dropped."""
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    affine = case.grid.affine.copy()
    affine[:3, 3] = case.grid.index_to_world(np.asarray(lo))[0]
    structures = {n: Structure(n, s.mask[sl], s.role, s.prescription_gy)
                  for n, s in case.structures.items() if s.mask[sl].any()}
    shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
    return Case(case_id=case.case_id, grid=Grid(shape=shape, affine=affine),
                ct_hu=case.ct_hu[sl], dose_gy=case.dose_gy[sl], body=case.body[sl], structures=structures,
                plan=case.plan)


def original_layout(grid: Grid, original: Grid):
    """Function re-indexing arrays on `grid` onto `original` by world position; the grids must
    coincide voxel-for-voxel up to axis flips/permutations (checked once here)."""
    ijk = np.argwhere(np.ones(grid.shape, dtype=bool))
    orig_ijk = original.world_to_index(grid.index_to_world(ijk))
    rounded = np.rint(orig_ijk).astype(int)
    assert np.abs(orig_ijk - rounded).max() < 1e-3, "grids do not coincide voxel-for-voxel"
    src, dst = tuple(ijk.T), tuple(rounded.T)

    def move(array: np.ndarray) -> np.ndarray:
        out = np.empty(original.shape, dtype=array.dtype)
        out[dst] = array[src]
        return out

    return move


def assert_roundtrip(original: Case, back: Case, rd_path: Path) -> dict[str, float]:
    """Check every promise; returns per-structure Dice for the report."""
    in_original_layout = original_layout(back.grid, original.grid)
    ct = in_original_layout(back.ct_hu)
    np.testing.assert_array_equal(ct, np.rint(original.ct_hu))
    scaling = float(pydicom.dcmread(str(rd_path), stop_before_pixels=True).DoseGridScaling)
    dose = in_original_layout(back.dose_gy)
    err = float(np.abs(dose - original.dose_gy).max())
    assert err <= 0.01, f"dose max abs error {err:.4f} Gy > 0.01 Gy"
    # bound: half a stored unit, plus float32 rounding of ~70 Gy values (half-ulp 3.8e-6) twice
    assert err <= scaling / 2 + 1e-5, f"dose error {err} exceeds the quantisation bound {scaling / 2}"
    body = in_original_layout(back.body)
    assert dice(body, original.body) >= 0.95
    assert set(back.structures) == set(original.structures)
    scores = {}
    for name, s in original.structures.items():
        got = back.structures[name]
        scores[name] = dice(in_original_layout(got.mask), s.mask)
        assert scores[name] >= 0.95, f"{name}: Dice {scores[name]:.3f} < 0.95"
        assert got.role == s.role
        assert got.prescription_gy == s.prescription_gy
    assert back.plan.fractions == original.plan.fractions
    b, ob = back.plan.beams, original.plan.beams
    assert b is not None and ob is not None
    np.testing.assert_allclose(b.gantry_angles_deg, [a % 360 for a in ob.gantry_angles_deg], atol=1e-6)
    np.testing.assert_allclose(b.isocenter_mm, ob.isocenter_mm, atol=1e-3)
    assert b.technique == ob.technique
    return scores


def synthetic_case(affine: np.ndarray, shape: tuple[int, int, int] = (20, 16, 12),
                   technique: str = "IMRT") -> Case:
    """Small case with a ring-shaped PTV (a hole on every slice), a diagonal-voxel OAR (saddle
    points for marching squares), integer CT and a smooth dose."""
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ci, cj = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    r2 = (ii - ci) ** 2 + (jj - cj) ** 2
    body = r2 <= (min(shape[:2]) / 2 - 1) ** 2
    ring = (r2 >= 2.0**2) & (r2 <= 5.0**2) & (kk >= 3) & (kk <= 8)
    diagonal = (((ii + jj) % 2) == 0) & (ii >= 2) & (ii <= 5) & (jj >= 2) & (jj <= 6) & (kk >= 2) & (kk <= 4)
    ct = (ii * 7 - jj * 3 + kk * 11 - 500).astype(np.float32)
    dose = (20.0 + 2.0 * ii - 1.3 * jj + 0.71 * kk + 10.0 * ring).astype(np.float32) * body
    grid = Grid(shape=shape, affine=affine)
    case = Case(case_id="synth", grid=grid, ct_hu=ct, dose_gy=dose, body=body,
                structures={"PTV60": Structure("PTV60", ring, "target", 60.0),
                            "Cord": Structure("Cord", diagonal, "oar", None)})
    angles = [181.0, 185.0, 190.0, 200.0] if technique == "VMAT" else [0.0, 90.0, 270.0]
    case.plan = Plan(beams=BeamGeometry(angles, tuple(grid.index_to_world([ci, cj, 5])[0]), technique),
                     fractions=30)
    return case


def _rotation_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


AFFINES = {
    "axial": np.diag([2.0, 2.5, 3.0, 1.0]),
    # RAS axis 2 pointing inferior: left-handed in DICOM terms, the writer must reverse the slices
    "flipped-k": np.array([[1.5, 0, 0, -40.0], [0, 2.0, 0, 12.5], [0, 0, -2.5, 100.0], [0, 0, 0, 1]]),
    # oblique in-plane rotation, anisotropic spacing, arbitrary origin
    "oblique": np.block([[_rotation_z(30.0) @ np.diag([1.7, 2.3, 3.1]), np.array([[5.0], [-7.5], [20.0]])],
                         [np.zeros((1, 3)), np.ones((1, 1))]]),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_synthetic_roundtrip_geometry(tmp_path: Path, name: str) -> None:
    case = synthetic_case(AFFINES[name])
    write_dicom_case(case, tmp_path / "dcm")
    back = read_dicom_case(tmp_path / "dcm")
    scores = assert_roundtrip(case, back, tmp_path / "dcm" / "RD.dcm")
    # marching-squares contours put every voxel centre on the correct side: exact masks
    assert scores == {"PTV60": 1.0, "Cord": 1.0}
    # the reader keeps the world frame: the case's RAS affine equals the original one (up to
    # the slice reversal the writer documents for left-handed grids)
    expected = AFFINES[name].copy()
    if name == "flipped-k":
        expected[:3, 3] += expected[:3, 2] * (case.grid.shape[2] - 1)
        expected[:3, 2] *= -1
    np.testing.assert_allclose(back.grid.affine, expected, atol=1e-6)


def test_vmat_plan_roundtrip(tmp_path: Path) -> None:
    case = synthetic_case(AFFINES["axial"], technique="VMAT")
    write_dicom_case(case, tmp_path / "dcm")
    back = read_dicom_case(tmp_path / "dcm")
    assert back.plan.beams is not None and back.plan.beams.technique == "VMAT"
    np.testing.assert_allclose(back.plan.beams.gantry_angles_deg, [181.0, 185.0, 190.0, 200.0])
    plan = pydicom.dcmread(str(tmp_path / "dcm" / "RP.dcm"))
    assert len(plan.BeamSequence) == 1 and plan.BeamSequence[0].BeamType == "DYNAMIC"


def test_uids_and_sop_classes_consistent(tmp_path: Path) -> None:
    written = write_dicom_case(synthetic_case(AFFINES["oblique"]), tmp_path / "dcm", patient_id="X1",
                               patient_name="DiffKT3D^Test")
    datasets = {kind: [pydicom.dcmread(str(p)) for p in paths] for kind, paths in written.items()}
    every = [d for ds_list in datasets.values() for d in ds_list]
    assert len({d.StudyInstanceUID for d in every}) == 1
    rs = datasets["RTSTRUCT"][0]
    frames = {d.FrameOfReferenceUID for kind in ("CT", "RTPLAN", "RTDOSE") for d in datasets[kind]}
    assert frames == {rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID}
    assert rs.StructureSetROISequence[0].ReferencedFrameOfReferenceUID in frames
    assert len({d.SOPInstanceUID for d in every}) == len(every)
    assert {d.SOPClassUID for d in datasets["CT"]} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert datasets["RTSTRUCT"][0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert datasets["RTPLAN"][0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.5"
    assert datasets["RTDOSE"][0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2"
    for d in every:
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert d.PatientID == "X1" and str(d.PatientName) == "DiffKT3D^Test"
        assert pydicom.uid.UID(d.SOPInstanceUID).is_valid
    for kind in ("RTSTRUCT", "RTPLAN", "RTDOSE"):  # RT Series module: OperatorsName is type 2
        assert "OperatorsName" in datasets[kind][0], kind
    rd, rp = datasets["RTDOSE"][0], datasets["RTPLAN"][0]
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == rp.SOPInstanceUID
    ct_uids = {d.SOPInstanceUID for d in datasets["CT"]}
    contours = datasets["RTSTRUCT"][0].ROIContourSequence
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID
            for roi in contours for c in roi.ContourSequence}
    assert refs <= ct_uids


def _sitk_check(case: Case, folder: Path) -> None:
    """SimpleITK (GDCM) reads the CT series and RTDOSE; values at its physical points (LPS,
    converted here to RAS by negating x, y) must equal the original case's values there."""
    reader = sitk.ImageSeriesReader()
    ct_series = pydicom.dcmread(str(folder / "CT_0001.dcm"), stop_before_pixels=True).SeriesInstanceUID
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), ct_series))
    ct_img = reader.Execute()
    dose_img = sitk.ReadImage(str(folder / "RD.dcm"))
    scaling = float(pydicom.dcmread(str(folder / "RD.dcm"), stop_before_pixels=True).DoseGridScaling)
    rng = np.random.default_rng(0)
    for img, original, tol in ((ct_img, case.ct_hu, 0.0), (dose_img, case.dose_gy, scaling / 2 + 1e-5)):
        assert img.GetSize() == tuple(case.grid.shape)
        np.testing.assert_allclose(img.GetSpacing(), case.grid.spacing_mm, rtol=1e-6)
        array = sitk.GetArrayFromImage(img)  # (K, J, I)
        factor = 1.0 if tol == 0.0 else scaling
        for idx in rng.integers(0, case.grid.shape, size=(50, 3)):
            lps = np.asarray(img.TransformIndexToPhysicalPoint([int(v) for v in idx]))
            ras = lps * np.array([-1.0, -1.0, 1.0])
            orig_idx = np.rint(case.grid.world_to_index(ras)[0]).astype(int)
            assert np.allclose(case.grid.world_to_index(ras)[0], orig_idx, atol=1e-3)
            value = float(array[idx[2], idx[1], idx[0]]) * factor
            assert abs(value - float(original[tuple(orig_idx)])) <= tol


@pytest.mark.parametrize("name", ["flipped-k", "oblique"])
def test_written_files_read_by_simpleitk(tmp_path: Path, name: str) -> None:
    case = synthetic_case(AFFINES[name])
    write_dicom_case(case, tmp_path / "dcm")
    _sitk_check(case, tmp_path / "dcm")


@pytest.fixture(scope="module")
def cropped_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Path]:
    """Real case pt_201 cropped in-plane around the structures (speed; every structure stays
    whole), exported once for the tests below."""
    if not PT_201.is_dir():
        pytest.skip("OpenKBP validation data not on this machine")
    full = load_case_folder(PT_201)
    case = crop_case(full, (40, 46, 16), (84, 82, 124))
    assert all(case.structures[n].mask.sum() == s.mask.sum() for n, s in full.structures.items())
    folder = tmp_path_factory.mktemp("pt_201_cropped") / "dcm"
    write_dicom_case(case, folder, patient_id="OpenKBP-pt_201", patient_name="DiffKT3D^Sample")
    return case, folder


def test_openkbp_roundtrip_cropped(cropped_export: tuple[Case, Path]) -> None:
    case, folder = cropped_export
    back = read_dicom_case(folder)
    assert_roundtrip(case, back, folder / "RD.dcm")
    _sitk_check(case, folder)


def _dicompyler_check(case: Case, folder: Path) -> None:
    """dicompyler-core computes DVHs from our RTSTRUCT + RTDOSE with its own contour and dose
    handling; volume, mean and max dose per ROI must equal the original masks/dose (its DVH has
    1 cGy bins, so Dmax is read at a bin edge: tolerance 0.011 Gy)."""
    dvhcalc = pytest.importorskip("dicompylercore.dvhcalc")
    rs = pydicom.dcmread(str(folder / "RS.dcm"))
    for roi in rs.StructureSetROISequence:
        name = str(roi.ROIName)
        mask = case.body if name == "BODY" else case.structures[name].mask
        ref = case.dose_gy[mask]
        dvh = dvhcalc.get_dvh(str(folder / "RS.dcm"), str(folder / "RD.dcm"), int(roi.ROINumber))
        volume_cc = mask.sum() * case.grid.voxel_volume_mm3 / 1000.0
        assert dvh.volume == pytest.approx(volume_cc, rel=1e-3), name
        assert dvh.mean == pytest.approx(float(ref.mean()), abs=0.01), name
        assert dvh.max == pytest.approx(float(ref.max()), abs=0.011), name


def test_openkbp_dvh_by_dicompyler(cropped_export: tuple[Case, Path]) -> None:
    case, folder = cropped_export
    _dicompyler_check(case, folder)


@pytest.mark.slow
@needs_openkbp
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="sample-data/dicom/pt_201 not present")
def test_sample_data_reimports() -> None:
    """sample-data/dicom/pt_201 (the shipped DICOM sample) is pt_201 exported by this writer: re-importing
    it must give the validation case back."""
    original = load_case_folder(PT_201)
    back = read_dicom_case(SAMPLE)
    assert back.case_id == "pt_201"
    assert_roundtrip(original, back, SAMPLE / "RD.dcm")
    ct = pydicom.dcmread(str(SAMPLE / "CT_0001.dcm"), stop_before_pixels=True)
    assert ct.PatientID == "OpenKBP-pt_201" and str(ct.PatientName) == "DiffKT3D^Sample"


@pytest.mark.slow
@needs_openkbp
def test_openkbp_roundtrip_full(tmp_path: Path) -> None:
    case = load_case_folder(PT_201)
    write_dicom_case(case, tmp_path / "dcm", patient_id="OpenKBP-pt_201", patient_name="DiffKT3D^Sample")
    back = read_dicom_case(tmp_path / "dcm")
    assert_roundtrip(case, back, tmp_path / "dcm" / "RD.dcm")
    _sitk_check(case, tmp_path / "dcm")
