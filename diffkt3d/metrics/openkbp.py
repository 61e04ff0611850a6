"""OpenKBP benchmark scores (dose score and DVH score), as the official evaluator computes them.

Reference: Babier et al., "OpenKBP: The open-access knowledge-based planning grand challenge and
dataset", Med. Phys. 48:5549 (2021), and its evaluation code (``open-kbp``, MIT licence). The
definitions reproduced here, per patient:

* **Dose score** = ``sum(|ref - pred|)`` over the WHOLE grid / ``sum(possible_dose_mask)``.
  The prediction is not masked: dose predicted outside the possible-dose mask counts as error
  (the official baseline zeroes it before writing; we do not do that for the user).
* **DVH metrics**, per structure present in the case (missing ROIs are skipped, not zero):
  OARs ``D_0.1_cc`` and ``mean``; targets (PTVs) ``D_99``, ``D_95``, ``D_1``, where
  ``D_x = np.percentile(roi_dose, 100 - x)`` and
  ``D_0.1_cc = np.percentile(roi_dose, 100 - n / |roi| * 100)`` with
  ``n = max(1, round(100 / voxel_volume_mm3))`` (100 mm^3 = 0.1 cc).

  That percentile form of D_0.1cc interpolates between voxels and so differs slightly from the
  order statistic of :func:`diffkt3d.metrics.dvh.dose_at_volume_cc`; use this module to
  reproduce leaderboard figures.
* **DVH score** of a cohort = mean of ``|ref_metric - pred_metric|`` over all
  (patient, ROI, metric) triples, i.e. pooled, NOT a mean of per-patient means.
* **Cohort dose score** = mean over patients of the per-patient dose score.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from diffkt3d.constants import OPENKBP_OARS, OPENKBP_PTVS

logger = logging.getLogger(__name__)

__all__ = [
    "OAR_METRICS",
    "TARGET_METRICS",
    "OpenKBPCaseScore",
    "OpenKBPCohortScore",
    "openkbp_d01cc",
    "openkbp_dose_score",
    "openkbp_dvh_metrics",
    "score_case",
    "score_case_object",
    "score_cohort",
]

# Metric names as the official evaluator labels them.
OAR_METRICS: tuple[str, ...] = ("D_0.1_cc", "mean")
TARGET_METRICS: tuple[str, ...] = ("D_99", "D_95", "D_1")


def _check_same_shape(case_id: str, **arrays: np.ndarray) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"case {case_id or '?'}: grid shapes differ: {shapes}")


def openkbp_dose_score(
    ref_dose_gy: np.ndarray, pred_dose_gy: np.ndarray, possible_dose_mask: np.ndarray,
    case_id: str = "",
) -> float:
    """Per-patient OpenKBP dose score (Gy): ``sum|ref - pred|`` over the grid / ``sum(mask)``.

    Args:
        ref_dose_gy, pred_dose_gy: dose grids in Gy, same shape, e.g. (128, 128, 128).
        possible_dose_mask: 0/1 grid of where dose may be non-zero; only its voxel count is used
            (the numerator runs over the whole grid, exactly as the official evaluator does).
        case_id: for error messages.

    Raises:
        ValueError: shapes differ, empty possible-dose mask, non-finite dose.
    """
    _check_same_shape(case_id, ref=ref_dose_gy, pred=pred_dose_gy, mask=possible_dose_mask)
    n_possible = int(np.count_nonzero(possible_dose_mask))
    if n_possible == 0:
        raise ValueError(f"case {case_id or '?'}: possible_dose_mask is empty (0 voxels)")
    diff = np.abs(np.asarray(ref_dose_gy, np.float64) - np.asarray(pred_dose_gy, np.float64))
    total = float(diff.sum())
    if not np.isfinite(total):
        raise ValueError(f"case {case_id or '?'}: reference or predicted dose has NaN/inf values")
    return total / n_possible


def openkbp_d01cc(roi_dose_gy: np.ndarray, voxel_volume_mm3: float) -> float:
    """Official OpenKBP D_0.1cc (Gy) of the voxel doses of one ROI (1D array).

    ``np.percentile(d, 100 - n / len(d) * 100)`` with ``n = max(1, round(100 / voxel_mm3))``.
    If the ROI has fewer than n voxels the percentile goes below 0 and numpy raises; we clip it
    at 0 (the ROI minimum), which only matters for ROIs under 0.1 cc.
    """
    if not (np.isfinite(voxel_volume_mm3) and voxel_volume_mm3 > 0):
        raise ValueError(f"voxel_volume_mm3 must be > 0, got {voxel_volume_mm3}")
    d = np.asarray(roi_dose_gy, dtype=np.float64).ravel()
    n = max(1.0, float(np.round(100.0 / voxel_volume_mm3)))
    q = max(0.0, 100.0 - n / d.size * 100.0)
    return float(np.percentile(d, q))


def openkbp_dvh_metrics(
    dose_gy: np.ndarray,
    structures: Mapping[str, np.ndarray | None],
    voxel_volume_mm3: float,
    oar_names: Sequence[str] = OPENKBP_OARS,
    target_names: Sequence[str] = OPENKBP_PTVS,
) -> dict[tuple[str, str], float]:
    """OpenKBP DVH metrics of one dose for every listed ROI that is present.

    Args:
        dose_gy: dose grid (Gy).
        structures: ROI name -> mask (same shape as the dose). ROIs absent from the mapping,
            ``None`` or with an empty mask are skipped, as the official evaluator skips missing
            ROIs. Names not in ``oar_names`` / ``target_names`` are ignored.
        voxel_volume_mm3: volume of one voxel (mm^3), e.g. ``case.grid.voxel_volume_mm3``.

    Returns:
        ``{(roi, metric): value_gy}`` with metrics from :data:`OAR_METRICS` /
        :data:`TARGET_METRICS`.
    """
    dose_gy = np.asarray(dose_gy)
    out: dict[tuple[str, str], float] = {}
    for roi in list(oar_names) + list(target_names):
        mask = structures.get(roi)
        if mask is None:
            continue
        if np.shape(mask) != dose_gy.shape:
            raise ValueError(f"ROI {roi}: mask shape {np.shape(mask)} != dose shape {dose_gy.shape}")
        roi_dose = dose_gy[np.asarray(mask) > 0].astype(np.float64)
        if roi_dose.size == 0:
            logger.debug("ROI %s has an empty mask; skipped like a missing ROI", roi)
            continue
        if roi in oar_names:
            out[(roi, "D_0.1_cc")] = openkbp_d01cc(roi_dose, voxel_volume_mm3)
            out[(roi, "mean")] = float(roi_dose.mean())
        else:
            out[(roi, "D_99")] = float(np.percentile(roi_dose, 1))
            out[(roi, "D_95")] = float(np.percentile(roi_dose, 5))
            out[(roi, "D_1")] = float(np.percentile(roi_dose, 99))
    return out


@dataclass
class OpenKBPCaseScore:
    """OpenKBP scores of one patient.

    Attributes:
        case_id: patient id (e.g. "pt_201").
        dose_score: per-patient dose score (Gy).
        ref_metrics, pred_metrics: ``{(roi, metric): Gy}`` of the reference / prediction.
        dvh_errors: ``{(roi, metric): |ref - pred|}`` (Gy), one entry per evaluated pair.
    """

    case_id: str
    dose_score: float
    ref_metrics: dict[tuple[str, str], float] = field(default_factory=dict)
    pred_metrics: dict[tuple[str, str], float] = field(default_factory=dict)
    dvh_errors: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def dvh_score(self) -> float:
        """Mean DVH error of this patient (Gy); NaN if no ROI was present."""
        return float(np.mean(list(self.dvh_errors.values()))) if self.dvh_errors else float("nan")


@dataclass
class OpenKBPCohortScore:
    """Cohort OpenKBP scores: dose score = mean over patients; DVH score = pooled mean."""

    dose_score: float
    dvh_score: float
    n_cases: int
    n_dvh_errors: int
    cases: list[OpenKBPCaseScore]


def score_case(
    ref_dose_gy: np.ndarray,
    pred_dose_gy: np.ndarray,
    possible_dose_mask: np.ndarray,
    structures: Mapping[str, np.ndarray | None],
    voxel_volume_mm3: float,
    case_id: str = "",
    oar_names: Sequence[str] = OPENKBP_OARS,
    target_names: Sequence[str] = OPENKBP_PTVS,
) -> OpenKBPCaseScore:
    """Dose score and per-(ROI, metric) DVH errors of one patient (see module docstring).

    The reference and prediction are evaluated on the same ROI masks (the reference case's).
    """
    _check_same_shape(case_id, ref=ref_dose_gy, pred=pred_dose_gy)
    dose_score = openkbp_dose_score(ref_dose_gy, pred_dose_gy, possible_dose_mask, case_id)
    ref_m = openkbp_dvh_metrics(ref_dose_gy, structures, voxel_volume_mm3, oar_names, target_names)
    pred_m = openkbp_dvh_metrics(pred_dose_gy, structures, voxel_volume_mm3, oar_names, target_names)
    errors = {key: abs(ref_m[key] - pred_m[key]) for key in ref_m}
    return OpenKBPCaseScore(case_id, dose_score, ref_m, pred_m, errors)


def score_case_object(ref_case, pred_dose_gy: np.ndarray) -> OpenKBPCaseScore:
    """:func:`score_case` for a reference :class:`diffkt3d.data.case.Case` (with dose and body).

    The case's ``body`` (loaded from ``possible_dose_mask.nii.gz`` for OpenKBP folders) is the
    possible-dose mask; voxel volume comes from the case grid.

    Raises:
        ValueError: the case has no dose or no body mask.
    """
    if ref_case.dose_gy is None:
        raise ValueError(f"case {ref_case.case_id}: reference case has no dose")
    if ref_case.body is None:
        raise ValueError(f"case {ref_case.case_id}: reference case has no possible-dose/body mask")
    structures = {name: s.mask for name, s in ref_case.structures.items()}
    return score_case(
        ref_case.dose_gy, pred_dose_gy, ref_case.body, structures,
        ref_case.grid.voxel_volume_mm3, case_id=ref_case.case_id,
    )


def score_cohort(cases: Iterable[OpenKBPCaseScore]) -> OpenKBPCohortScore:
    """Combine per-patient scores the official way.

    Dose score = mean over patients; DVH score = mean over all (patient, ROI, metric) errors.

    Raises:
        ValueError: no cases.
    """
    cases = list(cases)
    if not cases:
        raise ValueError("no cases to score")
    all_errors = [e for c in cases for e in c.dvh_errors.values()]
    return OpenKBPCohortScore(
        dose_score=float(np.mean([c.dose_score for c in cases])),
        dvh_score=float(np.mean(all_errors)) if all_errors else float("nan"),
        n_cases=len(cases),
        n_dvh_errors=len(all_errors),
        cases=cases,
    )
