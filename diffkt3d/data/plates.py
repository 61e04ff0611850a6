"""Beam plate and angle plate: the two geometry modalities of GDP-HMM / DiffKT3D.

Both are rasterised from `case.plan.beams` (gantry angles, isocentre, technique) on the case grid,
following the GDP-HMM construction (GDP-HMM challenge toolkit
`get_allbeam_plate` / `PlotGantry`), but computed in world millimetres through `case.grid` so that
anisotropic voxels (OpenKBP: ~3.9 x 3.9 x 2.5 mm) are handled correctly.

Beam plate (per beam, summed over beams; VMAT: every second control-point angle, as GDP-HMM):
    1. the source sits at SAD = 1000 mm from the isocentre in the gantry direction;
    2. GDP-HMM draws the ray source -> PTV surface voxel -> image edge for every surface voxel.
       The union of those rays is the set of voxels whose ray from the source passes through the
       PTV (the PTV's divergent "shadow", entry and exit side). We compute it per voxel: every
       voxel is projected from the source onto the plane through the isocentre perpendicular to
       the central axis (beam's-eye view, BEV) and looked up in the BEV footprint of the PTV. The
       footprint paints, for every PTV voxel, the rectangle its voxel box projects to (half-width
       0.5 * sum_c |axis_c . e| * magnification). Approximation: GDP-HMM's rays are rounded to
       voxel centres in index space; ours mark a voxel whose centre projects within the projected
       box of a PTV voxel. Both mean "within about half a voxel of a ray through the PTV";
       oblique beams differ by at most about one voxel at the beam edge.
    3. binary dilation with a 4x4x4 box, then binary erosion with a 3x3x3 box (exactly
       scipy.ndimage.binary_dilation / binary_erosion, done separably for speed);
    4. weight by the inverse square |src - iso|^2 / |src - voxel|^2 (in mm; GDP-HMM uses voxel
       units, which only differ for anisotropic grids).

Angle plate: in the axial plane through the isocentre, a line from the isocentre toward each
source (gantry angle theta; GDP-HMM draws it at image angle theta - 90 deg in (row, column)
pixels, which is the same direction), value 1, repeated over a slab around the isocentre slice.
GDP-HMM's pixel sizes are converted with its 2.5 mm in-plane / 2 mm slice grid: length 50 px =
125 mm, width 4 px = 10 mm, slices iso_z - 5 .. iso_z + 5 = +-10 mm.

Orientation (IEC 61217, head-first supine): gantry 0 deg = source anterior (beam from above),
90 deg = source at the patient's left, 180 = posterior, 270 = right. A grid whose affine is a
real patient orientation (NIfTI RAS+: +x = patient right, +y = anterior, +z = superior) is used
as is. OpenKBP affines are diag(spacing) with the origin at 0 and do NOT encode orientation; from
the data (all 240 train/validation cases: Mandible has a lower axis-0 index than SpinalCord,
LeftParotid a higher axis-1 index than RightParotid, Brainstem a lower axis-2 index than
SpinalCord) array axis 0 runs anterior -> posterior, axis 1 right -> left, axis 2 superior ->
inferior. For such "unoriented" grids that convention is used, checked against the anatomy when
those structures exist (anatomy wins, with a log warning), and reported in `case.plan.inferred`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from diffkt3d.constants import SAD_MM
from diffkt3d.data.case import Case, Plan
from diffkt3d.errors import CaseError

log = logging.getLogger(__name__)

# GDP-HMM's angle plate in its own pixels (2.5 mm in-plane, 2 mm slices) converted to mm.
ANGLE_LINE_LENGTH_MM: float = 50 * 2.5
ANGLE_LINE_WIDTH_MM: float = 4 * 2.5
ANGLE_SLAB_HALF_MM: float = 5 * 2.0
# GDP-HMM beam-plate morphology: dilate with a 4^3 box, then erode with a 3^3 box.
BEAM_DILATE_VOXELS: int = 4
BEAM_ERODE_VOXELS: int = 3
# BEV footprint resolution as a fraction of the smallest voxel spacing.
_BEV_PIXEL_FRACTION: float = 0.25


@dataclass(frozen=True)
class PatientFrame:
    """Unit vectors (world mm axes of `case.grid`) pointing to the patient's left, anterior, superior.

    `note` says how the frame was established (reported in case.plan.inferred).
    """

    left: np.ndarray
    anterior: np.ndarray
    superior: np.ndarray
    note: str


def _is_unoriented(case: Case) -> bool:
    """OpenKBP-style affine: positive diagonal, origin 0 -> carries no patient orientation."""
    a = case.grid.affine
    return bool(np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3]))) and np.all(np.diag(a)[:3] > 0)
                and np.allclose(a[:3, 3], 0.0))


def _centroid_world(case: Case, name: str) -> np.ndarray | None:
    s = case.structures.get(name)
    if s is None or not s.mask.any():
        return None
    return case.grid.index_to_world(np.argwhere(s.mask).mean(axis=0))[0]


def patient_frame(case: Case) -> PatientFrame:
    """Patient directions in the case's world coordinates (see module docstring)."""
    if not _is_unoriented(case):
        return PatientFrame(left=np.array([-1.0, 0.0, 0.0]), anterior=np.array([0.0, 1.0, 0.0]),
                            superior=np.array([0.0, 0.0, 1.0]),
                            note="patient orientation from the grid affine (RAS+), head-first supine assumed")
    # OpenKBP layout: axis 0 anterior->posterior, axis 1 right->left, axis 2 superior->inferior.
    frame = {"anterior": np.array([-1.0, 0.0, 0.0]), "left": np.array([0.0, 1.0, 0.0]),
             "superior": np.array([0.0, 0.0, -1.0])}
    checks = {"anterior": ("Mandible", "SpinalCord"), "left": ("LeftParotid", "RightParotid"),
              "superior": ("Brainstem", "SpinalCord")}
    verified, flipped = [], []
    for key, (a_name, b_name) in checks.items():
        a, b = _centroid_world(case, a_name), _centroid_world(case, b_name)
        if a is None or b is None:
            continue
        along = float((a - b) @ frame[key])
        if abs(along) < 1.0:  # under 1 mm: no evidence either way
            continue
        if along > 0:
            verified.append(f"{a_name} {key} of {b_name}")
        else:
            frame[key] = -frame[key]
            flipped.append(key)
            log.warning("case %s: %s is not %s of %s in the OpenKBP axis convention; using the anatomy",
                        case.case_id, a_name, key, b_name)
    note = ("grid affine carries no orientation (diag(spacing), origin 0): OpenKBP axes assumed "
            "(axis 0 anterior->posterior, axis 1 right->left, axis 2 superior->inferior)")
    if verified:
        note += "; checked: " + ", ".join(verified)
    if flipped:
        note += "; flipped from anatomy: " + ", ".join(flipped)
    return PatientFrame(note=note, **frame)


def ras_affine(case: Case, frame: PatientFrame | None = None) -> np.ndarray:
    """4x4 index -> patient RAS+ mm affine: the grid affine itself when it is oriented, else the
    OpenKBP-convention (or anatomy) frame applied to diag(spacing). Lets exporters write a real
    orientation for OpenKBP cases.
    """
    if not _is_unoriented(case):
        return case.grid.affine.copy()
    frame = frame or patient_frame(case)
    world_to_ras = np.stack([-frame.left, frame.anterior, frame.superior])  # rows: R, A, S
    out = np.eye(4)
    out[:3, :3] = world_to_ras @ case.grid.affine[:3, :3]
    out[:3, 3] = world_to_ras @ case.grid.affine[:3, 3]
    return out


def source_direction(frame: PatientFrame, gantry_deg: float, couch_deg: float = 0.0) -> np.ndarray:
    """(3,) unit world vector from the isocentre toward the source (IEC 61217, head-first supine).

    Gantry theta puts the source at sin(theta) * left + cos(theta) * anterior. A couch angle phi
    rotates the patient about the vertical (anterior) axis, so in patient coordinates the lateral
    component turns toward superior/inferior: left -> cos(phi) * left - sin(phi) * superior
    (coplanar plans, phi = 0, are what OpenKBP and GDP-HMM use; non-zero couch is untested against
    a planning system).
    """
    th, ph = np.deg2rad(gantry_deg), np.deg2rad(couch_deg)
    lateral = np.cos(ph) * frame.left - np.sin(ph) * frame.superior
    d = np.sin(th) * lateral + np.cos(th) * frame.anterior
    return d / np.linalg.norm(d)


def _require_beams(case: Case):
    beams = case.plan.beams
    if beams is None or not beams.gantry_angles_deg:
        raise CaseError("cannot rasterise beam/angle plates: the plan has no beam geometry (gantry angles)",
                        case=case.case_id)
    if not np.all(np.isfinite(beams.isocenter_mm)):
        raise CaseError(f"isocentre {beams.isocenter_mm} is not finite", case=case.case_id)
    return beams


def _separable_dot(case: Case, vec: np.ndarray, point: np.ndarray) -> np.ndarray:
    """(I, J, K) float32 field (world(ijk) - point) . vec, built from three 1-D ramps."""
    a = case.grid.affine
    coef = a[:3, :3].T @ vec  # d(world . vec) / d(index) per axis, mm per voxel
    const = float((a[:3, 3] - point) @ vec)
    ni, nj, nk = case.grid.shape
    ri = (np.arange(ni) * coef[0] + const).astype(np.float32)
    rj = (np.arange(nj) * coef[1]).astype(np.float32)
    rk = (np.arange(nk) * coef[2]).astype(np.float32)
    return ri[:, None, None] + rj[None, :, None] + rk[None, None, :]


def _shift_or(x: np.ndarray, lo: int, hi: int, axis: int, use_and: bool) -> np.ndarray:
    """out[i] = OR (or AND) of x[i + o] for o in lo..hi along `axis`, outside the array = False."""
    out = x.copy()
    n = x.shape[axis]
    for o in range(lo, hi + 1):
        if o == 0:
            continue
        dst = [slice(None)] * 3
        src = [slice(None)] * 3
        if o > 0:
            dst[axis], src[axis] = slice(0, n - o), slice(o, n)
        else:
            dst[axis], src[axis] = slice(-o, n), slice(0, n + o)
        if use_and:
            edge = [slice(None)] * 3
            edge[axis] = slice(n - o, n) if o > 0 else slice(0, -o)
            out[tuple(edge)] = False  # the neighbour is outside the grid (border value 0)
            out[tuple(dst)] &= x[tuple(src)]
        else:
            out[tuple(dst)] |= x[tuple(src)]
    return out


def _box_morphology(mask: np.ndarray, dilate: int, erode: int) -> np.ndarray:
    """binary_dilation(ones(dilate^3)) then binary_erosion(ones(erode^3)) with scipy's defaults.

    Done separably with shifted boolean views (a box is the product of three 1-D segments), ~10x
    faster than scipy on 128^3; tests check equality with scipy.ndimage.
    """
    x = mask.astype(bool, copy=True)
    if dilate > 1:
        # scipy reflects the structuring element for dilation: even sizes reach one voxel further back
        lo, hi = -(dilate // 2), dilate - 1 - dilate // 2
        lo, hi = -hi, -lo
        for ax in range(3):
            x = _shift_or(x, lo, hi, ax, use_and=False)
    if erode > 1:
        lo, hi = -(erode // 2), erode - 1 - erode // 2
        for ax in range(3):
            x = _shift_or(x, lo, hi, ax, use_and=True)
    return x


def _bev_basis(axis: np.ndarray, frame: PatientFrame) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors spanning the plane perpendicular to the beam's central axis."""
    ref = frame.superior - (frame.superior @ axis) * axis
    if np.linalg.norm(ref) < 1e-6:  # beam along the cranio-caudal axis (extreme couch angles)
        ref = frame.anterior - (frame.anterior @ axis) * axis
    e_v = ref / np.linalg.norm(ref)
    e_u = np.cross(axis, e_v)
    return e_u / np.linalg.norm(e_u), e_v


def single_beam_mask(case: Case, target: np.ndarray, source_mm: np.ndarray, iso_mm: np.ndarray,
                     frame: PatientFrame) -> tuple[np.ndarray, np.ndarray]:
    """Voxels whose ray from the source passes through `target` (before morphology).

    Args:
        case: supplies the grid.
        target: (I, J, K) bool PTV mask.
        source_mm, iso_mm: (3,) world positions (mm).
        frame: patient frame (only used to orient the BEV plane).

    Returns:
        (mask, dist2_mm2): (I, J, K) bool, and (I, J, K) float32 squared source-voxel distance.
    """
    axis = iso_mm - source_mm
    sad = float(np.linalg.norm(axis))
    axis = axis / sad
    e_u, e_v = _bev_basis(axis, frame)
    # 1. PTV footprint in the BEV plane at the isocentre distance (painted voxel-box rectangles).
    a = case.grid.affine
    pts = case.grid.index_to_world(np.argwhere(target))
    d = pts - source_mm
    depth = d @ axis
    if np.any(depth <= 0):
        raise CaseError("the beam source lies inside or beyond the target (SAD too short for this grid)",
                        case=case.case_id)
    mag = sad / depth
    u, v = (d @ e_u) * mag, (d @ e_v) * mag
    half_u = 0.5 * np.abs(a[:3, :3].T @ e_u).sum() * mag
    half_v = 0.5 * np.abs(a[:3, :3].T @ e_v).sum() * mag
    px = _BEV_PIXEL_FRACTION * min(case.grid.spacing_mm)
    u_min, v_min = float((u - half_u).min()) - px, float((v - half_v).min()) - px
    nu = int(np.ceil((float((u + half_u).max()) - u_min) / px)) + 2
    nv = int(np.ceil((float((v + half_v).max()) - v_min) / px)) + 2
    # pixel m (centre u_min + (m + 0.5) px) is covered when its centre lies in [u - h, u + h]
    m0 = np.ceil((u - half_u - u_min) / px - 0.5).astype(np.int64)
    m1 = np.floor((u + half_u - u_min) / px - 0.5).astype(np.int64)
    n0 = np.ceil((v - half_v - v_min) / px - 0.5).astype(np.int64)
    n1 = np.floor((v + half_v - v_min) / px - 0.5).astype(np.int64)
    keep = (m1 >= m0) & (n1 >= n0)
    m0, m1, n0, n1 = m0[keep], m1[keep] + 1, n0[keep], n1[keep] + 1
    # rectangle union by a 2-D difference array: +1/-1 at the corners, then cumulative sums
    stride = nv + 1
    corners = np.concatenate([m0 * stride + n0, m1 * stride + n0, m0 * stride + n1, m1 * stride + n1])
    weights = np.concatenate([np.ones_like(m0), -np.ones_like(m0), -np.ones_like(m0), np.ones_like(m0)])
    diff = np.bincount(corners, weights=weights, minlength=(nu + 1) * stride).reshape(nu + 1, stride)
    footprint = np.cumsum(np.cumsum(diff, axis=0), axis=1)[:nu, :nv] > 0.5
    # 2. every voxel projected from the source onto the same plane, looked up in the footprint.
    depth_v = _separable_dot(case, axis, source_mm)
    du = _separable_dot(case, e_u, source_mm)
    dv = _separable_dot(case, e_v, source_mm)
    dist2 = depth_v * depth_v + du * du + dv * dv
    ahead = depth_v > 1e-3  # voxels behind (or at) the source are never in the beam
    scale = np.float32(sad / px) / np.where(ahead, depth_v, np.float32(1.0))
    mi = np.floor(du * scale - np.float32(u_min / px))
    ni = np.floor(dv * scale - np.float32(v_min / px))
    inside = ahead & (mi >= 0) & (mi < nu) & (ni >= 0) & (ni < nv)
    flat = np.where(inside, mi * nv + ni, 0).astype(np.int64)
    mask = footprint.ravel()[flat] & inside
    return mask, dist2


def beam_plate(case: Case, *, sad_mm: float = SAD_MM, dilate: int = BEAM_DILATE_VOXELS,
               erode: int = BEAM_ERODE_VOXELS, inverse_square: bool = True,
               frame: PatientFrame | None = None) -> np.ndarray:
    """GDP-HMM beam plate: sum over beams of the PTV's divergent beam shadow, inverse-square weighted.

    Args:
        case: needs targets (their union is the PTV) and `plan.beams`.
        sad_mm: source-axis distance (mm), 1000 for a linac.
        dilate, erode: box sizes (voxels) of the GDP-HMM morphology.
        inverse_square: weight each beam by |src - iso|^2 / |src - voxel|^2 (GDP-HMM default).
        frame: patient frame; computed from the case when None.

    Returns:
        (I, J, K) float32; about 1 per beam near the isocentre, 0 outside all beams.
    """
    beams = _require_beams(case)
    target = case.target_union()
    if not target.any():
        raise CaseError("cannot rasterise the beam plate: no target (PTV) voxels", case=case.case_id)
    frame = frame or patient_frame(case)
    iso = np.asarray(beams.isocenter_mm, dtype=np.float64)
    angles = list(beams.gantry_angles_deg)
    if beams.technique.upper() == "VMAT":
        angles = angles[::2]  # GDP-HMM skips every second VMAT angle (skip_angle=True)
    out = np.zeros(case.grid.shape, dtype=np.float32)
    for gantry in angles:
        src = iso + sad_mm * source_direction(frame, gantry, beams.couch_angle_deg)
        mask, dist2 = single_beam_mask(case, target, src, iso, frame)
        mask = _box_morphology(mask, dilate, erode)
        if inverse_square:
            out[mask] += np.float32(sad_mm**2) / np.maximum(dist2[mask], np.float32(1e-6))
        else:
            out[mask] += 1.0
    return out


def angle_plate(case: Case, *, length_mm: float = ANGLE_LINE_LENGTH_MM, width_mm: float = ANGLE_LINE_WIDTH_MM,
                slab_half_mm: float = ANGLE_SLAB_HALF_MM, frame: PatientFrame | None = None) -> np.ndarray:
    """GDP-HMM angle plate: lines from the isocentre toward each source, in an axial slab.

    Args:
        case: needs `plan.beams`.
        length_mm, width_mm: line length and full width (GDP-HMM: 50 px and 4 px of 2.5 mm).
        slab_half_mm: half-thickness of the slab of axial planes around the isocentre (GDP-HMM:
            5 slices of 2 mm).
        frame: patient frame; computed from the case when None.

    Returns:
        (I, J, K) float32 with 1 on the lines, 0 elsewhere (all control-point angles for VMAT).
    """
    beams = _require_beams(case)
    frame = frame or patient_frame(case)
    iso = np.asarray(beams.isocenter_mm, dtype=np.float64)
    out = np.zeros(case.grid.shape, dtype=np.float32)
    height = _separable_dot(case, frame.superior, iso)
    slab = np.nonzero(np.abs(height) <= slab_half_mm)
    if slab[0].size == 0:
        return out  # isocentre more than a slab away from the grid
    rel = case.grid.index_to_world(np.stack(slab, axis=1)) - iso  # (N, 3) mm
    # in-plane coordinates: lateral (left) and anterior, orthogonalised against superior
    lat = frame.left - (frame.left @ frame.superior) * frame.superior
    ant = frame.anterior - (frame.anterior @ frame.superior) * frame.superior
    x, y = rel @ (lat / np.linalg.norm(lat)), rel @ (ant / np.linalg.norm(ant))
    near = np.hypot(x, y) <= length_mm + width_mm
    x, y = x[near], y[near]
    on = np.hypot(x, y) <= width_mm / 2  # the joint at the isocentre
    for gantry in beams.gantry_angles_deg:
        th = np.deg2rad(gantry)
        bx, by = np.sin(th), np.cos(th)  # direction toward the source (see source_direction)
        t = x * bx + y * by
        on |= (t >= 0) & (t <= length_mm) & (np.abs(x * by - y * bx) <= width_mm / 2)
    idx = tuple(s[near][on] for s in slab)
    out[idx] = 1.0
    return out


def _plates_note(case: Case, what: str, frame: PatientFrame) -> str:
    b = case.plan.beams
    return (f"{what} rasterised from {len(b.gantry_angles_deg)} {b.technique} gantry angles "
            f"(GDP-HMM construction); {frame.note}")


def add_plates(case: Case) -> Case:
    """A new Case (arrays shared, plan copied) with freshly rasterised beam and angle plates."""
    t0 = time.perf_counter()
    frame = patient_frame(case)
    beam, angle = beam_plate(case, frame=frame), angle_plate(case, frame=frame)
    log.debug("case %s: plates rasterised in %.2f s", case.case_id, time.perf_counter() - t0)
    plan = dataclasses.replace(case.plan, inferred=[*case.plan.inferred,
                                                    _plates_note(case, "beam and angle plates", frame)])
    return dataclasses.replace(case, beam_plate=beam, angle_plate=angle, plan=plan)


def ensure_plates(case: Case) -> Case:
    """Rasterise whichever plate is missing, in place, and record it in case.plan.inferred.

    Called by the model encoder: a case folder without beam_plate/angle_plate NIfTIs still gets
    the beam and angle modalities. Plates already present (e.g. from GDP-HMM files) are kept.
    Returns the same (mutated) case.

    Raises:
        CaseError: no beam geometry, or no target voxels for the beam plate.
    """
    missing = [n for n, arr in (("beam plate", case.beam_plate), ("angle plate", case.angle_plate)) if arr is None]
    if not missing:
        return case
    if case.plan is None:
        case.plan = Plan()
    frame = patient_frame(case)
    if case.beam_plate is None:
        case.beam_plate = beam_plate(case, frame=frame)
    if case.angle_plate is None:
        case.angle_plate = angle_plate(case, frame=frame)
    case.plan.inferred.append(_plates_note(case, " and ".join(missing), frame))
    return case
