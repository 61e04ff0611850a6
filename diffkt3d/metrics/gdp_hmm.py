"""GDP-HMM challenge (AAPM 2025) dose MAE, the metric of the DiffKT3D paper's tables.

Per plan, following the organisers' evaluation script (GDP-HMM_AAPMChallenge repository):

1. Normalise the reference: ``s = Rx / (np.percentile(ref[PTV_High], 3) + 1e-5)``,
   ``ref <- s * ref``, so the reference's D97 of the high-dose PTV equals its prescription
   (``PTV_DICT.json`` -> ``PTV_High.PDose``; the mask is ``PTVHighOPT`` for head-and-neck and
   ``PTV`` for lung in the challenge data).
2. ``MAE = sum(|ref - pred| over ((ref > 5) | (pred > 5)) & body) / count((ref > 5) & body)``.
   Note the asymmetric denominator: voxels where only the prediction exceeds 5 Gy add error
   but not count, so spraying dose outside the 5 Gy region is penalised.
3. Leaderboard MAE = mean over plans.

Is the prediction scaled too? The organisers' script scales ONLY the reference and loads the
prediction as-is; their notebook tells participants to normalise their predictions the same way
beforehand. A model trained on normalised references (as the challenge models, and ours on that
data, are) predicts in the normalised convention already, so the default here is
``scale_prediction=False`` = the official number. ``scale_prediction=True`` multiplies the
prediction by the same factor ``s`` (computed from the reference), which is what you want when
the prediction is in the same un-normalised Gy as the stored reference; it is never scaled by
its own D97 (that would hide a global dose-level error).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["GDP_HMM_THRESHOLD_GY", "gdp_hmm_cohort_mae", "gdp_hmm_mae", "gdp_hmm_norm_factor"]

# Isodose threshold of the MAE region (Gy).
GDP_HMM_THRESHOLD_GY: float = 5.0


def gdp_hmm_norm_factor(
    ref_dose_gy: np.ndarray, ptv_high_mask: np.ndarray, prescription_gy: float, case_id: str = ""
) -> float:
    """Factor ``s`` that makes the reference's D97 of PTV_High equal ``prescription_gy``.

    ``s = prescription_gy / (np.percentile(ref[ptv_high > 0], 3) + 1e-5)`` (the 1e-5 Gy is the
    organisers' guard against a zero dose).

    Raises:
        ValueError: shapes differ, empty PTV mask, non-positive prescription.
    """
    where = f"case {case_id or '?'}"
    if np.shape(ref_dose_gy) != np.shape(ptv_high_mask):
        raise ValueError(
            f"{where}: PTV_High mask shape {np.shape(ptv_high_mask)} != dose shape {np.shape(ref_dose_gy)}"
        )
    if not (np.isfinite(prescription_gy) and prescription_gy > 0):
        raise ValueError(f"{where}: prescription_gy must be > 0, got {prescription_gy}")
    ptv_dose = np.asarray(ref_dose_gy)[np.asarray(ptv_high_mask) > 0].astype(np.float64)
    if ptv_dose.size == 0:
        raise ValueError(f"{where}: PTV_High mask is empty (0 voxels); cannot normalise the dose")
    return float(prescription_gy / (np.percentile(ptv_dose, 3) + 1e-5))


def gdp_hmm_mae(
    ref_dose_gy: np.ndarray,
    pred_dose_gy: np.ndarray,
    body_mask: np.ndarray,
    ptv_high_mask: np.ndarray,
    prescription_gy: float,
    *,
    scale_prediction: bool = False,
    normalise_reference: bool = True,
    threshold_gy: float = GDP_HMM_THRESHOLD_GY,
    case_id: str = "",
) -> float:
    """GDP-HMM challenge MAE (Gy) of one plan (see the module docstring).

    Args:
        ref_dose_gy, pred_dose_gy: dose grids (Gy), same shape (Z, Y, X).
        body_mask: body mask (``Body`` in the challenge npz), non-zero inside.
        ptv_high_mask: high-dose PTV mask used for the D97 normalisation.
        prescription_gy: prescription of PTV_High (Gy).
        scale_prediction: also multiply the prediction by the reference's factor (default False,
            the official behaviour).
        normalise_reference: False skips step 1 (for references that are already normalised).
        threshold_gy: isodose threshold of the region (official 5 Gy).
        case_id: for error messages.

    Raises:
        ValueError: shapes differ, empty PTV/body region, no reference voxel above the threshold.
    """
    where = f"case {case_id or '?'}"
    shapes = {"ref": np.shape(ref_dose_gy), "pred": np.shape(pred_dose_gy),
              "body": np.shape(body_mask), "ptv_high": np.shape(ptv_high_mask)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{where}: grid shapes differ: {shapes}")
    ref = np.asarray(ref_dose_gy, dtype=np.float64)
    pred = np.asarray(pred_dose_gy, dtype=np.float64)
    if normalise_reference:
        s = gdp_hmm_norm_factor(ref, ptv_high_mask, prescription_gy, case_id)
        ref = ref * s
        if scale_prediction:
            pred = pred * s
    body = np.asarray(body_mask) > 0
    region = ((ref > threshold_gy) | (pred > threshold_gy)) & body
    n_ref = int(np.count_nonzero((ref > threshold_gy) & body))
    if n_ref == 0:
        raise ValueError(f"{where}: no body voxel has a reference dose > {threshold_gy} Gy")
    total = float(np.abs(ref - pred)[region].sum())
    if not np.isfinite(total):
        raise ValueError(f"{where}: reference or predicted dose has NaN/inf values in the body")
    return total / n_ref


def gdp_hmm_cohort_mae(per_plan_mae: Iterable[float]) -> float:
    """Leaderboard MAE: the plain mean of the per-plan values."""
    values = list(per_plan_mae)
    if not values:
        raise ValueError("no plans to average")
    return float(np.mean(values))
