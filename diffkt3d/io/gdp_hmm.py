"""GDP-HMM npz cases (AAPM 2025 challenge; the DiffKT3D paper's data): read and write.

File layout (GDP-HMM challenge documentation; GDP-HMM `DICOM2NPZ.py` / `data_loader.py`): the npz holds
one pickled dict, `np.load(p, allow_pickle=True)['arr_0'].item()`, with

- one 3D mask per structure name (`Body`, `PTV70OPT`, `PTV_Total`, OARs ...), uint8 0/1;
- `img`: CT (HU); `dose`: integer dose, Gy = dose x `dose_scale`;
- `isVMAT` (bool), `isocenter` (voxel index, [z, y, x]), `angle_list` (gantry angles, deg);
- `angle_plate`: 2D (y, x) plate in the isocentre plane; `beam_plate`: 3D;
- geometry of the CT as SimpleITK reports it: `origin` (LPS mm, x-y-z), `direction` (9 numbers,
  row-major 3x3, columns = index axes x, y, z), `size` (DICOM2NPZ.py's uncropped dict holds
  `GetSize()`, x-y-z; its released, cropped files hold `Body.shape`, z-y-x: the reader accepts
  either, the writer writes z-y-x), and `spacing`: the challenge
  documents it in z-y-x order ([2, 2.5, 2.5] mm) while the upstream DICOM2NPZ.py stores
  `CT.GetSpacing()` (x-y-z, [2.5, 2.5, 2]). The reader tells the two apart by which pair of
  values is equal (in-plane spacings are equal in practice: [a, a, b] -> x-y-z, [b, a, a] ->
  z-y-x) and otherwise follows the documented order (z-y-x), recording the choice in
  `case.plan.inferred`. The writer writes z-y-x, the documented order.

Array conventions. Arrays are SimpleITK arrays, index order (z, y, x) = (slice, row, column),
and our Case keeps that order (array axis 0 = z). The affine maps (z, y, x) to world RAS+ mm:
column 0 = direction of the sitk z axis x spacing_z, column 1 = y axis x spacing_y, column 2 = x
axis x spacing_x, origin = sitk origin; then LPS -> RAS by negating the first two world rows.
For the usual head-first-supine CT (identity direction) axis 0 runs inferior -> superior, axis 1
anterior -> posterior and axis 2 right -> left, so `diffkt3d.data.plates` finds the patient
orientation from the affine directly. The isocentre voxel [z, y, x] becomes world mm through the
same affine.

Prescriptions. GDP-HMM keeps them outside the npz, in PTV_DICT.json: patient id ->
{PTV_High|PTV_Mid|PTV_Low: {OPTName, PDose, StructName?, ...}}. The patient id is the file stem up
to the first '+' (GDP-HMM data_loader). Both OPTName and StructName masks receive PDose; without
a dict, roles and prescriptions are inferred from names and reported.

Trust: reading needs `allow_pickle=True`, and unpickling can execute arbitrary code. Only read
npz files from a source you trust (the GDP-HMM release, your own exports). The reader refuses
payloads that are not a single dict of arrays/numbers, but that check runs after unpickling.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from diffkt3d.data.case import BeamGeometry, Case, Grid, Plan, Structure, infer_role
from diffkt3d.data.plates import patient_frame, ras_affine
from diffkt3d.errors import CaseError

log = logging.getLogger(__name__)

# LPS (DICOM / SimpleITK) <-> RAS+ (NIfTI, our Grid): negate world x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Keys of the dict that are not structure masks.
_NON_MASK_KEYS = {"img", "dose", "dose_scale", "isVMAT", "isocenter", "angle_list", "angle_plate",
                  "beam_plate", "origin", "spacing", "direction", "size", "all_mask"}
_BODY_KEY = "Body"
_PTV_LEVELS = ("PTV_High", "PTV_Mid", "PTV_Low")
# GDP-HMM angle plate slab: slices iso_z - 5 .. iso_z + 5 (data_loader: z_end exclusive).
_ANGLE_SLAB = 5
# Default integer dose resolution for writing (Gy per unit), like a DICOM DoseGridScaling.
DEFAULT_DOSE_SCALE_GY: float = 1e-4


def patient_id_from_path(path: str | Path) -> str:
    """GDP-HMM patient id: file stem up to the first '+' (`0522c0001+plan2.npz` -> `0522c0001`)."""
    return Path(path).name.removesuffix(".npz").split("+")[0]


def load_ptv_dict(path: str | Path) -> dict[str, Any]:
    """Read a PTV_DICT.json (patient id -> {PTV_High/Mid/Low -> {OPTName, PDose, ...}})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError("prescription file not found", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise CaseError(f"not valid JSON ({exc})", file=str(path)) from None
    if not isinstance(data, dict):
        raise CaseError("expected a JSON object mapping patient ids to PTV_High/Mid/Low entries", file=str(path))
    return data


def _prescriptions(entry: Mapping[str, Any], case_id: str, source: str) -> dict[str, float]:
    """structure name -> prescription Gy from one patient's PTV_DICT entry."""
    out: dict[str, float] = {}
    for level in _PTV_LEVELS:
        item = entry.get(level)
        if item is None:
            continue
        if not isinstance(item, Mapping) or "PDose" not in item or "OPTName" not in item:
            raise CaseError(f"prescription entry {level} needs OPTName and PDose, found {item!r}",
                            case=case_id, file=source)
        try:
            dose = float(item["PDose"])
        except (TypeError, ValueError):
            raise CaseError(f"{level}.PDose is not a number: {item['PDose']!r}", case=case_id, file=source) from None
        for key in ("OPTName", "StructName"):
            if item.get(key):
                out[str(item[key])] = dose
    if not out:
        raise CaseError(f"prescription entry has none of {_PTV_LEVELS}", case=case_id, file=source)
    return out


def _load_payload(path: Path) -> dict[str, Any]:
    case_id = path.name
    try:
        with np.load(path, allow_pickle=True) as npz:
            if "arr_0" not in npz.files:
                raise CaseError(f"expected the GDP-HMM key 'arr_0', found {npz.files[:8]}", case=case_id,
                                file=str(path))
            raw = npz["arr_0"]
    except FileNotFoundError:
        raise CaseError("file not found", case=case_id, file=str(path)) from None
    except CaseError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CaseError(f"not a readable npz file ({type(exc).__name__}: {exc})", case=case_id,
                        file=str(path)) from None
    except Exception as exc:  # unpickling can fail in many ways for foreign payloads
        raise CaseError(f"cannot unpickle the npz payload ({type(exc).__name__}: {exc})", case=case_id,
                        file=str(path)) from None
    payload = raw.item() if isinstance(raw, np.ndarray) and raw.dtype == object and raw.shape == () else raw
    if not isinstance(payload, dict):
        raise CaseError(f"arr_0 must hold a dict (GDP-HMM layout), found {type(payload).__name__}"
                        + (f" {getattr(payload, 'shape', '')}" if isinstance(payload, np.ndarray) else ""),
                        case=case_id, file=str(path))
    for key, value in payload.items():
        if not isinstance(key, str):
            raise CaseError(f"dict keys must be strings, found {key!r}", case=case_id, file=str(path))
        if value is not None and not isinstance(value, np.ndarray | list | tuple | dict | int | float | bool | str
                                                   | np.generic):
            raise CaseError(f"key {key!r} holds an unexpected {type(value).__name__} (arrays, numbers, "
                            "lists expected)", case=case_id, file=str(path))
    return payload


def _vector(payload: dict[str, Any], key: str, n: int, case_id: str, source: str) -> np.ndarray:
    if key not in payload:
        raise CaseError(f"missing key {key!r}", case=case_id, file=source)
    try:
        v = np.asarray(payload[key], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise CaseError(f"{key!r} must be numeric, found {payload[key]!r}", case=case_id, file=source) from None
    if v.size != n or not np.all(np.isfinite(v)):
        raise CaseError(f"{key!r} must hold {n} finite numbers, found {v.tolist()}", case=case_id, file=source)
    return v


def _spacing_zyx(spacing: np.ndarray, inferred: list[str]) -> np.ndarray:
    """Spacing in (z, y, x) order from either documented order (see module docstring)."""
    a, b, c = spacing
    if np.isclose(a, b) and not np.isclose(b, c):
        inferred.append(f"spacing {spacing.tolist()} read as x-y-z (SimpleITK order: in-plane pair first)")
        return spacing[::-1].copy()
    clear_zyx = np.isclose(b, c) and not np.isclose(a, b)
    isotropic = np.isclose(a, b) and np.isclose(b, c)
    if not (clear_zyx or isotropic):
        inferred.append(f"spacing {spacing.tolist()} read as z-y-x (GDP-HMM docs order; order ambiguous)")
    return spacing.copy()


def grid_from_sitk_geometry(shape_zyx: tuple[int, int, int], origin_lps: np.ndarray, direction: np.ndarray,
                            spacing_zyx: np.ndarray) -> Grid:
    """Grid for an array in SimpleITK (z, y, x) order; affine maps (z, y, x) indices to RAS+ mm."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # columns: sitk x, y, z index axes (LPS)
    lin = np.empty((3, 3))
    lin[:, 0] = d[:, 2] * spacing_zyx[0]
    lin[:, 1] = d[:, 1] * spacing_zyx[1]
    lin[:, 2] = d[:, 0] * spacing_zyx[2]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ lin
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin_lps, dtype=np.float64)
    return Grid(shape=tuple(int(s) for s in shape_zyx), affine=affine)  # type: ignore[arg-type]


def sitk_geometry_from_grid(grid: Grid) -> dict[str, Any]:
    """Inverse of grid_from_sitk_geometry: origin (LPS x-y-z), direction (9), spacing (z-y-x), size (z-y-x)."""
    lps = _LPS_TO_RAS @ grid.affine[:3, :3]
    spacing_zyx = np.linalg.norm(lps, axis=0)
    unit = lps / spacing_zyx[None, :]
    direction = np.stack([unit[:, 2], unit[:, 1], unit[:, 0]], axis=1)  # columns x, y, z
    return {
        "origin": tuple(float(v) for v in _LPS_TO_RAS @ grid.affine[:3, 3]),
        "direction": tuple(float(v) for v in direction.ravel()),
        "spacing": tuple(float(v) for v in spacing_zyx),
        "size": tuple(int(s) for s in grid.shape),  # z-y-x, as the released (cropped) GDP-HMM files
    }


def expand_angle_plate(plate_2d: np.ndarray, shape_zyx: tuple[int, int, int], iso_z: float) -> np.ndarray:
    """GDP-HMM data_loader: repeat the 2D plate over slices int(iso_z) - 5 .. int(iso_z) + 5 (end exclusive).

    A plate whose in-plane size differs from the volume is resized with nearest neighbour, as upstream.
    """
    out = np.zeros(shape_zyx, dtype=np.float32)
    z0, z1 = max(0, int(iso_z) - _ANGLE_SLAB), min(shape_zyx[0], int(iso_z) + _ANGLE_SLAB)
    plate = np.asarray(plate_2d, dtype=np.float32)
    if plate.shape != tuple(shape_zyx[1:]):
        plate = ndimage.zoom(plate, (shape_zyx[1] / plate.shape[0], shape_zyx[2] / plate.shape[1]), order=0)
    if z1 > z0:
        out[z0:z1] = plate[None]
    return out


def read_gdp_hmm(path: str | Path, ptv_dict: Mapping[str, Any] | str | Path | None = None, *,
                 patient_id: str | None = None, with_dose: bool = True) -> Case:
    """Read one GDP-HMM npz into a Case (see the module docstring for conventions and trust).

    Args:
        path: the .npz file.
        ptv_dict: PTV_DICT.json content (whole dict or one patient's entry with PTV_High/...), or
            its path; None -> prescriptions inferred from structure names.
        patient_id: key into ptv_dict; default from the file name (stem before '+').
        with_dose: read the dose when present.

    Raises:
        CaseError: unreadable file, non-dict payload, missing/mismatched keys, patient not in ptv_dict.
    """
    path = Path(path)
    case_id = path.name.removesuffix(".npz")
    src = str(path)
    payload = _load_payload(path)
    inferred: list[str] = []

    # 1. volumes and grid
    if "img" not in payload:
        raise CaseError("missing key 'img' (CT)", case=case_id, file=src)
    ct = np.asarray(payload["img"])
    if ct.ndim != 3 or ct.dtype.kind not in "iuf":
        raise CaseError(f"'img' must be a numeric 3D array, found {ct.dtype} {ct.shape}", case=case_id, file=src)
    shape = tuple(int(s) for s in ct.shape)
    size = tuple(int(s) for s in _vector(payload, "size", 3, case_id, src))
    if size != shape and size[::-1] != shape:  # released (cropped) files: Body.shape; DICOM2NPZ: GetSize()
        raise CaseError(f"'size' {list(size)} matches the img shape {shape} in neither z-y-x nor x-y-z order",
                        case=case_id, file=src)
    spacing = _spacing_zyx(_vector(payload, "spacing", 3, case_id, src), inferred)
    if np.any(spacing <= 0):
        raise CaseError(f"'spacing' must be positive, found {spacing.tolist()}", case=case_id, file=src)
    grid = grid_from_sitk_geometry(shape, _vector(payload, "origin", 3, case_id, src),
                                   _vector(payload, "direction", 9, case_id, src), spacing)

    def volume(key: str) -> np.ndarray:
        arr = np.asarray(payload[key])
        if arr.shape != shape:
            raise CaseError(f"{key!r} has shape {arr.shape}, expected the img shape {shape}", case=case_id, file=src)
        if arr.dtype.kind not in "biuf":
            raise CaseError(f"{key!r} must be numeric, found {arr.dtype}", case=case_id, file=src)
        return arr

    dose = None
    if with_dose and "dose" in payload:
        if "dose_scale" not in payload:
            raise CaseError("'dose' present without 'dose_scale' (Gy per unit)", case=case_id, file=src)
        scale = float(np.asarray(payload["dose_scale"], dtype=np.float64))
        dose = (volume("dose").astype(np.float64) * scale).astype(np.float32)

    # 2. prescriptions
    rx_by_name: dict[str, float] = {}
    if ptv_dict is not None:
        ptv_source = str(ptv_dict) if isinstance(ptv_dict, str | Path) else "PTV_DICT"
        table = load_ptv_dict(ptv_dict) if isinstance(ptv_dict, str | Path) else ptv_dict
        if any(k in table for k in _PTV_LEVELS):
            entry = table
        else:
            pid = patient_id or patient_id_from_path(path)
            if pid not in table:
                raise CaseError(f"patient id {pid!r} is not in the prescription table ({len(table)} patients)",
                                case=case_id, file=ptv_source)
            entry = table[pid]
        rx_by_name = _prescriptions(entry, case_id, ptv_source)
        missing = [n for n in rx_by_name if n not in payload]
        if len(missing) == len(rx_by_name):
            raise CaseError(f"none of the prescribed structures {sorted(rx_by_name)} is in the npz", case=case_id,
                            file=src)

    # 3. structures
    body = None
    structures: dict[str, Structure] = {}
    for key in payload:
        if key in _NON_MASK_KEYS:
            continue
        arr = np.asarray(payload[key])
        if arr.ndim != 3:
            continue  # scalars / lists added by other tools
        mask = volume(key) > 0.5
        if key == _BODY_KEY:
            body = mask
            continue
        if not mask.any():  # GDP-HMM keeps empty masks for structures absent in a patient
            inferred.append(f"{key}: empty mask, skipped")
            continue
        if key in rx_by_name:
            role, rx = "target", rx_by_name[key]
        else:
            role, rx = infer_role(key)
            if key.lower().startswith("ring"):
                role, rx = "other", None  # optimisation rings around PTVs, not organs
            inferred.append(f"{key}: role '{role}' from its name" + (f", prescription {rx:g} Gy" if rx else ""))
        if role == "body" and body is None:
            body = mask
            continue
        structures[key] = Structure(name=key, mask=mask, role=role, prescription_gy=rx)

    # 4. plan geometry and plates
    beams = None
    if "angle_list" in payload and "isocenter" in payload:
        iso_zyx = _vector(payload, "isocenter", 3, case_id, src)
        angles = [float(a) for a in np.asarray(payload["angle_list"], dtype=np.float64).ravel()]
        technique = "VMAT" if bool(payload.get("isVMAT", False)) else "IMRT"
        iso_mm = tuple(float(v) for v in grid.index_to_world(iso_zyx)[0])
        beams = BeamGeometry(gantry_angles_deg=angles, isocenter_mm=iso_mm, technique=technique)  # type: ignore[arg-type]
    beam = volume("beam_plate").astype(np.float32) if "beam_plate" in payload else None
    angle = None
    if "angle_plate" in payload:
        plate = np.asarray(payload["angle_plate"], dtype=np.float32)
        if plate.ndim == 3:
            angle = volume("angle_plate").astype(np.float32)
        elif plate.ndim == 2:
            if "isocenter" not in payload:
                raise CaseError("2D 'angle_plate' needs 'isocenter' to place its slab", case=case_id, file=src)
            angle = expand_angle_plate(plate, shape, float(_vector(payload, "isocenter", 3, case_id, src)[0]))
        else:
            raise CaseError(f"'angle_plate' must be 2D or 3D, found shape {plate.shape}", case=case_id, file=src)

    case = Case(case_id=case_id, grid=grid, ct_hu=ct.astype(np.float32), dose_gy=dose, body=body,
                structures=structures, beam_plate=beam, angle_plate=angle,
                plan=Plan(beams=beams, inferred=inferred), source=src)
    case.validate()
    return case


def _zyx_layout(case: Case) -> tuple[Case, np.ndarray | None, list[str]]:
    """The case with array axes permuted to GDP-HMM's (z, y, x) and a RAS+ affine.

    Returns (case in z-y-x layout, isocentre mm in its world, notes). Unoriented (OpenKBP) grids get
    their patient orientation from `plates.ras_affine` first.
    """
    notes: list[str] = []
    affine = ras_affine(case)
    to_ras = affine[:3, :3] @ np.linalg.inv(case.grid.affine[:3, :3])  # world -> RAS rotation
    if not np.allclose(affine, case.grid.affine):
        notes.append(patient_frame(case).note)
    iso = None
    if case.plan.beams is not None:
        iso_world = np.asarray(case.plan.beams.isocenter_mm, dtype=np.float64)
        iso = to_ras @ (iso_world - case.grid.affine[:3, 3]) + affine[:3, 3]
    dominant = np.argmax(np.abs(affine[:3, :3]), axis=0)  # RAS axis each array axis runs along
    if sorted(dominant.tolist()) != [0, 1, 2]:
        raise CaseError("grid is too oblique to tell its slice axis (two array axes run along the same "
                        "patient axis)", case=case.case_id)
    perm = [int(np.flatnonzero(dominant == k)[0]) for k in (2, 1, 0)]  # z (S), y (A), x (R)
    lin = affine[:3, :3][:, perm]
    new_affine = np.eye(4)
    new_affine[:3, :3], new_affine[:3, 3] = lin, affine[:3, 3]
    grid = Grid(shape=tuple(case.grid.shape[p] for p in perm), affine=new_affine)  # type: ignore[arg-type]

    def tr(arr: np.ndarray | None) -> np.ndarray | None:
        return None if arr is None else np.transpose(arr, perm)

    if perm != [0, 1, 2]:
        notes.append(f"array axes {tuple(perm)} of the case written as GDP-HMM (z, y, x)")
    out = Case(case_id=case.case_id, grid=grid, ct_hu=tr(case.ct_hu), dose_gy=tr(case.dose_gy), body=tr(case.body),
               structures={n: Structure(s.name, tr(s.mask), s.role, s.prescription_gy)  # type: ignore[arg-type]
                           for n, s in case.structures.items()},
               beam_plate=tr(case.beam_plate), angle_plate=tr(case.angle_plate), plan=case.plan,
               source=case.source)
    return out, iso, notes


def write_gdp_hmm(case: Case, path: str | Path, *, dose_scale_gy: float = DEFAULT_DOSE_SCALE_GY) -> Path:
    """Write a Case as a GDP-HMM npz (np.savez_compressed of one dict under 'arr_0').

    Arrays are permuted to GDP-HMM's (z, y, x) layout (slice axis first) with a RAS+ affine written
    as SimpleITK LPS geometry; OpenKBP grids, whose affine carries no orientation, get it from the
    OpenKBP axis convention (`diffkt3d.data.plates.patient_frame`). The 2D angle plate is the
    case's 3D plate at the isocentre slice. The body is written as `Body`. Plates are written only
    when the case has them (see `diffkt3d.data.plates.ensure_plates`).

    Args:
        case: needs ct_hu (GDP-HMM files always hold `img`).
        path: output .npz.
        dose_scale_gy: Gy per integer unit of the stored dose.

    Returns:
        The written path. Prescriptions belong in PTV_DICT.json, see `ptv_dict_entry`.
    """
    path = Path(path)
    if case.ct_hu is None:
        raise CaseError("GDP-HMM npz needs a CT ('img')", case=case.case_id)
    case, iso_mm, notes = _zyx_layout(case)
    for note in notes:
        log.info("case %s: %s", case.case_id, note)
    data: dict[str, Any] = {}
    for s in case.structures.values():
        data[s.name] = s.mask.astype(np.uint8)
    if case.body is not None:
        data[_BODY_KEY] = case.body.astype(np.uint8)
    data["all_mask"] = list(data)
    ct = case.ct_hu
    data["img"] = ct.astype(np.int16) if np.array_equal(ct, np.round(ct)) and np.abs(ct).max() < 32767 else ct
    if case.dose_gy is not None:
        data["dose"] = np.round(case.dose_gy.astype(np.float64) / dose_scale_gy).astype(np.int32)
        data["dose_scale"] = float(dose_scale_gy)
    b = case.plan.beams
    iso_zyx = None
    if b is not None and iso_mm is not None:
        iso_zyx = case.grid.world_to_index(iso_mm)[0]
        data["isVMAT"] = b.technique.upper() == "VMAT"
        data["isocenter"] = iso_zyx.astype(np.float32)
        data["angle_list"] = np.asarray(b.gantry_angles_deg, dtype=np.float32)
    if case.beam_plate is not None:
        data["beam_plate"] = case.beam_plate.astype(np.float32)
    if case.angle_plate is not None:
        if iso_zyx is None:
            raise CaseError("cannot write the 2D angle plate without an isocentre", case=case.case_id)
        z = int(np.clip(int(iso_zyx[0]), 0, case.grid.shape[0] - 1))
        data["angle_plate"] = case.angle_plate[z].astype(np.float32)
    data.update(sitk_geometry_from_grid(case.grid))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, data)
    return path


def ptv_dict_entry(case: Case) -> dict[str, Any]:
    """PTV_DICT.json entry for a case: targets with a prescription, highest -> PTV_High, then Mid, Low."""
    targets = sorted((s for s in case.targets.values() if s.prescription_gy is not None),
                     key=lambda s: -float(s.prescription_gy))  # type: ignore[arg-type]
    if len(targets) > len(_PTV_LEVELS):
        log.warning("case %s: %d prescribed targets, GDP-HMM keeps 3 levels; dropping %s", case.case_id,
                    len(targets), [s.name for s in targets[3:]])
    return {level: {"OPTName": s.name, "PDose": float(s.prescription_gy)}  # type: ignore[arg-type]
            for level, s in zip(_PTV_LEVELS, targets, strict=False)}
