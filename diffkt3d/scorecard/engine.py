"""Score a dose against a Scorecard template: per-item, per-structure and total results.

For every template item and every structure its selector matches, the engine evaluates the
item's DVH metric with :func:`diffkt3d.metrics.dvh.evaluate_metric` (no DVH maths here), turns
the value into a score by piecewise-linear interpolation of the item's points (clamped outside
them), multiplies by the item weight, and checks the optional hard constraint (hinge penalty).

Totals: ``total`` is the sum of weighted scores and ``max_total`` the sum of weighted maximum
scores over the items that were scored in this case (skipped items count in neither, so the
fraction ``total / max_total`` is comparable across cases with different structure sets).
Hard-constraint penalties are reported separately (``penalty_total``); they are *not* subtracted
from ``total`` so that ``total`` stays the clinical Scorecard a planner reads, while the RL reward
(ScardNFT) combines ``total`` and ``penalty_total`` with its own configurable weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffkt3d.constants import DEFAULT_TEMPLATE
from diffkt3d.data.case import Case, Structure
from diffkt3d.errors import CaseError
from diffkt3d.metrics.dvh import evaluate_metric
from diffkt3d.scorecard.template import ScorecardItem, ScorecardTemplate, load_template

log = logging.getLogger(__name__)

# Version of the JSON form written by ScorecardResult.to_dict (docs/scorecard.md).
RESULT_SCHEMA = "diffkt3d.scorecard.result/1"


def piecewise_linear_score(value: float, points: Sequence[tuple[float, float]]) -> float:
    """Score of ``value`` on the polyline through ``points`` ((value, score), x increasing).

    Linear between neighbouring points; below the first / above the last point the end score
    is kept (clamped), so a dose better than the best point never scores more than full marks.
    """
    xs = np.asarray([p[0] for p in points], dtype=np.float64)
    ys = np.asarray([p[1] for p in points], dtype=np.float64)
    return float(np.interp(float(value), xs, ys))


@dataclass
class ItemResult:
    """The result of one template item on one structure.

    Args:
        item_id: template item id.
        structure: the scored structure's name.
        metric: metric spec (e.g. "D95%_%Rx").
        value: metric value in ``unit``.
        unit: "Gy", "%", "cc" or "%Rx".
        score: piecewise-linear score (before weighting).
        max_score: the item's best possible score.
        weight: item weight.
        weighted_score: weight x score.
        weighted_max_score: weight x max_score.
        hard_passed: None without a hard constraint, else whether it holds.
        hard_bound: text of the bound (">= 95"), "" without one.
        penalty: hinge penalty (>= 0; 0 when the bound holds or there is none).
        prescription_gy: prescription used for %Rx metrics, else None.
        label, source: from the template.
    """

    item_id: str
    structure: str
    metric: str
    value: float
    unit: str
    score: float
    max_score: float
    weight: float
    weighted_score: float
    weighted_max_score: float
    hard_passed: bool | None = None
    hard_bound: str = ""
    penalty: float = 0.0
    prescription_gy: float | None = None
    label: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "structure": self.structure,
            "metric": self.metric,
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "score": self.score,
            "max_score": self.max_score,
            "weight": self.weight,
            "weighted_score": self.weighted_score,
            "weighted_max_score": self.weighted_max_score,
            "hard": None if self.hard_passed is None else {
                "bound": self.hard_bound, "passed": self.hard_passed, "penalty": self.penalty},
            "prescription_gy": self.prescription_gy,
            "source": self.source,
        }


@dataclass
class SkippedItem:
    """A template item that could not be scored in this case, and why."""

    item_id: str
    selector: str
    metric: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.item_id, "structure": self.selector, "metric": self.metric,
                "reason": self.reason}


@dataclass
class StructureSummary:
    """Sums over the items scored on one structure."""

    structure: str
    weighted_score: float = 0.0
    weighted_max_score: float = 0.0
    penalty: float = 0.0
    n_items: int = 0
    hard_failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.weighted_score, "max_score": self.weighted_max_score,
                "penalty": self.penalty, "items": self.n_items, "hard_failed": self.hard_failed}


@dataclass
class ScorecardResult:
    """Scorecard of one dose on one case (JSON form: :meth:`to_dict`, docs/scorecard.md)."""

    case_id: str
    template_name: str
    template_version: str
    items: list[ItemResult] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Sum of weighted scores (penalties not subtracted)."""
        return float(sum(r.weighted_score for r in self.items))

    @property
    def max_total(self) -> float:
        """Best possible total over the items scored in this case."""
        return float(sum(r.weighted_max_score for r in self.items))

    @property
    def fraction(self) -> float:
        """total / max_total (0 when nothing was scored)."""
        return self.total / self.max_total if self.max_total > 0 else 0.0

    @property
    def penalty_total(self) -> float:
        """Sum of hinge penalties of violated hard constraints (>= 0)."""
        return float(sum(r.penalty for r in self.items))

    @property
    def hard_failures(self) -> list[ItemResult]:
        return [r for r in self.items if r.hard_passed is False]

    @property
    def per_structure(self) -> dict[str, StructureSummary]:
        """Structure name -> sums of its items, in the order structures were first scored."""
        out: dict[str, StructureSummary] = {}
        for r in self.items:
            s = out.setdefault(r.structure, StructureSummary(r.structure))
            s.weighted_score += r.weighted_score
            s.weighted_max_score += r.weighted_max_score
            s.penalty += r.penalty
            s.n_items += 1
            s.hard_failed += int(r.hard_passed is False)
        return out

    def item_scores(self) -> dict[str, float]:
        """"<item id>/<structure>" -> unweighted score, e.g. for preference learning."""
        return {f"{r.item_id}/{r.structure}": r.score for r in self.items}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (schema in docs/scorecard.md)."""
        return {
            "schema": RESULT_SCHEMA,
            "case_id": self.case_id,
            "template": {"name": self.template_name, "version": self.template_version},
            "total": self.total,
            "max_total": self.max_total,
            "fraction": self.fraction,
            "penalty_total": self.penalty_total,
            "hard_constraints": {
                "checked": sum(r.hard_passed is not None for r in self.items),
                "failed": [f"{r.item_id}/{r.structure}" for r in self.hard_failures],
            },
            "structures": {name: s.to_dict() for name, s in self.per_structure.items()},
            "items": [r.to_dict() for r in self.items],
            "skipped": [s.to_dict() for s in self.skipped],
        }

    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def table(self) -> str:
        """Plain-text table for logs and the command line."""
        lines = [f"Scorecard {self.template_name} v{self.template_version}, case {self.case_id}",
                 f"{'item':<22} {'structure':<14} {'metric':<12} {'value':>9} {'unit':<4} "
                 f"{'score':>6} {'w':>4} {'w.score':>8} hard"]
        for r in self.items:
            hard = "" if r.hard_passed is None else ("ok" if r.hard_passed else f"FAIL -{r.penalty:.2f}")
            lines.append(f"{r.item_id:<22} {r.structure:<14} {r.metric:<12} {r.value:>9.2f} {r.unit:<4} "
                         f"{r.score:>6.2f} {r.weight:>4g} {r.weighted_score:>8.2f} {hard}")
        for s in self.skipped:
            lines.append(f"{s.item_id:<22} skipped: {s.reason}")
        lines.append(f"total {self.total:.2f} / {self.max_total:.2f} ({100 * self.fraction:.1f} %), "
                     f"hard-constraint penalty {self.penalty_total:.2f}")
        return "\n".join(lines)


def _prescription(item: ScorecardItem, structure: Structure, case: Case) -> float | None:
    rule = item.rx
    if isinstance(rule, float):
        return rule
    if rule is None:
        rule = "structure" if structure.role == "target" else "case_max"
    if rule == "structure":
        return structure.prescription_gy
    return case.max_prescription_gy()


def score_case(
    dose_gy: np.ndarray,
    case: Case,
    template: ScorecardTemplate | str | Path = DEFAULT_TEMPLATE,
    *,
    structures: Iterable[str] | None = None,
    weights: Mapping[str, float] | None = None,
) -> ScorecardResult:
    """Score a dose distribution on a case with a Scorecard template.

    Args:
        dose_gy: (I, J, K) dose in Gy on the case grid (a prediction or ``case.dose_gy``).
        case: the case (structures, roles, prescriptions, grid).
        template: a loaded template, a shipped template name or a template file path.
        structures: optional structure names the user asks to score; only items on these
            structures are scored. Every name must exist in the case.
        weights: optional item id -> weight overrides (e.g. learned from preferences).

    Returns:
        The ScorecardResult; items whose selector matches no structure are listed in
        ``skipped`` with the reason.

    Raises:
        CaseError: dose not on the case grid or not finite; a requested structure or a
            ``required`` item's structure missing in the case ("unknown Scorecard structure").
        ConfigError: unknown template, or bad weight overrides.
    """
    tpl = load_template(template)
    if weights:
        tpl = tpl.with_weights(weights)
    dose = np.asarray(dose_gy)
    if tuple(dose.shape) != tuple(case.grid.shape):
        raise CaseError(f"Scorecard: dose has shape {tuple(dose.shape)}, expected the case grid "
                        f"{tuple(case.grid.shape)}", case=case.case_id)
    if dose.dtype.kind not in "fiu":
        raise CaseError(f"Scorecard: dose must be numeric, found dtype {dose.dtype}", case=case.case_id)
    if dose.dtype.kind == "f" and not np.isfinite(dose).all():
        raise CaseError(f"Scorecard: dose contains {int((~np.isfinite(dose)).sum())} NaN/Inf voxels",
                        case=case.case_id)

    wanted: set[str] | None = None
    if structures is not None:
        wanted = set()
        by_lower = {n.lower(): n for n in case.structures}
        for name in structures:
            if name.lower() not in by_lower:
                raise CaseError(f"unknown Scorecard structure {name!r}: not in the case (structures: "
                                f"{', '.join(sorted(case.structures)) or 'none'})", case=case.case_id)
            wanted.add(by_lower[name.lower()])

    voxel_cc = case.grid.voxel_volume_mm3 / 1000.0
    result = ScorecardResult(case_id=case.case_id, template_name=tpl.name, template_version=tpl.version)
    for item in tpl.items:
        matches = item.selector.select(case)
        if not matches:
            if item.required:
                raise CaseError(
                    f"unknown Scorecard structure {item.selector.text!r}: template {tpl.name} item "
                    f"{item.id!r} requires it but the case has none (structures: "
                    f"{', '.join(sorted(case.structures)) or 'none'})", case=case.case_id)
            result.skipped.append(SkippedItem(item.id, item.selector.text, item.metric,
                                              "no matching structure in the case"))
            continue
        if wanted is not None:
            matches = [s for s in matches if s.name in wanted]
            if not matches:
                result.skipped.append(SkippedItem(item.id, item.selector.text, item.metric,
                                                  "structure not requested"))
                continue
        for s in matches:
            rx = _prescription(item, s, case) if item.needs_prescription else None
            if item.needs_prescription and rx is None:
                result.skipped.append(SkippedItem(item.id, s.name, item.metric,
                                                  "metric needs a prescription; none known"))
                continue
            if not s.mask.any():
                result.skipped.append(SkippedItem(item.id, s.name, item.metric, "structure mask is empty"))
                continue
            value = evaluate_metric(item.metric, dose, s.mask, voxel_cc, rx)
            score = piecewise_linear_score(value, item.points)
            passed, penalty = (None, 0.0) if item.hard is None else item.hard.evaluate(value)
            result.items.append(ItemResult(
                item_id=item.id, structure=s.name, metric=item.metric, value=value, unit=item.unit,
                score=score, max_score=item.max_score, weight=item.weight,
                weighted_score=item.weight * score, weighted_max_score=item.weight * item.max_score,
                hard_passed=passed, hard_bound=item.hard.describe() if item.hard else "",
                penalty=penalty, prescription_gy=rx, label=item.label, source=item.source))
    if result.skipped:
        log.debug("case %s: %d Scorecard item(s) skipped: %s", case.case_id, len(result.skipped),
                  "; ".join(f"{s.item_id} ({s.reason})" for s in result.skipped))
    return result


__all__ = [
    "RESULT_SCHEMA",
    "ItemResult",
    "ScorecardResult",
    "SkippedItem",
    "StructureSummary",
    "piecewise_linear_score",
    "score_case",
]
