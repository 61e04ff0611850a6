"""Shared DICOM RT pieces: SOP class UIDs, DS formatting and the LPS <-> RAS boundary.

Coordinate convention (the one place it is decided):
    DICOM patient coordinates are LPS (x to the patient's Left, y Posterior, z Superior);
    `Grid.affine` is NIfTI RAS+ (x Right, y Anterior, z Superior). A point keeps its place in
    the patient; only the sign of x and y flips: xyz_lps = diag(-1, -1, 1) @ xyz_ras.
    Readers convert DICOM positions/directions to RAS right after parsing and writers convert
    back just before encoding, so nothing else in DiffKT3D ever sees LPS.

Array layout of a DICOM case (reader output, writer input):
    axis 0 = image column index (along ImageOrientationPatient[0:3], "row direction"),
    axis 1 = image row index (along ImageOrientationPatient[3:6], "column direction"),
    axis 2 = slice index, increasing along the slice normal row_dir x col_dir.
    A 2D DICOM frame (Rows, Columns) therefore equals `volume[:, :, k].T`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydicom.valuerep import format_number_as_ds

# SOP classes (DICOM PS3.4 Annex B).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # referenced "study" SOP class in RTSTRUCT
SOP_CLASS_NAMES: dict[str, str] = {
    CT_IMAGE_STORAGE: "CT Image",
    RT_DOSE_STORAGE: "RT Dose",
    RT_STRUCTURE_SET_STORAGE: "RT Structure Set",
    RT_PLAN_STORAGE: "RT Plan",
}

# ROIGenerationDescription (LO: 64 characters at most) of an ROI DiffKT3D imputed, followed by the model
# version; the reader gives such an ROI back its `Structure.imputed_by`.
IMPUTED_ROI_PREFIX = "IMPUTED by DiffKT3D, model "


def imputed_roi_description(model_version: str) -> str:
    return (IMPUTED_ROI_PREFIX + model_version)[:64]


def imputed_by_from_description(description: str) -> str | None:
    """The model version an ROI's ROIGenerationDescription names, or None for any other ROI."""
    if not description.startswith(IMPUTED_ROI_PREFIX):
        return None
    return description[len(IMPUTED_ROI_PREFIX):].strip() or "unknown"


# x and y flip between RAS+ (our affines) and LPS (DICOM); 4x4 so it applies to affines too.
LPS_FROM_RAS: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_to_lps(xyz: np.ndarray) -> np.ndarray:
    """(..., 3) RAS mm -> (..., 3) LPS mm (also valid for direction vectors)."""
    out = np.array(xyz, dtype=np.float64, copy=True)
    out[..., :2] *= -1.0
    return out


def lps_to_ras(xyz: np.ndarray) -> np.ndarray:
    """(..., 3) LPS mm -> (..., 3) RAS mm; the flip is its own inverse."""
    return ras_to_lps(xyz)


def ds(values: Iterable[float] | float) -> list[str] | str:
    """Format numbers as DICOM Decimal Strings (at most 16 characters, full precision kept).

    pydicom 2.4 warns on or rejects Python floats whose repr exceeds 16 characters, so every DS
    we write goes through here.
    """
    if np.isscalar(values):
        return format_number_as_ds(float(values))  # type: ignore[arg-type]
    return [format_number_as_ds(float(v)) for v in values]  # type: ignore[union-attr]


def lps_affine(row_dir: np.ndarray, col_dir: np.ndarray, normal: np.ndarray,
               spacing_mm: tuple[float, float, float], origin_lps: np.ndarray) -> np.ndarray:
    """4x4 index (column, row, slice) -> LPS mm affine of a DICOM volume.

    Args:
        row_dir, col_dir: ImageOrientationPatient[0:3] and [3:6] (unit vectors, LPS).
        normal: unit slice direction (LPS), the direction slice index 2 increases in.
        spacing_mm: (column spacing, row spacing, slice spacing), i.e. (PixelSpacing[1],
            PixelSpacing[0], slice step).
        origin_lps: ImagePositionPatient of the first slice (centre of its first voxel).
    """
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(row_dir, dtype=np.float64) * spacing_mm[0]
    affine[:3, 1] = np.asarray(col_dir, dtype=np.float64) * spacing_mm[1]
    affine[:3, 2] = np.asarray(normal, dtype=np.float64) * spacing_mm[2]
    affine[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
    return affine
