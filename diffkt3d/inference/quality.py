"""Quality gate of the imputation targets: a target is *validated* only when the checkpoint records
a benchmark of it that meets the acceptance figures; otherwise it is *experimental*.

Why: a model can be asked for every modality it was trained on, but that does not make every
answer usable. A dose model whose CT, PTV and OAR imputations were benchmarked at Dice 0 must not
hand empty masks to a planner as if they were contours. So the checkpoint carries, per target,
the figures of the benchmark that measured it (``meta["quality"]``, written by
``benchmarks/dose_benchmark.py --record-quality``), and every imputation result carries the
target's status and warnings: the CLI prints them, the server returns them and lists the status in
``/info``, and the Slicer module marks experimental tasks.

The acceptance figures are those a planner would need before relying on the output: OAR
auto-contouring on par with published head-and-neck results, a CT that is better than a
label-mean guess, a PTV that overlaps the planner's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VALIDATED = "validated"
EXPERIMENTAL = "experimental"

# target -> (rule in words, check on the recorded figures)
ACCEPTANCE: dict[str, str] = {
    "oar": "mean Dice >= 0.75 over the OARs and every OAR >= 0.5",
    "ct": "mean absolute error inside the body <= 150 HU",
    "ptv": "Dice of the highest-prescription PTV >= 0.5",
}
MIN_CASES = 20  # fewer benchmarked cases do not validate a target


def meets_acceptance(target: str, figures: dict[str, Any]) -> bool:
    """Whether the recorded ``figures`` of ``target`` meet :data:`ACCEPTANCE` (False if any is missing)."""
    try:
        if target == "oar":
            per_oar = [float(v) for v in figures["dice"].values()]
            return bool(per_oar) and float(figures["mean_dice"]) >= 0.75 and min(per_oar) >= 0.5
        if target == "ct":
            return float(figures["mae_hu"]) <= 150.0
        if target == "ptv":
            return float(figures["dice_high"]) >= 0.5
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return False


@dataclass
class TargetQuality:
    """What the checkpoint says about one imputation target."""

    target: str
    status: str  # VALIDATED or EXPERIMENTAL
    reason: str
    acceptance: str
    figures: dict[str, Any] = field(default_factory=dict)
    cases: int = 0
    benchmark: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_quality(meta: dict[str, Any], target: str) -> TargetQuality:
    """The gate's verdict on ``target`` from a checkpoint's ``meta`` (its ``quality`` record)."""
    rule = ACCEPTANCE.get(target, "")
    record = (meta.get("quality") or {}).get(target)
    if not isinstance(record, dict):
        return TargetQuality(target, EXPERIMENTAL, "no benchmark of this target is recorded with the model", rule)
    figures = dict(record.get("figures") or {})
    cases = int(record.get("cases") or 0)
    bench = str(record.get("benchmark") or "")
    if cases < MIN_CASES:
        reason = f"benchmarked on {cases} cases; at least {MIN_CASES} are needed"
        return TargetQuality(target, EXPERIMENTAL, reason, rule, figures, cases, bench)
    if not meets_acceptance(target, figures):
        return TargetQuality(target, EXPERIMENTAL, f"benchmark below acceptance ({rule}): {_brief(target, figures)}",
                             rule, figures, cases, bench)
    return TargetQuality(target, VALIDATED, f"benchmark meets acceptance ({rule}): {_brief(target, figures)}",
                         rule, figures, cases, bench)


def quality_record(target: str, figures: dict[str, Any], cases: int, benchmark: str, date: str) -> dict[str, Any]:
    """One ``meta["quality"][target]`` entry, as the benchmark writes it."""
    return {"figures": figures, "cases": int(cases), "benchmark": benchmark, "date": date,
            "passes": meets_acceptance(target, figures)}


def write_quality_records(path: str | Path, records: dict[str, dict[str, Any]], benchmark: str,
                          date: str) -> dict[str, dict[str, Any]]:
    """Merge ``{target: {"figures": ..., "cases": n}}`` into the checkpoint's ``meta["quality"]``.

    The other targets' records are kept; the file is rewritten (``update_meta``), so its digest
    and model version change. Returns the whole quality record as written.
    """
    from diffkt3d.models.checkpoint import read_checkpoint, update_meta

    quality = dict(read_checkpoint(path).get("meta", {}).get("quality") or {})
    for target, rec in records.items():
        quality[target] = quality_record(target, rec["figures"], rec["cases"], benchmark, date)
    update_meta(path, {"quality": quality})
    return quality


def empty_mask_warnings(masks: dict[str, np.ndarray]) -> list[str]:
    """One warning per structure the imputation left empty: an empty contour is never a result."""
    return [f"{name}: the imputed mask is empty" for name, mask in masks.items() if not np.any(mask)]


def _brief(target: str, figures: dict[str, Any]) -> str:
    if target == "oar" and isinstance(figures.get("dice"), dict) and figures["dice"]:
        worst = min(figures["dice"].items(), key=lambda kv: float(kv[1]))
        return f"mean Dice {float(figures.get('mean_dice', float('nan'))):.2f}, lowest {worst[0]} {float(worst[1]):.2f}"
    if target == "ct" and "mae_hu" in figures:
        return f"MAE {float(figures['mae_hu']):.1f} HU"
    if target == "ptv" and "dice_high" in figures:
        return f"PTV Dice {float(figures['dice_high']):.2f}"
    return "figures incomplete"


__all__ = ["ACCEPTANCE", "EXPERIMENTAL", "MIN_CASES", "VALIDATED", "TargetQuality", "empty_mask_warnings",
           "meets_acceptance", "quality_record", "target_quality", "write_quality_records"]
