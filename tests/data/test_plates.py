"""Beam / angle plates: geometry checked against analytic beam cones and IEC angles.

Independent references: the IEC 61217 source position written out by hand in RAS+
(gantry theta -> source at iso + SAD * (-sin theta, cos theta, 0): left is -x, anterior +y), the
divergent cone of a spherical PTV computed from point-to-ray distances, scipy.ndimage morphology.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure
from diffkt3d.data.plates import (
    _box_morphology,
    angle_plate,
    beam_plate,
    ensure_plates,
    patient_frame,
    single_beam_mask,
)
from diffkt3d.io.case_folder import load_case_folder

SPACING = (2.5, 3.0, 4.0)  # anisotropic on purpose
SHAPE = (60, 50, 30)
PT_201 = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation/pt_201")


def sphere_case(angles, technique="IMRT", radius_mm=15.0, iso_ijk=(30, 25, 15), shape=SHAPE) -> Case:
    """RAS-oriented grid (x right, y anterior, z superior, origin off zero) with a PTV sphere at iso."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-75.0, -60.0, 10.0)
    grid = Grid(shape=shape, affine=affine)
    iso = grid.index_to_world(np.array(iso_ijk))[0]
    world = grid.index_to_world(np.argwhere(np.ones(shape, bool))).reshape(*shape, 3)
    ptv = np.linalg.norm(world - iso, axis=-1) <= radius_mm
    return Case("sphere", grid, body=np.ones(shape, bool),
                structures={"PTV70": Structure("PTV70", ptv, "target", 70.0)},
                plan=Plan(beams=BeamGeometry(list(angles), tuple(iso), technique)))


def iec_source_dir_ras(theta_deg: float) -> np.ndarray:
    th = np.deg2rad(theta_deg)
    return np.array([-np.sin(th), np.cos(th), 0.0])


def test_morphology_equals_scipy() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        m = rng.random((15, 12, 10)) > 0.9
        ref = ndimage.binary_erosion(ndimage.binary_dilation(m, np.ones((4, 4, 4))), np.ones((3, 3, 3)))
        np.testing.assert_array_equal(_box_morphology(m, 4, 3), ref)


@pytest.mark.parametrize("theta", [0.0, 90.0, 180.0, 270.0])
def test_central_axis_inverse_square(theta: float) -> None:
    """Non-zero along the whole central axis (entry and exit), = SAD^2 / |src - voxel|^2 there."""
    case = sphere_case([theta])
    plate = beam_plate(case)
    iso = np.asarray(case.plan.beams.isocenter_mm)
    src = iso + 1000.0 * iec_source_dir_ras(theta)
    iso_ijk = np.array([30, 25, 15])
    step = np.rint(iec_source_dir_ras(theta)).astype(int)  # axis-aligned beams hit voxel centres
    n_on_axis = 0
    for k in range(-60, 61):
        ijk = iso_ijk + k * step
        if np.any(ijk < 1) or np.any(ijk >= np.array(SHAPE) - 1):  # the 3^3 erosion trims the border
            continue
        voxel = case.grid.index_to_world(ijk)[0]
        expected = 1000.0**2 / np.sum((src - voxel) ** 2)
        assert plate[tuple(ijk)] == pytest.approx(expected, rel=1e-4), f"theta {theta}, voxel {ijk}"
        n_on_axis += 1
    assert n_on_axis >= 20
    assert plate[tuple(iso_ijk)] == pytest.approx(1.0, rel=1e-5)


def test_divergent_cone_of_a_sphere() -> None:
    """Voxels clearly inside the PTV's divergent cone are in the beam, clearly outside are not."""
    theta = 40.0
    case = sphere_case([theta], radius_mm=15.0)
    plate = beam_plate(case)
    iso = np.asarray(case.plan.beams.isocenter_mm)
    src = iso + 1000.0 * iec_source_dir_ras(theta)
    world = case.grid.index_to_world(np.argwhere(np.ones(SHAPE, bool))).reshape(*SHAPE, 3)
    ray = world - src
    ray /= np.linalg.norm(ray, axis=-1, keepdims=True)
    # distance from the sphere centre (iso) to the ray source -> voxel
    to_iso = iso - src
    dist = np.linalg.norm(to_iso - (ray @ to_iso)[..., None] * ray, axis=-1)
    border = np.zeros(SHAPE, bool)
    border[1:-1, 1:-1, 1:-1] = True  # erosion trims the outermost voxel layer
    inside = (dist <= 15.0 - 4.0) & border
    # margin: half a projected voxel (<= 2.8 mm) + the net one-voxel growth of dilate-4 / erode-3 (<= 4 mm)
    outside = dist >= 15.0 + 8.0
    assert inside.sum() > 1000 and outside.sum() > 10000
    assert np.all(plate[inside] > 0)
    assert np.all(plate[outside] == 0)


def test_zero_behind_the_source() -> None:
    case = sphere_case([0.0], radius_mm=8.0)
    sad = 45.0  # source inside the grid, 15 voxels anterior of iso (3 mm per voxel along y)
    plate = beam_plate(case, sad_mm=sad)
    iso = np.asarray(case.plan.beams.isocenter_mm)
    src = iso + sad * iec_source_dir_ras(0.0)
    world = case.grid.index_to_world(np.argwhere(np.ones(SHAPE, bool))).reshape(*SHAPE, 3)
    depth = (world - src) @ (-iec_source_dir_ras(0.0))  # along the beam, from the source
    assert np.all(plate[depth < -2 * max(SPACING)] == 0)
    assert np.all(plate[25:35, 40:48, 15] >= 0) and plate[30, 20, 15] > 0  # in front (posterior): beam


def test_sum_over_beams_and_vmat_every_second_angle() -> None:
    a = beam_plate(sphere_case([0.0, 90.0]))
    single = beam_plate(sphere_case([0.0])) + beam_plate(sphere_case([90.0]))
    np.testing.assert_allclose(a, single, rtol=1e-6)
    vmat = beam_plate(sphere_case([0.0, 10.0, 90.0, 100.0], technique="VMAT"))
    np.testing.assert_allclose(vmat, a, rtol=1e-6)


def test_angle_plate_lines_at_gantry_angles() -> None:
    angles = [0.0, 90.0, 225.0]
    case = sphere_case(angles, iso_ijk=(60, 50, 15), shape=(120, 100, 30))  # +-150 mm in-plane
    plate = angle_plate(case)
    iso = np.asarray(case.plan.beams.isocenter_mm)
    assert set(np.unique(plate)) == {0.0, 1.0}

    def value_at(point: np.ndarray) -> float:
        ijk = np.rint(case.grid.world_to_index(point)[0]).astype(int)
        return float(plate[tuple(ijk)])

    for theta in angles:
        d = iec_source_dir_ras(theta)
        for r in (6.0, 30.0, 60.0, 100.0, 120.0):
            assert value_at(iso + r * d) == 1.0, (theta, r)
        assert value_at(iso + 140.0 * d) == 0.0  # beyond the 125 mm line
        assert value_at(iso + 60.0 * d + np.array([0, 0, 12.0])) == 0.0  # outside the +-10 mm slab
        assert value_at(iso + 60.0 * d + np.array([0, 0, 8.0])) == 1.0
    for theta in (45.0, 135.0, 180.0, 315.0):  # no beam there
        assert value_at(iso + 60.0 * iec_source_dir_ras(theta)) == 0.0, theta


def unoriented_head(flip_ap: bool = False) -> Case:
    """OpenKBP layout (affine diag(spacing), origin 0): Mandible anterior (low axis 0) of the cord."""
    shape = (40, 40, 20)
    grid = Grid(shape=shape, affine=np.diag([4.0, 4.0, 2.5, 1.0]))

    def box(lo, hi):
        m = np.zeros(shape, bool)
        m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
        return m

    mand, cord = box((8, 15, 8), (12, 25, 12)), box((28, 18, 8), (31, 21, 16))
    if flip_ap:
        mand, cord = cord, mand
    ptv = box((16, 16, 8), (22, 24, 12))
    iso = tuple(float(v) for v in grid.index_to_world(np.argwhere(ptv).mean(0))[0])
    return Case("head", grid, body=np.ones(shape, bool),
                structures={"PTV70": Structure("PTV70", ptv, "target", 70.0),
                            "Mandible": Structure("Mandible", mand), "SpinalCord": Structure("SpinalCord", cord),
                            "LeftParotid": Structure("LeftParotid", box((15, 30, 8), (19, 34, 11))),
                            "RightParotid": Structure("RightParotid", box((15, 6, 8), (19, 10, 11)))},
                plan=Plan(beams=BeamGeometry([0.0], iso)))


def test_openkbp_orientation_gantry0_is_anterior() -> None:
    case = unoriented_head()
    frame = patient_frame(case)
    np.testing.assert_array_equal(frame.anterior, [-1, 0, 0])  # axis 0 runs anterior -> posterior
    np.testing.assert_array_equal(frame.left, [0, 1, 0])
    assert "checked: Mandible anterior of SpinalCord" in frame.note
    plate = angle_plate(case)
    iso_ijk = np.rint(case.grid.world_to_index(np.asarray(case.plan.beams.isocenter_mm))[0]).astype(int)
    line = plate[:, iso_ijk[1], iso_ijk[2]]
    assert line[: iso_ijk[0]].sum() > 5 and line[iso_ijk[0] + 2:].sum() == 0  # toward the mandible only
    case.plan.beams.gantry_angles_deg = [90.0]  # source at the patient's left = higher axis-1 index
    plate = angle_plate(case)
    line = plate[iso_ijk[0], :, iso_ijk[2]]
    assert line[iso_ijk[1] + 2:].sum() > 5 and line[: iso_ijk[1] - 1].sum() == 0
    # anatomy contradicting the convention wins (and is reported)
    flipped = patient_frame(unoriented_head(flip_ap=True))
    np.testing.assert_array_equal(flipped.anterior, [1, 0, 0])
    assert "flipped from anatomy: anterior" in flipped.note


def test_source_behind_target_is_an_error() -> None:
    from diffkt3d.errors import CaseError

    case = sphere_case([0.0])
    iso = np.asarray(case.plan.beams.isocenter_mm)
    with pytest.raises(CaseError, match="source"):
        single_beam_mask(case, case.target_union(), iso + 5.0 * iec_source_dir_ras(0.0), iso, patient_frame(case))


def test_ensure_plates_fills_missing_and_reports() -> None:
    case = sphere_case([0.0, 120.0, 240.0])
    same = ensure_plates(case)
    assert same is case and case.beam_plate is not None and case.angle_plate is not None
    assert any(n.startswith("beam plate and angle plate rasterised from 3 IMRT") for n in case.plan.inferred)
    marker = np.full(SHAPE, 7.0, np.float32)
    case.beam_plate, n_notes = marker, len(case.plan.inferred)
    ensure_plates(case)
    assert case.beam_plate is marker and len(case.plan.inferred) == n_notes  # nothing missing: untouched
    expected_angle = case.angle_plate
    case.angle_plate = None
    ensure_plates(case)  # only the missing plate is made; the given beam plate is kept
    assert case.beam_plate is marker and np.array_equal(case.angle_plate, expected_angle)
    assert case.plan.inferred[-1].startswith("angle plate rasterised")


@pytest.mark.skipif(not PT_201.is_dir(), reason="OpenKBP validation data not on this machine")
def test_openkbp_case_axes_and_timing() -> None:
    case = load_case_folder(PT_201)
    t0, c0 = time.perf_counter(), time.process_time()
    beam = beam_plate(case)
    angle = angle_plate(case)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"pt_201 plates: {cpu:.2f} s CPU, {wall:.2f} s wall")
    # target < 2 s on one core; CPU time, because wall time on a shared 2-core machine is noise
    assert cpu < 4.0
    iso = np.asarray(case.plan.beams.isocenter_mm)
    frame = patient_frame(case)
    for theta in case.plan.beams.gantry_angles_deg:
        d = np.sin(np.deg2rad(theta)) * frame.left + np.cos(np.deg2rad(theta)) * frame.anterior
        for r in np.arange(-80.0, 81.0, 10.0):  # entry (r > 0, source side) and exit (r < 0)
            ijk = np.rint(case.grid.world_to_index(iso + r * d)[0]).astype(int)
            if case.body[tuple(ijk)]:
                assert beam[tuple(ijk)] > 0, (theta, r)
    iso_ijk = tuple(np.rint(case.grid.world_to_index(iso)[0]).astype(int))
    assert beam[iso_ijk] == pytest.approx(9.0, rel=0.01)  # 9 beams, inverse-square weight 1 at iso
    assert angle.sum() > 0 and angle[iso_ijk] == 1.0
    # gantry 0 comes from anterior: the line toward the source reaches the mandible side (low axis 0)
    assert angle[: iso_ijk[0] - 3, iso_ijk[1], iso_ijk[2]].sum() > 0
    # no 180 deg beam (160 and 200 deg lines are 5 mm wide: they leave the axis after ~15 mm)
    assert angle[iso_ijk[0] + 4:, iso_ijk[1], iso_ijk[2]].sum() == 0


def test_pipeline_applies_gdp_hmm_morphology() -> None:
    """Default plate support = scipy dilate(4^3) then erode(3^3) of the raw (unmorphed) beam shadow."""
    case = sphere_case([40.0], radius_mm=10.0)
    raw = beam_plate(case, dilate=1, erode=1, inverse_square=False) > 0
    expected = ndimage.binary_erosion(ndimage.binary_dilation(raw, np.ones((4, 4, 4))), np.ones((3, 3, 3)))
    got = beam_plate(case, inverse_square=False)
    np.testing.assert_array_equal(got > 0, expected)
    assert set(np.unique(got)) == {0.0, 1.0}
    assert (expected & ~raw).sum() > 100  # the morphology does change the support
