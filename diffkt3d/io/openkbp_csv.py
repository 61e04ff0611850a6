"""Reader for the original OpenKBP sparse-CSV case layout.

The OpenKBP challenge published each patient as a folder of CSV files
(`provided-data/{train,validation}-pats/pt_N/`):

- every CSV starts with the header line ``,data``;
- column 0 is a flat C-order index into the 128 x 128 x 128 grid, column 1 the value (empty for
  masks: a listed index is a voxel inside the structure);
- ``ct.csv`` holds HU + 1000 (unlisted voxels are 0, i.e. -1000 HU, air);
- ``dose.csv`` holds Gy (unlisted voxels 0 Gy);
- ``possible_dose_mask.csv`` is the body / possible-dose region;
- ``voxel_dimensions.csv`` holds three spacings in mm, one per line, in array-axis order.

The result follows the conventions of the NIfTI case folders `diffkt3d import openkbp` writes: array axes are
the original C-order axes (no transpose), affine = diag(spacing) with the origin at 0, CT in HU,
dose in Gy, masks boolean. Roles, prescriptions and beam geometry are inferred exactly as for a
NIfTI case folder without plan.json (same helper), and every guess is listed in
`case.plan.inferred`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from diffkt3d.constants import BODY_FILES
from diffkt3d.data.case import Case, Grid, Structure, infer_role
from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import _plan_from_dict

log = logging.getLogger(__name__)

# Grid of every OpenKBP case (the challenge resampled all patients to it).
OPENKBP_SHAPE: tuple[int, int, int] = (128, 128, 128)
# ct.csv stores HU + CT_OFFSET_HU so that air (-1000 HU) is 0 and can be left out of the sparse file.
CT_OFFSET_HU: float = 1000.0
VOXEL_DIMENSIONS_FILE = "voxel_dimensions.csv"
_CT_CSV = "ct.csv"
_DOSE_CSV = "dose.csv"
_HEADER = ",data"
# possible_dose_mask is the body (same name the NIfTI case folders use).
_BODY_STEM = BODY_FILES[0].removesuffix(".nii.gz")


def is_openkbp_csv_case(folder: str | Path) -> bool:
    """Whether a folder looks like one OpenKBP CSV case (has voxel_dimensions.csv or ct/dose CSV)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / n).is_file() for n in (VOXEL_DIMENSIONS_FILE, _CT_CSV, _DOSE_CSV))


def read_voxel_dimensions(path: Path, case_id: str) -> tuple[float, float, float]:
    """Three positive spacings (mm) from voxel_dimensions.csv, in array-axis order."""
    if not path.is_file():
        raise CaseError(f"{VOXEL_DIMENSIONS_FILE} is missing: the voxel spacing (mm) is needed for the grid",
                        case=case_id, file=str(path))
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as exc:
        raise CaseError(f"expected three numbers (spacing in mm), cannot parse: {exc}", case=case_id,
                        file=str(path)) from None
    if values.size != 3 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise CaseError(f"expected three positive spacings in mm, found {values.ravel().tolist()}",
                        case=case_id, file=str(path))
    return tuple(float(v) for v in values.ravel())  # type: ignore[return-value]


def read_sparse_csv(path: Path, case_id: str, shape: tuple[int, int, int] = OPENKBP_SHAPE,
                    with_values: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Parse one OpenKBP sparse CSV.

    Args:
        path: the CSV file.
        case_id: for messages.
        shape: grid the flat indices address (C order).
        with_values: read column 1 (CT, dose); False for masks, whose column 1 is empty.

    Returns:
        (indices, values): int64 flat indices (N,), float64 values (N,) or None for masks.

    Raises:
        CaseError: missing file, wrong header, non-numeric entry, non-integer or out-of-range index.
    """
    if not path.is_file():
        raise CaseError("file not found", case=case_id, file=str(path))
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline().strip()
    if header != _HEADER:
        raise CaseError(f"expected the OpenKBP header {_HEADER!r} on line 1, found {header[:40]!r}",
                        case=case_id, file=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loadtxt warns on a header-only (empty) file
            if with_values:
                table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
            else:
                table = np.loadtxt(path, delimiter=",", skiprows=1, usecols=0, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise CaseError(f"non-numeric or malformed entry ({exc})", case=case_id, file=str(path)) from None
    if table.size == 0:
        return np.zeros(0, dtype=np.int64), (np.zeros(0) if with_values else None)
    if with_values and table.shape[1] != 2:
        raise CaseError(f"expected 2 columns (index, value), found {table.shape[1]}", case=case_id,
                        file=str(path))
    flat = table[:, 0]
    n_voxels = int(np.prod(shape))
    if not np.all(np.isfinite(flat)) or np.any(flat != np.round(flat)):
        raise CaseError("column 0 must hold integer voxel indices", case=case_id, file=str(path))
    if flat.min() < 0 or flat.max() >= n_voxels:
        bad = flat[(flat < 0) | (flat >= n_voxels)][0]
        raise CaseError(f"voxel index {int(bad)} out of range for a {shape} grid (expected 0..{n_voxels - 1})",
                        case=case_id, file=str(path))
    values = None
    if with_values:
        values = table[:, 1]
        if not np.all(np.isfinite(values)):
            raise CaseError("column 1 holds NaN/Inf or empty values where numbers are required",
                            case=case_id, file=str(path))
    return flat.astype(np.int64), values


def _dense(indices: np.ndarray, values: np.ndarray | float, shape: tuple[int, int, int],
           fill: float, dtype: type) -> np.ndarray:
    out = np.full(int(np.prod(shape)), fill, dtype=dtype)
    out[indices] = values
    return out.reshape(shape)  # C order, the layout the flat indices address


def read_openkbp_csv_case(folder: str | Path, *, with_dose: bool = True,
                          shape: tuple[int, int, int] = OPENKBP_SHAPE) -> Case:
    """Read one OpenKBP CSV case folder (e.g. provided-data/validation-pats/pt_201) into a Case.

    Args:
        folder: the patient folder.
        with_dose: read dose.csv when present (False for prediction inputs).
        shape: grid shape the flat indices address; OpenKBP is always 128^3.

    Returns:
        Case with ct_hu (float32 HU; absent when ct.csv is absent), dose_gy (float32 Gy), body
        (possible_dose_mask), one Structure per other CSV, grid affine diag(spacing).

    Raises:
        CaseError: missing folder / voxel_dimensions.csv, malformed CSV (naming the file).
    """
    folder = Path(folder)
    case_id = folder.name
    if not folder.is_dir():
        raise CaseError("case folder does not exist", case=case_id, file=str(folder))
    spacing = read_voxel_dimensions(folder / VOXEL_DIMENSIONS_FILE, case_id)
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    grid = Grid(shape=tuple(int(s) for s in shape), affine=affine)  # type: ignore[arg-type]

    ct = None
    if (folder / _CT_CSV).is_file():
        idx, val = read_sparse_csv(folder / _CT_CSV, case_id, shape)
        ct = _dense(idx, val - CT_OFFSET_HU, shape, fill=-CT_OFFSET_HU, dtype=np.float32)
    else:
        log.info("case %s has no %s: CT is a missing modality", case_id, _CT_CSV)
    dose = None
    if with_dose and (folder / _DOSE_CSV).is_file():
        idx, val = read_sparse_csv(folder / _DOSE_CSV, case_id, shape)
        dose = _dense(idx, val, shape, fill=0.0, dtype=np.float32)

    body = None
    structures: dict[str, Structure] = {}
    inferred: list[str] = []
    for path in sorted(folder.glob("*.csv")):
        name = path.stem
        if path.name in (_CT_CSV, _DOSE_CSV, VOXEL_DIMENSIONS_FILE):
            continue
        idx, _ = read_sparse_csv(path, case_id, shape, with_values=False)
        mask = _dense(idx, True, shape, fill=False, dtype=bool)
        if name == _BODY_STEM:
            body = mask
            continue
        role, rx = infer_role(name)
        if role == "body" and body is None:
            body = mask
            continue
        inferred.append(f"{name}: role '{role}' from its name" + (f", prescription {rx:g} Gy" if rx is not None else ""))
        structures[name] = Structure(name=name, mask=mask, role=role, prescription_gy=rx)
    if ct is None and dose is None and body is None and not structures:
        raise CaseError("no OpenKBP CSV volumes (ct.csv, dose.csv, masks) in the folder", case=case_id,
                        file=str(folder))

    case = Case(case_id=case_id, grid=grid, ct_hu=ct, dose_gy=dose, body=body, structures=structures,
                source=str(folder))
    case.plan = _plan_from_dict({}, case, inferred)
    case.validate()
    return case


def find_openkbp_csv_cases(root: str | Path) -> list[Path]:
    """Case folders under `root`: root itself if it is a case, else its sub-folders that are cases."""
    root = Path(root)
    if is_openkbp_csv_case(root):
        return [root]
    if not root.is_dir():
        raise CaseError("path does not exist or is not a folder", file=str(root))
    cases = sorted((p for p in root.rglob("*") if is_openkbp_csv_case(p)), key=_natural_key)
    if not cases:
        raise CaseError("no OpenKBP CSV case folders (with voxel_dimensions.csv) found", file=str(root))
    return cases


def _natural_key(path: Path) -> tuple:
    stem = path.name
    digits = "".join(ch for ch in stem if ch.isdigit())
    return (str(path.parent), stem.rstrip("0123456789"), int(digits) if digits else -1, stem)
