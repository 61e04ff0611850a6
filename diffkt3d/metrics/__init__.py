"""Dose and image metrics: DVH metrics, OpenKBP / GDP-HMM benchmark scores, gamma, PSNR/SSIM/Dice."""

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
