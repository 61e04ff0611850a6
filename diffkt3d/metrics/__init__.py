"""Dose and image metrics: DVH metrics, OpenKBP / GDP-HMM benchmark scores, gamma, PSNR/SSIM/Dice.

Importing this package does not import torch/MONAI; :mod:`diffkt3d.metrics.image` does (import
``psnr``, ``ssim``, ``dice``, ``masked_mae_hu`` from there).
"""

from diffkt3d.metrics.dvh import (
    METRIC_UNITS,
    cumulative_dvh,
    dose_at_volume_cc,
    dose_at_volume_pct,
    evaluate_metric,
    max_dose,
    mean_dose,
    metric_unit,
    min_dose,
    parse_metric,
    structure_doses,
    volume_at_dose_cc,
    volume_at_dose_pct,
)
from diffkt3d.metrics.gamma import GammaResult, gamma_index, gamma_pass_rate
from diffkt3d.metrics.gdp_hmm import gdp_hmm_cohort_mae, gdp_hmm_mae, gdp_hmm_norm_factor
from diffkt3d.metrics.openkbp import (
    OpenKBPCaseScore,
    OpenKBPCohortScore,
    openkbp_d01cc,
    openkbp_dose_score,
    openkbp_dvh_metrics,
    score_case,
    score_case_object,
    score_cohort,
)

__all__ = [
    "METRIC_UNITS",
    "GammaResult",
    "OpenKBPCaseScore",
    "OpenKBPCohortScore",
    "cumulative_dvh",
    "dose_at_volume_cc",
    "dose_at_volume_pct",
    "evaluate_metric",
    "gamma_index",
    "gamma_pass_rate",
    "gdp_hmm_cohort_mae",
    "gdp_hmm_mae",
    "gdp_hmm_norm_factor",
    "max_dose",
    "mean_dose",
    "metric_unit",
    "min_dose",
    "openkbp_d01cc",
    "openkbp_dose_score",
    "openkbp_dvh_metrics",
    "parse_metric",
    "score_case",
    "score_case_object",
    "score_cohort",
    "structure_doses",
    "volume_at_dose_cc",
    "volume_at_dose_pct",
]
