"""Cumulative dose-volume histograms for the DVH chart (pure numpy, no Slicer import).

Same convention as `diffkt3d.metrics.dvh.cumulative_dvh` (a test compares both): the volume at a
dose level is the share of the structure's voxels receiving at least that dose, voxels counted
whole (no partial volume), levels 0, w, 2w, ... Gy on one shared axis so several structures and
candidates fit one table.
"""

from __future__ import annotations

import numpy as np

from .constants import DVH_BIN_WIDTH_GY


def dose_levels(max_dose_gy: float, bin_width_gy: float = DVH_BIN_WIDTH_GY) -> np.ndarray:
    """Dose axis (Gy) 0, w, 2w, ... reaching one bin past `max_dose_gy` so curves end at 0 %."""
    if not (np.isfinite(bin_width_gy) and bin_width_gy > 0):
        raise ValueError(f"bin_width_gy must be > 0, got {bin_width_gy}")
    if not np.isfinite(max_dose_gy) or max_dose_gy < 0:
        raise ValueError(f"max_dose_gy must be a finite dose >= 0, got {max_dose_gy}")
    n_bins = int(np.floor(max_dose_gy / bin_width_gy + 1e-9)) + 2
    return np.arange(n_bins, dtype=np.float64) * bin_width_gy


def cumulative_dvh(dose_gy: np.ndarray, mask: np.ndarray, levels_gy: np.ndarray) -> np.ndarray:
    """Volume (% of the structure, 0-100) receiving at least each dose level.

    Args:
        dose_gy: dose array in Gy, any shape.
        mask: same shape, non-zero inside the structure.
        levels_gy: 1D dose levels (Gy), ascending.

    Returns:
        1D float64 array, same length as `levels_gy`.

    Raises:
        ValueError: shape mismatch or empty structure.
    """
    if dose_gy.shape != mask.shape:
        raise ValueError(f"dose {dose_gy.shape} and mask {mask.shape} differ in shape")
    d = np.sort(dose_gy[mask.astype(bool, copy=False)].astype(np.float64, copy=False))
    if d.size == 0:
        raise ValueError("structure is empty (0 voxels): no DVH")
    below = np.searchsorted(d, levels_gy, side="left")
    return 100.0 * (d.size - below) / d.size
