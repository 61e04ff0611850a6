"""DICOM reader checked against hand-made RT objects (answers computed analytically, not by our
writer) and the bad-input errors (non-DICOM file in a series, truncated file,
mixed series, other frame of reference, missing CT ...): one CaseError naming case and file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure
from diffkt3d.errors import CaseError
from diffkt3d.io.dicom import read_dicom_case, write_dicom_case
from diffkt3d.io.image_guard import ImageLimits

SHAPE = (24, 20, 10)
# RAS affine: 2 x 2.5 x 3 mm, origin (-20, 10, -12) -> LPS origin (20, -10, -12)
AFFINE = np.array([[2.0, 0, 0, -20.0], [0, 2.5, 0, 10.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])


def small_case() -> Case:
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    ptv = (abs(ii - 12) <= 3) & (abs(jj - 10) <= 3) & (kk >= 3) & (kk <= 6)
    oar = (abs(ii - 5) <= 1) & (abs(jj - 5) <= 2) & (kk >= 2)
    body = (abs(ii - 12) <= 10) & (abs(jj - 10) <= 8)
    grid = Grid(shape=SHAPE, affine=AFFINE)
    case = Case(case_id="small", grid=grid, ct_hu=(ii * 10 - 300 + kk).astype(np.float32),
                dose_gy=(ptv * 50.0 + body * 5.0).astype(np.float32), body=body,
                structures={"PTV50": Structure("PTV50", ptv, "target", 50.0),
                            "Parotid_L": Structure("Parotid_L", oar, "oar")})
    case.plan = Plan(beams=BeamGeometry([0.0, 120.0, 240.0], (4.0, 35.0, 1.5)), fractions=25)
    return case


@pytest.fixture()
def exported(tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    write_dicom_case(small_case(), folder)
    return folder


def ras_to_index(xyz_ras: np.ndarray) -> np.ndarray:
    return (np.asarray(xyz_ras) - AFFINE[:3, 3]) / np.diag(AFFINE)[:3]


# -- reader against independent answers -----------------------------------------------------------
def _square(cx: float, cy: float, half: float, z: float) -> list[float]:
    """Closed square contour in LPS mm (4 corners)."""
    pts = [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    return [v for x, y in pts for v in (x, y, z)]


def test_rtstruct_fill_with_hole_and_roles(exported: Path) -> None:
    """Replace the exported contours by hand-written squares: an outer square with an inner
    square (a hole, even-odd rule) on slice 4, and ROIs whose role comes from their type."""
    rs = pydicom.dcmread(str(exported / "RS.dcm"))
    # slice k=4 lies at LPS z = -12 + 3 * 4 = 0; centre the squares between voxel centres so no
    # centre is on an edge: LPS x = -(RAS x); RAS x of voxel i = -20 + 2 i
    z = 0.0
    cx_lps, cy_lps = 0.3, -31.1  # RAS (-0.3, 31.1)
    contours = []
    for half in (9.0, 4.0):
        c = Dataset()
        c.ContourGeometricType = "CLOSED_PLANAR"
        c.NumberOfContourPoints = 4
        c.ContourData = _square(cx_lps, cy_lps, half, z)
        contours.append(c)
    rs.ROIContourSequence[0].ContourSequence = Sequence(contours)  # ROI 1 = BODY -> rename below
    rs.StructureSetROISequence[0].ROIName = "Ring"
    rs.RTROIObservationsSequence[0].RTROIInterpretedType = "PTV"  # role from the type
    rs.StructureSetROISequence[1].ROIName = "Outline"  # body from the name
    rs.save_as(str(exported / "RS.dcm"))
    # drop the plan so PTV prescriptions are not taken from its DoseReferenceSequence
    (exported / "RP.dcm").unlink()

    case = read_dicom_case(exported)
    ring = case.structures["Ring"]
    assert ring.role == "target" and ring.prescription_gy is None
    ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    x_ras, y_ras = -20.0 + 2.0 * ii, 10.0 + 2.5 * jj
    dx, dy = np.abs(x_ras - (-cx_lps)), np.abs(y_ras - (-cy_lps))
    expected = ((dx < 9) & (dy < 9)) & ~((dx < 4) & (dy < 4))
    assert expected.sum() > 10 and (~expected[(dx < 4) & (dy < 4)]).all()
    np.testing.assert_array_equal(ring.mask[:, :, 4], expected)
    assert not ring.mask[:, :, [0, 1, 2, 3, 5, 6, 7, 8, 9]].any()
    # "Outline" (PTV50's ROI renamed) is a body by name and becomes case.body
    assert "Outline" not in case.structures and case.body is not None
    assert case.plan.beams is not None and any("preset" in s for s in case.plan.inferred)


def test_rtdose_on_other_grid_is_interpolated(exported: Path) -> None:
    """RTDOSE on a coarser, shifted grid holding a linear function of position (absolute
    GridFrameOffsetVector): trilinear resampling of a linear field is exact, so every CT voxel
    inside the dose grid must get the function's value at its centre, and 0 outside."""
    rd = pydicom.dcmread(str(exported / "RD.dcm"))
    # CT voxel centres in LPS: x 20 .. -26, y -10 .. -57.5, z -12 .. 15 (mm)
    origin = np.array([-22.5, -50.0, -9.0])  # LPS, first dose voxel centre
    step = np.array([3.0, 4.0, 4.5])  # mm along +x (columns), +y (rows), +z (frames)
    n = (12, 9, 5)  # columns (x), rows (y), frames (z)
    rd.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rd.ImagePositionPatient = [float(v) for v in origin]
    rd.PixelSpacing = [float(step[1]), float(step[0])]
    rd.Rows, rd.Columns, rd.NumberOfFrames = n[1], n[0], n[2]
    rd.GridFrameOffsetVector = [float(origin[2] + step[2] * f) for f in range(n[2])]  # absolute
    rd.BitsAllocated, rd.BitsStored, rd.HighBit = 32, 32, 31

    def field(x, y, z):  # Gy, positive on the grid
        return 40.0 + 0.5 * x - 0.25 * y + 0.8 * z

    c, r, f = np.meshgrid(*(np.arange(v) for v in n), indexing="ij")
    values = field(origin[0] + c * step[0], origin[1] + r * step[1], origin[2] + f * step[2])
    scaling = 1e-6
    rd.DoseGridScaling = scaling
    rd.PixelData = np.rint(values / scaling).astype("<u4").transpose(2, 1, 0).tobytes()
    rd.save_as(str(exported / "RD.dcm"))

    case = read_dicom_case(exported)
    ijk = np.argwhere(np.ones(SHAPE, dtype=bool))
    lps = case.grid.index_to_world(ijk) * np.array([-1.0, -1.0, 1.0])
    lo, hi = origin, origin + step * (np.asarray(n) - 1)
    inside = np.all((lps >= lo - 1e-9) & (lps <= hi + 1e-9), axis=1)
    outside = np.any((lps < lo - 1e-3) | (lps > hi + 1e-3), axis=1)
    assert inside.sum() > 50
    got = case.dose_gy[tuple(ijk.T)]
    np.testing.assert_allclose(got[inside], field(*lps[inside].T), atol=1e-4)
    assert np.all(got[outside] == 0)


# -- bad input -------------------------------------------------------------------------------------
def _expect(folder: Path, file_part: str, *words: str) -> CaseError:
    with pytest.raises(CaseError) as info:
        read_dicom_case(folder)
    err = info.value
    assert err.case == folder.name
    assert err.file is not None and file_part in err.file
    for word in words:
        assert word.lower() in str(err).lower()
    return err


def test_non_dicom_file_in_series(exported: Path) -> None:
    (exported / "notes.txt").write_text("exported by hand\n")
    _expect(exported, "notes.txt", "not a DICOM file")


def test_truncated_pixel_data(exported: Path) -> None:
    path = exported / "CT_0005.dcm"
    path.write_bytes(path.read_bytes()[:-300])
    _expect(exported, "CT_0005.dcm", "truncated")


def test_truncated_header(exported: Path) -> None:
    path = exported / "RD.dcm"
    path.write_bytes(path.read_bytes()[:200])
    _expect(exported, "RD.dcm", "truncated")


def test_mixed_ct_series(exported: Path) -> None:
    ds = pydicom.dcmread(str(exported / "CT_0003.dcm"))
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(str(exported / "CT_0003.dcm"))
    _expect(exported, "CT_", "different series")


def test_dose_from_other_frame_of_reference(exported: Path) -> None:
    ds = pydicom.dcmread(str(exported / "RD.dcm"))
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(str(exported / "RD.dcm"))
    _expect(exported, "RD.dcm", "FrameOfReferenceUID")


def test_missing_ct(exported: Path) -> None:
    for p in exported.glob("CT_*.dcm"):
        p.unlink()
    err = _expect(exported, "small", "no CT")
    assert "RTSTRUCT" in str(err)


def test_missing_slice(exported: Path) -> None:
    (exported / "CT_0005.dcm").unlink()
    err = _expect(exported, "CT_0006", "uneven CT slice spacing", "6.000 mm", "expected 3.000 mm")
    assert "CT_0004.dcm" in str(err)


def test_two_structure_sets(exported: Path) -> None:
    shutil.copy(exported / "RS.dcm", exported / "RS_copy.dcm")
    _expect(exported, "RS", "2 RTSTRUCT files")


def test_writer_refuses_non_empty_folder(exported: Path) -> None:
    with pytest.raises(CaseError, match="not empty"):
        write_dicom_case(small_case(), exported)
    write_dicom_case(small_case(), exported, overwrite=True)  # replaces its own files
    assert len(list(exported.glob("*.dcm"))) == SHAPE[2] + 3


def test_writer_needs_ct(tmp_path: Path) -> None:
    case = small_case()
    case.ct_hu = None
    with pytest.raises(CaseError, match="without a CT"):
        write_dicom_case(case, tmp_path / "out")


# -- third-party files shipped inside the pydicom wheel (no download) -------------------------------
def _pydicom_test_file(name: str) -> Path:
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"pydicom test file {name} not installed")
    return path


def test_foreign_ct_and_rtplan(tmp_path: Path) -> None:
    """pydicom's CT_small.dcm (one 128x128 slice) + rtplan.dcm (one static beam, no frame of
    reference): values compared with what pydicom itself reports for those files."""
    folder = tmp_path / "foreign"
    folder.mkdir()
    for name in ("CT_small.dcm", "rtplan.dcm"):
        shutil.copy(_pydicom_test_file(name), folder / name)
    ct_ds = pydicom.dcmread(str(folder / "CT_small.dcm"))
    plan_ds = pydicom.dcmread(str(folder / "rtplan.dcm"))
    case = read_dicom_case(folder)
    hu = ct_ds.pixel_array.astype(np.float64) * float(ct_ds.RescaleSlope) + float(ct_ds.RescaleIntercept)
    np.testing.assert_array_equal(case.ct_hu[:, :, 0], hu.T)
    iso_lps = [float(v) for v in plan_ds.BeamSequence[0].ControlPointSequence[0].IsocenterPosition]
    assert case.plan.beams is not None
    np.testing.assert_allclose(case.plan.beams.isocenter_mm, [-iso_lps[0], -iso_lps[1], iso_lps[2]])
    assert case.plan.beams.gantry_angles_deg == [0.0] and case.plan.beams.technique == "IMRT"
    assert case.plan.fractions == int(plan_ds.FractionGroupSequence[0].NumberOfFractionsPlanned)
    # RAS origin = LPS ImagePositionPatient with x, y negated
    ipp = [float(v) for v in ct_ds.ImagePositionPatient]
    np.testing.assert_allclose(case.grid.origin_mm, [-ipp[0], -ipp[1], ipp[2]])


def test_foreign_rtstruct_without_preamble_other_frame(tmp_path: Path) -> None:
    """pydicom's rtstruct.dcm has no preamble (read anyway) and another FrameOfReferenceUID than
    CT_small.dcm: the error names the structure set."""
    folder = tmp_path / "foreign"
    folder.mkdir()
    for name in ("CT_small.dcm", "rtstruct.dcm"):
        shutil.copy(_pydicom_test_file(name), folder / name)
    _expect(folder, "rtstruct.dcm", "FrameOfReferenceUID", "differs")


def test_beam_doses_are_summed_and_hidden_files_skipped(exported: Path) -> None:
    """Two per-beam RTDOSE files (no PLAN dose) add up; a .DS_Store is ignored, not an error."""
    single = read_dicom_case(exported).dose_gy
    rd = pydicom.dcmread(str(exported / "RD.dcm"))
    rd.DoseSummationType = "BEAM"
    rd.save_as(str(exported / "RD.dcm"))
    rd.SOPInstanceUID = rd.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    rd.save_as(str(exported / "RD_beam2.dcm"))
    (exported / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    case = read_dicom_case(exported)
    np.testing.assert_allclose(case.dose_gy, 2 * single, atol=1e-5)
    assert any("sum of 2 RTDOSE" in s for s in case.plan.inferred)


def test_malformed_rtplan_attribute(exported: Path) -> None:
    plan = pydicom.dcmread(str(exported / "RP.dcm"))
    tag = pydicom.tag.Tag(0x300A, 0x011E)  # GantryAngle, written raw: pydicom refuses "abc" as DS
    plan.BeamSequence[0].ControlPointSequence[0][tag] = pydicom.dataelem.RawDataElement(
        tag, "DS", 4, b"abc ", 0, False, True)
    plan.save_as(str(exported / "RP.dcm"))
    _expect(exported, "RP.dcm", "RTPLAN")


# -- header guard: sizes and pixel types checked before pixel data are decoded ------------------------
def _rewrite(path: Path, **values) -> None:
    ds = pydicom.dcmread(str(path))
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(str(path))


def test_ct_header_claiming_a_huge_image_is_refused_before_decoding(exported: Path) -> None:
    for path in sorted(exported.glob("CT_*.dcm")):
        _rewrite(path, Rows=4000, Columns=4000)  # 10 slices x 4000^2 x float32 = 610 MiB
    with pytest.raises(CaseError) as info:
        read_dicom_case(exported, limits=ImageLimits(max_image_mb=256))
    assert "CT series" in str(info.value) and "256 MiB" in str(info.value) and info.value.case == exported.name
    with pytest.raises(CaseError, match="outside 1..1000 voxels per axis"):
        read_dicom_case(exported, limits=ImageLimits(max_dim=1000))


def test_rgb_ct_is_refused(exported: Path) -> None:
    for path in sorted(exported.glob("CT_*.dcm")):
        _rewrite(path, SamplesPerPixel=3)
    _expect(exported, "CT_", "SamplesPerPixel 3", "RGB")


def test_rtdose_header_claiming_too_many_frames_is_refused(exported: Path) -> None:
    _rewrite(exported / "RD.dcm", NumberOfFrames=100000)
    with pytest.raises(CaseError) as info:
        read_dicom_case(exported, limits=ImageLimits(max_image_mb=64))
    assert "RTDOSE grid" in str(info.value) and "RD.dcm" in info.value.file
    read_dicom_case(exported, with_dose=False, limits=ImageLimits(max_image_mb=64))  # the dose is not read
