"""The radiotherapy case: every modality on one voxel grid, plus prescription and plan geometry.

Everything else in DiffKT3D (model encoding, metrics, Scorecard, importers, the server) speaks
`Case`. Arrays are in the case's own index order (for NIfTI case folders: the file's array axes),
and `Grid.affine` maps an index (i, j, k) to world millimetres in NIfTI's RAS+ convention.
DICOM readers/writers convert to and from LPS at the boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from diffkt3d.errors import CaseError

Role = Literal["target", "oar", "body", "other"]
ROLES: tuple[str, ...] = ("target", "oar", "body", "other")


@dataclass(frozen=True)
class Grid:
    """A voxel grid.

    Args:
        shape: array shape (I, J, K).
        affine: 4x4 index -> world (mm, RAS+) matrix; columns 0-2 are direction x spacing.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """(3, 3) unit column vectors of the index axes in world space."""
        return self.affine[:3, :3] / np.asarray(self.spacing_mm)[None, :]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) world mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) fractional voxel indices."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        return (xyz - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T

    def same_as(self, other: Grid, tol_mm: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=tol_mm)

    def describe(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing_mm)
        return f"shape {self.shape}, spacing ({sp}) mm"


@dataclass
class Structure:
    """One contoured structure.

    Args:
        name: structure name as in the source (file stem, ROI name).
        mask: boolean array on the case grid.
        role: target / oar / body / other.
        prescription_gy: total prescribed dose for targets, else None.
        imputed_by: the model version that generated this mask (`diffkt3d impute`), or None for a
            contour that came with the case (a clinician's, an import). Kept through plan.json and
            DICOM RT so an imputed structure is never taken for a clinician's contour.
    """

    name: str
    mask: np.ndarray
    role: Role = "oar"
    prescription_gy: float | None = None
    imputed_by: str | None = None


@dataclass
class BeamGeometry:
    """Treatment geometry needed to rasterise beam / angle plates.

    Args:
        gantry_angles_deg: IEC 61217 gantry angles of the fields (VMAT: control-point angles).
        isocenter_mm: world (RAS+) position of the isocentre.
        technique: "IMRT" or "VMAT".
        couch_angle_deg: couch angle (coplanar plans: 0).
    """

    gantry_angles_deg: list[float]
    isocenter_mm: tuple[float, float, float]
    technique: str = "IMRT"
    couch_angle_deg: float = 0.0


@dataclass
class Plan:
    """Prescription and geometry. `inferred` records every guess made, so it can be reported."""

    beams: BeamGeometry | None = None
    fractions: int | None = None
    site: str | None = None
    inferred: list[str] = field(default_factory=list)


@dataclass
class Case:
    """A radiotherapy case on one grid.

    Args:
        case_id: short id (folder name).
        grid: the voxel grid all arrays share.
        ct_hu: (I, J, K) float32 Hounsfield units, or None when missing.
        dose_gy: (I, J, K) float32 Gy, or None (prediction input never uses it).
        body: (I, J, K) bool body / possible-dose mask, or None.
        structures: name -> Structure (targets and OARs; the body is `body`).
        beam_plate, angle_plate: (I, J, K) float32 plates, or None until rasterised.
        plan: prescription/geometry.
        source: where the case came from (folder, file), for messages.
    """

    case_id: str
    grid: Grid
    ct_hu: np.ndarray | None = None
    dose_gy: np.ndarray | None = None
    body: np.ndarray | None = None
    structures: dict[str, Structure] = field(default_factory=dict)
    beam_plate: np.ndarray | None = None
    angle_plate: np.ndarray | None = None
    plan: Plan = field(default_factory=Plan)
    source: str = ""

    # -- views -----------------------------------------------------------------------------
    @property
    def targets(self) -> dict[str, Structure]:
        return {n: s for n, s in self.structures.items() if s.role == "target"}

    @property
    def oars(self) -> dict[str, Structure]:
        return {n: s for n, s in self.structures.items() if s.role == "oar"}

    def volume_cc(self, name: str) -> float:
        return float(self.structures[name].mask.sum()) * self.grid.voxel_volume_mm3 / 1000.0

    def prescription_map_gy(self) -> np.ndarray:
        """(I, J, K) float32: each target voxel holds its prescription (max where targets overlap)."""
        out = np.zeros(self.grid.shape, dtype=np.float32)
        for s in self.targets.values():
            if s.prescription_gy is not None:
                np.maximum(out, np.where(s.mask, np.float32(s.prescription_gy), 0), out=out)
        return out

    def target_union(self) -> np.ndarray:
        out = np.zeros(self.grid.shape, dtype=bool)
        for s in self.targets.values():
            out |= s.mask
        return out

    def max_prescription_gy(self) -> float | None:
        rx = [s.prescription_gy for s in self.targets.values() if s.prescription_gy is not None]
        return max(rx) if rx else None

    def has(self, modality: str) -> bool:
        """Whether a model modality can be built from this case."""
        return {
            "ct": self.ct_hu is not None,
            "dose": self.dose_gy is not None,
            "body": self.body is not None,
            "ptv": any(s.prescription_gy is not None for s in self.targets.values()),
            "oar": bool(self.oars),
            "beam": self.beam_plate is not None,
            "angle": self.angle_plate is not None,
        }[modality]

    # -- checks ------------------------------------------------------------------------------
    def validate(self, require: tuple[str, ...] = ()) -> None:
        """Raise CaseError naming the case and problem if the case cannot be used.

        Args:
            require: modalities that must be present (e.g. ("ct", "ptv") for dose prediction).
        """
        shape = self.grid.shape
        arrays = {"ct": self.ct_hu, "dose": self.dose_gy, "body": self.body,
                  "beam plate": self.beam_plate, "angle plate": self.angle_plate}
        for name, arr in arrays.items():
            if arr is None:
                continue
            if tuple(arr.shape) != shape:
                raise CaseError(f"{name} has shape {tuple(arr.shape)}, expected the case grid {shape}",
                                case=self.case_id)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise CaseError(f"{name} contains {bad} NaN/Inf voxels", case=self.case_id)
        if self.dose_gy is not None and float(self.dose_gy.min()) < -1e-3:
            raise CaseError(f"dose has negative values (min {float(self.dose_gy.min()):.3f} Gy)",
                            case=self.case_id)
        for s in self.structures.values():
            if tuple(s.mask.shape) != shape:
                raise CaseError(f"structure {s.name} has shape {tuple(s.mask.shape)}, expected {shape}",
                                case=self.case_id)
            if s.role == "target" and not s.mask.any():
                raise CaseError(f"target {s.name} is empty (no voxels)", case=self.case_id)
        for m in require:
            if not self.has(m):
                what = {"ptv": "a target (PTV) with a prescription", "oar": "an OAR structure"}.get(m, m)
                raise CaseError(f"missing {what}, which is required here", case=self.case_id)


# -- naming conventions -----------------------------------------------------------------------
_PTV_RE = re.compile(r"^(?:PTV|CTV|GTV)[_\- ]?(?:high|mid|low)?[_\- ]?(\d+(?:[.,]\d+)?)(?:\s*Gy)?$", re.I)
_TARGET_RE = re.compile(r"^(?:PTV|CTV|GTV|ITV)", re.I)
_BODY_RE = re.compile(r"^(?:body|external|skin|outline|possible_dose_mask)$", re.I)


def infer_role(name: str) -> tuple[Role, float | None]:
    """Role and prescription (Gy) from a structure name: `PTV70` -> ("target", 70.0).

    Prescriptions above 100 are read as cGy (`PTV_7000` -> 70 Gy).
    """
    if _BODY_RE.match(name):
        return "body", None
    m = _PTV_RE.match(name.strip())
    if m:
        value = float(m.group(1).replace(",", "."))
        if value > 100:
            value /= 100.0
        return "target", value
    if _TARGET_RE.match(name):
        return "target", None
    return "oar", None
