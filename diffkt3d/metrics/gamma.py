"""3D global gamma index (Low et al. 1998) on one voxel grid, vectorised over search offsets.

For each reference voxel r above the low-dose cut-off,
``gamma(r) = min_o sqrt(((E(r + o) - R(r)) / dD)^2 + (|o| / DTA)^2)``,
where E is the evaluated dose (e.g. the prediction) linearly interpolated at r + o, and the
minimum runs over offsets o (mm) on a lattice of step ``step_mm`` inside a sphere of radius
``max_gamma * DTA``. Global: ``dD = dose_pct / 100 * norm`` with ``norm`` the reference maximum
(or ``global_norm_gy``); the cut-off is ``cutoff_pct / 100 * norm`` of the REFERENCE dose
(``ref >= cutoff``), as in pymedphys.gamma. Gammas above ``max_gamma`` are reported as
``max_gamma`` (the search stops there), so the pass rate (gamma <= 1) is exact for any
``max_gamma >= 1``.

Speed: each offset costs one trilinear gather (8 ``np.take`` on the active voxels). Offsets
are visited by increasing distance and a voxel is retired as soon as no farther offset can
lower its gamma (its gamma^2 <= (next distance / DTA)^2), or, for a pass rate only, as soon as
it passes. Anisotropic spacing is handled by building the lattice in mm and converting to
voxels per axis. Sub-voxel accuracy: the lattice step (default DTA / 10 = 0.3 mm, like
pymedphys' ``interp_fraction=10``) is the only approximation; a discrete search can only
over-estimate gamma, most in steep gradients and for small gammas (vs pymedphys on smooth
test doses: pass rates within 0.5 %, single gammas within ~0.1). Timing on an OpenKBP case
(128^3, 59k voxels above the cut-off, 2 busy cores): pass rate ~2 s, full map ~6 s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["GammaResult", "gamma_index", "gamma_pass_rate"]


@dataclass
class GammaResult:
    """Result of :func:`gamma_index`.

    Attributes:
        gamma: same shape as the reference; NaN where not evaluated (below the cut-off or no
            evaluated dose in reach), else the gamma value capped at ``max_gamma``.
        pass_rate_pct: % of evaluated voxels with gamma <= 1.
        n_evaluated: number of voxels with a gamma value.
        dose_tolerance_gy, cutoff_gy: the absolute criteria used (Gy).
    """

    gamma: np.ndarray
    pass_rate_pct: float
    n_evaluated: int
    dose_tolerance_gy: float
    cutoff_gy: float


def _offset_lattice(spacing_mm: np.ndarray, radius_mm: float, step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (K, 3) in voxels and their lengths (K,) in mm, sorted by length, within radius."""
    k = int(math.floor(radius_mm / step_mm + 1e-9))
    axis = np.arange(-k, k + 1, dtype=np.float64) * step_mm
    grid_mm = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    dist = np.linalg.norm(grid_mm, axis=1)
    keep = dist <= radius_mm + 1e-9
    grid_mm, dist = grid_mm[keep], dist[keep]
    order = np.argsort(dist, kind="stable")
    # Round so offsets that are whole voxels have exactly zero fractional parts.
    return np.round(grid_mm[order] / spacing_mm[None, :], 9), dist[order]


def _run_gamma(
    ref: np.ndarray,
    ev: np.ndarray,
    spacing_mm: Sequence[float],
    dose_pct: float,
    dta_mm: float,
    cutoff_pct: float,
    max_gamma: float,
    step_mm: float | None,
    global_norm_gy: float | None,
    pass_only: bool,
) -> GammaResult:
    # 1. Validate and derive the absolute criteria.
    if ref.shape != ev.shape or ref.ndim != 3:
        raise ValueError(f"gamma needs two 3D doses of the same shape, got {ref.shape} and {ev.shape}")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be 3 positive numbers (mm, array-axis order), got {spacing_mm}")
    if dose_pct <= 0 or dta_mm <= 0 or max_gamma < 1:
        raise ValueError(
            f"need dose_pct > 0, dta_mm > 0, max_gamma >= 1; got {dose_pct}, {dta_mm}, {max_gamma}"
        )
    ref = ref.astype(np.float64, copy=False)
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(ev))):
        raise ValueError("dose contains NaN/inf values")
    norm = float(ref.max()) if global_norm_gy is None else float(global_norm_gy)
    if norm <= 0:
        raise ValueError(f"global normalisation dose must be > 0, got {norm} Gy")
    dose_tol = dose_pct / 100.0 * norm
    cutoff = cutoff_pct / 100.0 * norm
    step = dta_mm / 10.0 if step_mm is None else float(step_mm)
    if step <= 0:
        raise ValueError(f"step_mm must be > 0, got {step_mm}")

    # 2. Offsets (voxels) sorted by distance, and the NaN-padded evaluated dose.
    offsets_vox, dist_mm = _offset_lattice(spacing, max_gamma * dta_mm, step)
    pad = np.ceil(np.abs(offsets_vox).max(axis=0)).astype(int) + 1
    ev_pad = np.pad(ev.astype(np.float64), [(p, p) for p in pad], constant_values=np.nan)
    strides = np.array([ev_pad.shape[1] * ev_pad.shape[2], ev_pad.shape[2], 1], dtype=np.int64)
    ev_flat = ev_pad.ravel()

    # Trilinear corners of every offset: flat shifts (K, 8) and weights (K, 8), precomputed so
    # the loop below is only gathers.
    floor = np.floor(offsets_vox)
    frac = offsets_vox - floor
    corners = np.array(list(np.ndindex(2, 2, 2)), dtype=np.int64)  # (8, 3)
    shifts = ((floor[:, None, :].astype(np.int64) + corners[None]) * strides).sum(-1)  # (K, 8)
    weights = np.prod(np.where(corners[None] == 1, frac[:, None, :], 1.0 - frac[:, None, :]), axis=-1)

    # 3. Active reference voxels (>= cut-off): flat index into the padded grid, and values.
    points = np.flatnonzero(ref.ravel() >= cutoff)
    ijk = np.stack(np.unravel_index(points, ref.shape), axis=1)  # (N, 3)
    base = (ijk + pad[None, :]) @ strides  # (N,)
    ref_vals = ref.ravel()[points]
    best = np.full(points.size, np.inf)  # current min gamma^2 of the active voxels
    final = np.full(points.size, np.nan)  # retired gamma^2, by original position
    active = np.arange(points.size)

    # 4. Visit offsets by distance; gather E at r + o trilinearly; keep the minimum gamma^2.
    n_off = len(dist_mm)
    for i in range(n_off):
        if active.size == 0:
            break
        val = None
        for shift, weight in zip(shifts[i].tolist(), weights[i].tolist(), strict=True):
            if weight == 0.0:  # skip zero-weight corners (they may lie in the NaN padding)
                continue
            term = ev_flat.take(base + shift)
            if weight != 1.0:
                term *= weight
            val = term if val is None else val + term
        g2 = ((val - ref_vals) / dose_tol) ** 2 + (dist_mm[i] / dta_mm) ** 2
        np.fmin(best, g2, out=best)  # fmin ignores NaN (offset outside the grid)

        # Retire voxels no farther offset can improve (or that passed, for a pass rate only).
        next_d2 = (dist_mm[i + 1] / dta_mm) ** 2 if i + 1 < n_off else np.inf
        if i + 1 < n_off and dist_mm[i + 1] == dist_mm[i]:
            continue  # finish the shell first
        done = best <= next_d2
        if pass_only:
            done |= best <= 1.0
        if i + 1 == n_off:
            done[:] = True
        if done.any():
            final[active[done]] = best[done]
            keep = ~done
            active, base, ref_vals, best = active[keep], base[keep], ref_vals[keep], best[keep]

    # 5. Gamma map, capped at max_gamma; inf (never in reach) -> NaN.
    # The pass test uses the uncapped values (with max_gamma = 1 a capped fail would read 1).
    g = np.sqrt(final)
    g[np.isinf(g)] = np.nan
    valid = ~np.isnan(g)
    n_eval = int(valid.sum())
    rate = 100.0 * float(np.count_nonzero(g[valid] <= 1.0)) / n_eval if n_eval else float("nan")
    gamma = np.full(ref.size, np.nan)
    gamma[points] = np.minimum(g, max_gamma)
    gamma = gamma.reshape(ref.shape)
    return GammaResult(gamma, rate, n_eval, dose_tol, cutoff)


def gamma_index(
    ref_dose_gy: np.ndarray,
    eval_dose_gy: np.ndarray,
    spacing_mm: Sequence[float],
    dose_pct: float = 3.0,
    dta_mm: float = 3.0,
    cutoff_pct: float = 10.0,
    max_gamma: float = 2.0,
    step_mm: float | None = None,
    global_norm_gy: float | None = None,
) -> GammaResult:
    """Global 3D gamma map of ``eval_dose_gy`` against ``ref_dose_gy`` on the same grid.

    Args:
        ref_dose_gy: reference dose (Gy), (D, H, W); gamma is computed at its voxels.
        eval_dose_gy: evaluated dose (Gy), same shape; searched around each reference voxel.
        spacing_mm: voxel size (mm) along the three array axes (e.g. ``case.grid.spacing_mm``).
        dose_pct: dose criterion, % of the global normalisation (default 3 %).
        dta_mm: distance-to-agreement criterion (default 3 mm).
        cutoff_pct: reference voxels below this % of the normalisation are skipped (default 10).
        max_gamma: search radius in units of DTA; larger gammas are reported as ``max_gamma``.
        step_mm: search lattice step (default DTA / 10).
        global_norm_gy: normalisation dose (default the reference maximum).

    Returns:
        :class:`GammaResult` with the map and the pass rate.
    """
    return _run_gamma(
        np.asarray(ref_dose_gy), np.asarray(eval_dose_gy), spacing_mm, dose_pct, dta_mm,
        cutoff_pct, max_gamma, step_mm, global_norm_gy, pass_only=False,
    )


def gamma_pass_rate(
    ref_dose_gy: np.ndarray,
    eval_dose_gy: np.ndarray,
    spacing_mm: Sequence[float],
    dose_pct: float = 3.0,
    dta_mm: float = 3.0,
    cutoff_pct: float = 10.0,
    step_mm: float | None = None,
    global_norm_gy: float | None = None,
) -> float:
    """Gamma pass rate (%, gamma <= 1) with the criteria of :func:`gamma_index`.

    Faster than the full map: the search radius is one DTA and a voxel stops at its first
    passing offset. Default 3 %/3 mm global, 10 % low-dose cut-off of the reference maximum.
    """
    result = _run_gamma(
        np.asarray(ref_dose_gy), np.asarray(eval_dose_gy), spacing_mm, dose_pct, dta_mm,
        cutoff_pct, 1.0, step_mm, global_norm_gy, pass_only=True,
    )
    logger.debug("gamma pass rate %.2f %% over %d voxels", result.pass_rate_pct, result.n_evaluated)
    return result.pass_rate_pct
