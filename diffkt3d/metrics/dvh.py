"""Dose-volume histogram (DVH) metrics of one structure, in Gy, % of volume or cc.

Every function takes a dose grid in Gy and a same-shaped structure mask (bool, or any numbers
where non-zero means inside) and looks only at the voxels inside the mask. Volumes are counted
in voxels, so a voxel is either fully in or out (no partial-volume weighting), which is what
the OpenKBP and GDP-HMM benchmarks do as well.

Conventions (the clinical ones, e.g. ICRU 83):

* ``D_x%``: the minimum dose received by the hottest x % of the structure, computed as
  ``np.percentile(d, 100 - x)`` with numpy's default linear interpolation.
* ``D_xcc``: the minimum dose of the hottest ``n = max(1, round(x / voxel_cc))`` voxels
  (an order statistic, no interpolation) when x is at least one voxel. When x is smaller than one
  voxel (D0.1cc on voxels over 0.1 cc, e.g. a 5 x 5 x 5 mm grid) a whole voxel would make it the
  point maximum, so each voxel of the structure is split into ``f^3`` sub-voxels (``f`` the
  smallest integer giving at least 8 sub-voxels per x cc, at most 8), the dose at each sub-voxel
  centre is interpolated trilinearly from the voxel-centred grid (edge values continue past the
  grid), and the order statistic is taken over sub-voxels. On a dose that varies linearly across
  the hottest voxel the result is within half a sub-voxel's dose step of the exact D_xcc. The OpenKBP benchmark uses a slightly different
  D0.1cc (a percentile, see :mod:`diffkt3d.metrics.openkbp`); use that module to reproduce the
  benchmark.
* ``V_xGy``: the share of the structure receiving at least x Gy (``d >= x``).

:func:`evaluate_metric` parses the metric names used by Scorecard templates and the server; the
grammar is documented there.
"""

from __future__ import annotations

import logging
import re

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_UNITS",
    "cumulative_dvh",
    "dose_at_volume_cc",
    "dose_at_volume_pct",
    "evaluate_metric",
    "max_dose",
    "mean_dose",
    "metric_unit",
    "min_dose",
    "parse_metric",
    "structure_doses",
    "volume_at_dose_cc",
    "volume_at_dose_pct",
]

# Unit of each metric kind returned by :func:`parse_metric` (see :func:`metric_unit`).
# "%" is a share of the structure volume; "%Rx" is a dose expressed as % of the prescription.
METRIC_UNITS: dict[str, str] = {
    "Dmean": "Gy",
    "Dmax": "Gy",
    "Dmin": "Gy",
    "D%": "Gy",
    "Dcc": "Gy",
    "VGy": "%",
    "VGy_cc": "cc",
    "V%Rx": "%",
    "V%Rx_cc": "cc",
}


def structure_doses(dose_gy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Doses (Gy) of the voxels inside ``mask``, as a 1D float64 array in grid (C) order.

    Args:
        dose_gy: dose grid in Gy, any shape, e.g. (D, H, W).
        mask: structure mask of the same shape; non-zero / True means inside.

    Raises:
        ValueError: shapes differ, the mask is empty (a DVH of nothing has no meaning and
            would otherwise give NaN silently), or a dose inside the mask is not finite.
    """
    dose_gy = np.asarray(dose_gy)
    mask = np.asarray(mask)
    if dose_gy.shape != mask.shape:
        raise ValueError(
            f"dose and mask shapes differ: dose {dose_gy.shape} vs mask {mask.shape}"
        )
    inside = mask.astype(bool, copy=False) if mask.dtype != bool else mask
    d = dose_gy[inside].astype(np.float64, copy=False)
    if d.size == 0:
        raise ValueError("structure mask is empty (0 voxels); cannot compute a DVH metric")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"dose has {int(np.sum(~np.isfinite(d)))} non-finite voxel(s) in the mask")
    return d


def _check_voxel_volume(voxel_volume_cc: float) -> None:
    if not (np.isfinite(voxel_volume_cc) and voxel_volume_cc > 0):
        raise ValueError(f"voxel_volume_cc must be > 0, got {voxel_volume_cc}")


def dose_at_volume_pct(dose_gy: np.ndarray, mask: np.ndarray, volume_pct: float) -> float:
    """D_x%: minimum dose (Gy) received by the hottest ``volume_pct`` % of the structure.

    ``np.percentile(d, 100 - volume_pct)`` (linear interpolation): D0% is the maximum, D100%
    the minimum, D50% the median.

    Raises:
        ValueError: ``volume_pct`` outside [0, 100], or see :func:`structure_doses`.
    """
    if not 0.0 <= volume_pct <= 100.0:
        raise ValueError(f"volume_pct must be in [0, 100], got {volume_pct}")
    d = structure_doses(dose_gy, mask)
    return float(np.percentile(d, 100.0 - volume_pct))


def dose_at_volume_cc(
    dose_gy: np.ndarray, mask: np.ndarray, volume_cc: float, voxel_volume_cc: float
) -> float:
    """D_xcc: minimum dose (Gy) of the hottest ``volume_cc`` cc of the structure.

    Uses ``n = max(1, round(volume_cc / voxel_volume_cc))`` voxels and returns the n-th highest
    dose. If the structure is smaller than ``volume_cc`` the whole structure is used (its
    minimum dose) and a debug message is logged. A volume smaller than one voxel is measured on
    interpolated sub-voxels (module docstring), not answered with the point maximum.

    Args:
        voxel_volume_cc: volume of one voxel in cc (= mm^3 / 1000).
    """
    _check_voxel_volume(voxel_volume_cc)
    if not (np.isfinite(volume_cc) and volume_cc >= 0):
        raise ValueError(f"volume_cc must be >= 0, got {volume_cc}")
    d = structure_doses(dose_gy, mask)
    if 0 < volume_cc < voxel_volume_cc:
        return _dose_at_subvoxel_volume(np.asarray(dose_gy, dtype=np.float64), np.asarray(mask) != 0,
                                        volume_cc, voxel_volume_cc)
    n = max(1, int(round(volume_cc / voxel_volume_cc)))
    if n > d.size:
        logger.debug("D%gcc: structure has only %d voxels (< %d); using all", volume_cc, d.size, n)
        n = d.size
    # n-th largest = element at index size - n of the ascending order.
    return float(np.partition(d, d.size - n)[d.size - n])


SUBVOXELS_PER_VOLUME = 8  # at least this many sub-voxels make up a sub-voxel D_xcc volume
MAX_SUBVOXEL_FACTOR = 8  # at most 8^3 sub-voxels per voxel


def _dose_at_subvoxel_volume(dose: np.ndarray, inside: np.ndarray, volume_cc: float, voxel_cc: float) -> float:
    """D_xcc for x below one voxel: the order statistic over trilinearly interpolated sub-voxels."""
    if dose.ndim != 3:
        raise ValueError(f"a sub-voxel D_xcc needs a 3D dose grid, got shape {dose.shape}")
    factor = min(MAX_SUBVOXEL_FACTOR, int(np.ceil(np.cbrt(SUBVOXELS_PER_VOLUME * voxel_cc / volume_cc) - 1e-9)))
    per_voxel = factor**3
    n = max(1, int(round(volume_cc / (voxel_cc / per_voxel))))
    # A sub-voxel's dose is a convex combination of its voxel's 3x3x3 neighbourhood, so only voxels
    # whose neighbourhood maximum reaches `bound` (a value the n hottest sub-voxels surely reach)
    # can hold one of them: the rest are skipped without interpolating.
    low = ndimage.minimum_filter(dose, size=3, mode="nearest")[inside]
    high = ndimage.maximum_filter(dose, size=3, mode="nearest")[inside]
    k = min(low.size, int(np.ceil(n / per_voxel)))
    bound = np.partition(low, low.size - k)[low.size - k]
    voxels = np.argwhere(inside)[high >= bound].astype(np.float64)
    steps = (np.arange(factor) + 0.5) / factor - 0.5
    offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    points = (voxels[:, None, :] + offsets[None, :, :]).reshape(-1, 3).T
    values = ndimage.map_coordinates(dose, points, order=1, mode="nearest")
    n = min(n, values.size)
    return float(np.partition(values, values.size - n)[values.size - n])


def volume_at_dose_pct(dose_gy: np.ndarray, mask: np.ndarray, threshold_gy: float) -> float:
    """V_xGy: % (0-100) of the structure volume receiving at least ``threshold_gy`` Gy."""
    d = structure_doses(dose_gy, mask)
    return float(100.0 * np.count_nonzero(d >= threshold_gy) / d.size)


def volume_at_dose_cc(
    dose_gy: np.ndarray, mask: np.ndarray, threshold_gy: float, voxel_volume_cc: float
) -> float:
    """V_xGy in cc: volume of the structure receiving at least ``threshold_gy`` Gy."""
    _check_voxel_volume(voxel_volume_cc)
    d = structure_doses(dose_gy, mask)
    return float(np.count_nonzero(d >= threshold_gy) * voxel_volume_cc)


def mean_dose(dose_gy: np.ndarray, mask: np.ndarray) -> float:
    """Mean dose (Gy) over the structure."""
    return float(np.mean(structure_doses(dose_gy, mask)))


def max_dose(dose_gy: np.ndarray, mask: np.ndarray) -> float:
    """Maximum voxel dose (Gy) in the structure (a point max; clinics often prefer D0.03cc)."""
    return float(np.max(structure_doses(dose_gy, mask)))


def min_dose(dose_gy: np.ndarray, mask: np.ndarray) -> float:
    """Minimum voxel dose (Gy) in the structure."""
    return float(np.min(structure_doses(dose_gy, mask)))


def cumulative_dvh(
    dose_gy: np.ndarray,
    mask: np.ndarray,
    bin_width_gy: float = 0.1,
    max_dose_gy: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative DVH: for each dose level, the % of the structure receiving at least it.

    Args:
        bin_width_gy: spacing of the dose levels (Gy).
        max_dose_gy: last dose level; default the structure maximum rounded up to a whole bin,
            so the curve ends at 0 % (pass the same value for several structures to share axes).

    Returns:
        ``(dose_levels_gy, volume_pct)``, both 1D float64 of the same length; levels are
        ``0, w, 2w, ...`` up to ``max_dose_gy`` (inclusive when on the grid); ``volume_pct[0]``
        is 100 when all doses are >= 0.
    """
    if not (np.isfinite(bin_width_gy) and bin_width_gy > 0):
        raise ValueError(f"bin_width_gy must be > 0, got {bin_width_gy}")
    d = np.sort(structure_doses(dose_gy, mask))
    top = float(d[-1]) if max_dose_gy is None else float(max_dose_gy)
    if top < 0:
        raise ValueError(f"max_dose_gy must be >= 0, got {top}")
    n_bins = int(np.floor(top / bin_width_gy + 1e-9)) + 1
    if max_dose_gy is None and (n_bins - 1) * bin_width_gy <= top:
        n_bins += 1  # one level above the max so the curve reaches 0 %
    levels = np.arange(n_bins, dtype=np.float64) * bin_width_gy
    # Count of doses >= level = size - (number of doses < level).
    below = np.searchsorted(d, levels, side="left")
    volume_pct = 100.0 * (d.size - below) / d.size
    return levels, volume_pct


# --------------------------------------------------------------------------------------------
# Metric names ("Dmean", "D95%", "V20Gy" ...)
# --------------------------------------------------------------------------------------------

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Dmean", re.compile(r"Dmean", re.IGNORECASE)),
    ("Dmax", re.compile(r"Dmax", re.IGNORECASE)),
    ("Dmin", re.compile(r"Dmin", re.IGNORECASE)),
    ("D%", re.compile(rf"D{_NUM}%", re.IGNORECASE)),
    ("Dcc", re.compile(rf"D{_NUM}cc", re.IGNORECASE)),
    ("VGy_cc", re.compile(rf"V{_NUM}Gy_cc", re.IGNORECASE)),
    ("VGy", re.compile(rf"V{_NUM}Gy", re.IGNORECASE)),
    ("V%Rx_cc", re.compile(rf"V{_NUM}%Rx_cc", re.IGNORECASE)),
    ("V%Rx", re.compile(rf"V{_NUM}%Rx", re.IGNORECASE)),
)
_RX_SUFFIXES = ("_%Rx", "%Rx")  # on a D metric: express the dose as % of the prescription

_GRAMMAR = (
    "Dmean | Dmax | Dmin | D<x>% | D<x>cc | V<x>Gy | V<x>Gy_cc | V<x>%Rx | V<x>%Rx_cc, "
    "a D metric optionally followed by '_%Rx' (dose as % of prescription)"
)


def parse_metric(spec: str) -> tuple[str, float | None, bool]:
    """Parse a metric name into ``(kind, number, dose_as_pct_rx)``.

    Grammar (case-insensitive, surrounding spaces ignored; ``<x>`` is a plain decimal number):

    ============  ==============================================================  =====
    spec          meaning                                                          unit
    ============  ==============================================================  =====
    Dmean         mean dose                                                        Gy
    Dmax, Dmin    voxel maximum / minimum dose                                     Gy
    D<x>%         D95%: min dose of the hottest x % of the volume                  Gy
    D<x>cc        D0.1cc, D2cc: min dose of the hottest x cc                       Gy
    V<x>Gy        V20Gy: % of the volume receiving >= x Gy                         %
    V<x>Gy_cc     V20Gy_cc: same, in cc                                            cc
    V<x>%Rx       V95%Rx: % of the volume receiving >= x % of the prescription     %
    V<x>%Rx_cc    same, in cc                                                      cc
    <D>_%Rx       any D metric with the dose as % of the prescription              %Rx
    ============  ==============================================================  =====

    ``D95%Rx`` is accepted as a short form of ``D95%_%Rx`` (D95% as % of Rx). The ``Rx`` forms
    need ``prescription_gy`` at evaluation time.

    Returns:
        kind: a key of :data:`METRIC_UNITS`; number: x (None for Dmean/Dmax/Dmin);
        dose_as_pct_rx: True if a D metric is to be expressed as % of the prescription.

    Raises:
        ValueError: unknown spec, naming it and the grammar.
    """
    if not isinstance(spec, str):
        raise ValueError(f"metric spec must be a string, got {type(spec).__name__}: {spec!r}")
    text = spec.strip()
    as_pct_rx = False
    if text[:1].upper() == "D":
        for suffix in _RX_SUFFIXES:
            if text.upper().endswith(suffix.upper()):
                text = text[: -len(suffix)]
                as_pct_rx = True
                break
        if as_pct_rx and re.fullmatch(rf"D{_NUM}", text, re.IGNORECASE):
            text = text + "%"  # "D95%Rx" stripped of "%Rx" leaves "D95": restore the volume %
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            if as_pct_rx and not kind.startswith("D"):
                break
            number = float(match.group(1)) if match.groups() else None
            return kind, number, as_pct_rx
    raise ValueError(f"unknown metric {spec!r}; expected one of: {_GRAMMAR}")


def metric_unit(spec: str) -> str:
    """Unit of the value :func:`evaluate_metric` returns for ``spec``: "Gy", "%", "cc" or "%Rx".

    "%" is a share of the structure volume; "%Rx" a dose as a percentage of the prescription.
    """
    kind, _, as_pct_rx = parse_metric(spec)
    return "%Rx" if as_pct_rx else METRIC_UNITS[kind]


def evaluate_metric(
    spec: str,
    dose_gy: np.ndarray,
    mask: np.ndarray,
    voxel_volume_cc: float,
    prescription_gy: float | None = None,
) -> float:
    """Evaluate a named DVH metric (grammar in :func:`parse_metric`) on one structure.

    Args:
        spec: metric name, e.g. "Dmean", "D95%", "D0.1cc", "V20Gy", "V20Gy_cc", "V95%Rx".
        dose_gy: dose grid (Gy), e.g. (D, H, W).
        mask: structure mask, same shape.
        voxel_volume_cc: volume of one voxel in cc (needed by the cc metrics).
        prescription_gy: prescription dose (Gy); required by the ``Rx`` forms.

    Returns:
        The value in the unit given by :func:`metric_unit`.

    Raises:
        ValueError: unknown spec, missing/invalid prescription, empty mask, shape mismatch.
    """
    kind, x, as_pct_rx = parse_metric(spec)
    needs_rx = as_pct_rx or kind.startswith("V%Rx")
    if needs_rx and (prescription_gy is None or not np.isfinite(prescription_gy)
                     or prescription_gy <= 0):
        raise ValueError(f"metric {spec!r} needs a prescription_gy > 0, got {prescription_gy}")

    if kind == "Dmean":
        value = mean_dose(dose_gy, mask)
    elif kind == "Dmax":
        value = max_dose(dose_gy, mask)
    elif kind == "Dmin":
        value = min_dose(dose_gy, mask)
    elif kind == "D%":
        value = dose_at_volume_pct(dose_gy, mask, x)
    elif kind == "Dcc":
        value = dose_at_volume_cc(dose_gy, mask, x, voxel_volume_cc)
    elif kind == "VGy":
        value = volume_at_dose_pct(dose_gy, mask, x)
    elif kind == "VGy_cc":
        value = volume_at_dose_cc(dose_gy, mask, x, voxel_volume_cc)
    elif kind == "V%Rx":
        value = volume_at_dose_pct(dose_gy, mask, x / 100.0 * prescription_gy)
    elif kind == "V%Rx_cc":
        value = volume_at_dose_cc(dose_gy, mask, x / 100.0 * prescription_gy, voxel_volume_cc)
    else:  # pragma: no cover - _PATTERNS and this switch list the same kinds
        raise AssertionError(kind)
    if as_pct_rx:
        value = 100.0 * value / prescription_gy
    return float(value)
