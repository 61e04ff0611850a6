"""Case folders (docs/case-format.md): one NIfTI per modality/structure plus optional plan.json.

The OpenKBP folders must load exactly as they are: `possible_dose_mask.nii.gz` is the body,
structure roles and prescriptions come from names when plan.json is absent (PTV70 -> 70 Gy), and
the OpenKBP 9-field preset supplies beam geometry, with every such guess reported in
`case.plan.inferred`.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from diffkt3d.constants import (
    ANGLE_FILE,
    BEAM_FILE,
    BODY_FILES,
    CT_FILE,
    DOSE_FILE,
    OPENKBP_FRACTIONS,
    OPENKBP_GANTRY_ANGLES_DEG,
    PLAN_FILE,
)
from diffkt3d.data.case import ROLES, BeamGeometry, Case, Grid, Plan, Structure, infer_role
from diffkt3d.errors import CaseError
from diffkt3d.io.image_guard import ImageLimits, check_nifti_header

log = logging.getLogger(__name__)

_RESERVED = {CT_FILE, DOSE_FILE, BEAM_FILE, ANGLE_FILE, *BODY_FILES}
# Files a case folder may hold that are outputs, not structures.
_IGNORED_STEMS = {"scorecard", "dose_pred", "ct_imputed"}
# Highest total prescription accepted (Gy). Curative courses stay below about 80 Gy and
# brachytherapy-equivalent totals below 150; anything higher is a unit slip (cGy written as Gy)
# or a hostile value, and must be refused before the model runs rather than scored after.
MAX_PRESCRIPTION_GY = 150.0


def check_prescription_gy(value: Any, where: str, case_id: str, file: str | None) -> float:
    """A prescription as a finite number of Gy in (0, MAX_PRESCRIPTION_GY], else a CaseError
    naming where it came from and what was found."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CaseError(f"{where}: prescription_gy must be a number of Gy, found {value!r}",
                        case=case_id, file=file)
    if not math.isfinite(value) or not 0 < value <= MAX_PRESCRIPTION_GY:
        raise CaseError(f"{where}: prescription_gy must be finite and in (0, {MAX_PRESCRIPTION_GY:g}] Gy, "
                        f"found {value!r}", case=case_id, file=file)
    return float(value)


def check_fractions(value: Any, case_id: str, file: str | None) -> int:
    """Number of fractions as an integer >= 1 (a whole-valued float such as 30.0 is accepted)."""
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise CaseError(f"plan.json 'fractions' must be an integer >= 1, found {value!r}", case=case_id, file=file)
    return int(value)


def check_imputed_by(value: Any, name: str, case_id: str, file: str | None) -> str | None:
    """plan.json's `imputed_by` of a structure: absent (a contour that came with the case) or the
    non-empty model version that imputed it."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CaseError(f"structure {name}: imputed_by must be the model version that imputed it (a non-empty "
                        f"string), found {value!r}", case=case_id, file=file)
    return value.strip()


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def load_nifti(path: Path, case_id: str, dtype: type = np.float32,
               limits: ImageLimits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file fully, once its header has passed `check_nifti_header`; every failure
    becomes a CaseError naming case and file.

    Args:
        limits: size limits checked on the header before any voxel is read (None:
            `ImageLimits.from_env()`).

    Returns:
        (array, affine): array cast to dtype, affine 4x4 (qform/sform as nibabel resolves it).
    """
    check_nifti_header(path, limits or ImageLimits.from_env(), case=case_id)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except FileNotFoundError:
        raise CaseError("file not found", case=case_id, file=str(path)) from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise CaseError(f"cannot read NIfTI (truncated or corrupt file: {exc})", case=case_id,
                        file=str(path)) from None
    except Exception as exc:  # nibabel raises several types for non-NIfTI content
        raise CaseError(f"not a readable NIfTI image ({type(exc).__name__}: {exc})", case=case_id,
                        file=str(path)) from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"expected a 3D volume, found shape {data.shape}", case=case_id, file=str(path))
    if dtype is bool:
        if not np.isfinite(data).all():
            raise CaseError("mask contains NaN/Inf", case=case_id, file=str(path))
        return data > 0.5, img.affine
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise CaseError(f"contains {bad} NaN/Inf voxels", case=case_id, file=str(path))
    return data.astype(dtype, copy=False), img.affine


def read_plan_json(path: Path, case_id: str) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CaseError(f"plan.json is not valid JSON ({exc})", case=case_id, file=str(path)) from None
    if not isinstance(plan, dict):
        raise CaseError("plan.json must hold a JSON object", case=case_id, file=str(path))
    return plan


def load_case_folder(folder: str | Path, *, with_dose: bool = True, limits: ImageLimits | None = None) -> Case:
    """Load a case folder.

    Args:
        folder: the case folder.
        with_dose: read dose.nii.gz when present (False for prediction: a stored dose is never
            an input to dose prediction).
        limits: image size limits, checked on every header before its data are read (None:
            `ImageLimits.from_env()`, i.e. `DIFFKT3D_MAX_IMAGE_MB` or the default).

    Raises:
        CaseError: missing folder, unreadable file, grid mismatch (naming both files), bad plan.
    """
    folder = Path(folder)
    case_id = folder.name
    if not folder.is_dir():
        raise CaseError("case folder does not exist", case=case_id, file=str(folder))
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not files:
        raise CaseError("no NIfTI files in the case folder", case=case_id, file=str(folder))
    limits = limits or ImageLimits.from_env()

    ref_grid: Grid | None = None
    ref_file = ""

    def read(path: Path, dtype: type) -> np.ndarray:
        nonlocal ref_grid, ref_file
        arr, affine = load_nifti(path, case_id, dtype, limits)
        grid = Grid(shape=tuple(int(s) for s in arr.shape), affine=np.asarray(affine, dtype=np.float64))
        if ref_grid is None:
            ref_grid, ref_file = grid, path.name
        elif not grid.same_as(ref_grid):
            raise CaseError(
                f"grid mismatch: {path.name} has {grid.describe()}, {ref_file} has {ref_grid.describe()}",
                case=case_id, file=str(path))
        return arr

    ct = read(folder / CT_FILE, np.float32) if (folder / CT_FILE).exists() else None
    body = None
    for name in BODY_FILES:
        if (folder / name).exists():
            body = read(folder / name, bool)
            break
    plan_dict = read_plan_json(folder / PLAN_FILE, case_id) if (folder / PLAN_FILE).exists() else {}
    structures_cfg: dict[str, Any] = plan_dict.get("structures", {}) or {}
    if not isinstance(structures_cfg, dict):
        raise CaseError("plan.json 'structures' must map names to {role, prescription_gy}", case=case_id)

    inferred: list[str] = []
    structures: dict[str, Structure] = {}
    for path in files:
        if path.name in _RESERVED:
            continue
        name = _stem(path)
        if name in _IGNORED_STEMS:
            continue
        mask = read(path, bool)
        cfg = structures_cfg.get(name, {})
        if not isinstance(cfg, dict):
            raise CaseError(f"plan.json structure {name!r} must be an object with role and prescription_gy, "
                            f"found {cfg!r}", case=case_id, file=PLAN_FILE)
        role_guess, rx_guess = infer_role(name)
        role = cfg.get("role", role_guess)
        if role not in ROLES:
            raise CaseError(f"structure {name}: unknown role {role!r} (expected one of {ROLES})",
                            case=case_id, file=str(folder / PLAN_FILE))
        rx = cfg.get("prescription_gy", rx_guess if role == "target" else None)
        if rx is not None:
            from_plan = "prescription_gy" in cfg
            rx = check_prescription_gy(
                rx, f"structure {name}" + (" in plan.json" if from_plan else " (prescription read from its name)"),
                case_id, PLAN_FILE if from_plan else path.name)
        imputed_by = check_imputed_by(cfg.get("imputed_by"), name, case_id, str(folder / PLAN_FILE))
        if "role" not in cfg:
            inferred.append(f"{name}: role '{role}' from its name"
                            + (f", prescription {rx:g} Gy" if rx is not None else ""))
        if role == "body" and body is None:
            body = mask
            continue
        if role == "target" and not mask.any():
            raise CaseError(f"target {name} is empty (no voxels)", case=case_id, file=str(path))
        structures[name] = Structure(name=name, mask=mask, role=role,
                                     prescription_gy=None if rx is None else float(rx), imputed_by=imputed_by)
    for name in structures_cfg:
        if name not in structures and not (folder / f"{name}.nii.gz").exists():
            raise CaseError(f"plan.json names structure {name!r} but {name}.nii.gz is missing",
                            case=case_id, file=str(folder / PLAN_FILE))

    dose = None
    if with_dose and (folder / DOSE_FILE).exists():
        dose = read(folder / DOSE_FILE, np.float32)
    beam = read(folder / BEAM_FILE, np.float32) if (folder / BEAM_FILE).exists() else None
    angle = read(folder / ANGLE_FILE, np.float32) if (folder / ANGLE_FILE).exists() else None
    if ref_grid is None:
        raise CaseError("no volume could be read", case=case_id, file=str(folder))

    case = Case(case_id=case_id, grid=ref_grid, ct_hu=ct, dose_gy=dose, body=body, structures=structures,
                beam_plate=beam, angle_plate=angle, source=str(folder))
    case.plan = _plan_from_dict(plan_dict, case, inferred)
    if ct is None:
        log.info("case %s has no %s: CT is a missing modality", case_id, CT_FILE)
    case.validate()
    return case


def _plan_from_dict(plan: dict[str, Any], case: Case, inferred: list[str]) -> Plan:
    beams_cfg = plan.get("beams")
    if beams_cfg is not None:
        try:
            angles = [float(a) for a in beams_cfg["gantry_angles_deg"]]
        except (KeyError, TypeError, ValueError):
            raise CaseError("plan.json 'beams.gantry_angles_deg' must be a list of numbers",
                            case=case.case_id) from None
        iso = beams_cfg.get("isocenter_mm")
        if iso is None:
            iso = default_isocenter_mm(case)
            inferred.append("isocentre at the target centroid (plan.json gives none)")
        beams = BeamGeometry(gantry_angles_deg=angles, isocenter_mm=tuple(float(v) for v in iso),
                             technique=str(beams_cfg.get("technique", "IMRT")).upper(),
                             couch_angle_deg=float(beams_cfg.get("couch_angle_deg", 0.0)))
    elif case.targets:
        beams = BeamGeometry(gantry_angles_deg=list(OPENKBP_GANTRY_ANGLES_DEG),
                             isocenter_mm=default_isocenter_mm(case), technique="IMRT")
        inferred.append("beams: OpenKBP preset, 9 coplanar IMRT fields at 0-320 deg, isocentre at the "
                        "target centroid")
    else:
        beams = None
    fractions = plan.get("fractions")
    if fractions is not None:
        fractions = check_fractions(fractions, case.case_id, PLAN_FILE)
    if fractions is None and any(n.upper().startswith("PTV") for n in case.targets):
        fractions = OPENKBP_FRACTIONS
        inferred.append(f"fractions: {OPENKBP_FRACTIONS} (OpenKBP preset)")
    return Plan(beams=beams, fractions=None if fractions is None else int(fractions),
                site=plan.get("site"), inferred=inferred)


def default_isocenter_mm(case: Case) -> tuple[float, float, float]:
    """Isocentre at the centroid of the union of targets (OpenKBP convention of this project)."""
    union = case.target_union()
    if not union.any():
        raise CaseError("cannot place the isocentre: no target voxels", case=case.case_id)
    ijk = np.argwhere(union).mean(axis=0)
    return tuple(float(v) for v in case.grid.index_to_world(ijk)[0])  # type: ignore[return-value]


def plan_to_dict(case: Case) -> dict[str, Any]:
    """plan.json content for a case (roles, prescriptions, beams), the inverse of the reader."""
    out: dict[str, Any] = {
        "structures": {n: {"role": s.role,
                           **({"prescription_gy": s.prescription_gy} if s.prescription_gy is not None else {}),
                           **({"imputed_by": s.imputed_by} if s.imputed_by else {})}
                       for n, s in case.structures.items()},
    }
    if case.plan.beams is not None:
        b = case.plan.beams
        out["beams"] = {"gantry_angles_deg": list(b.gantry_angles_deg),
                        "isocenter_mm": list(b.isocenter_mm), "technique": b.technique,
                        "couch_angle_deg": b.couch_angle_deg}
    if case.plan.fractions is not None:
        out["fractions"] = case.plan.fractions
    if case.plan.site:
        out["site"] = case.plan.site
    return out


def save_nifti(array: np.ndarray, grid: Grid, path: str | Path, dtype: type = np.float32) -> Path:
    """Write one volume with the grid's affine, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), grid.affine)
    tmp = path.with_name(path.name + ".part.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def save_case_folder(case: Case, folder: str | Path, *, write_plan: bool = True) -> Path:
    """Write every modality present, one NIfTI each, plus plan.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if case.ct_hu is not None:
        save_nifti(case.ct_hu, case.grid, folder / CT_FILE, np.int16 if np.allclose(case.ct_hu, np.round(case.ct_hu)) else np.float32)
    if case.dose_gy is not None:
        save_nifti(case.dose_gy, case.grid, folder / DOSE_FILE, np.float32)
    if case.body is not None:
        save_nifti(case.body, case.grid, folder / BODY_FILES[0], np.uint8)
    for s in case.structures.values():
        save_nifti(s.mask, case.grid, folder / f"{s.name}.nii.gz", np.uint8)
    if case.beam_plate is not None:
        save_nifti(case.beam_plate, case.grid, folder / BEAM_FILE, np.float32)
    if case.angle_plate is not None:
        save_nifti(case.angle_plate, case.grid, folder / ANGLE_FILE, np.float32)
    if write_plan:
        (folder / PLAN_FILE).write_text(json.dumps(plan_to_dict(case), indent=2))
    return folder
