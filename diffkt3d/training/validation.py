"""Hold-out validation of a trained candidate against the served model, and the promotion rule.

A training run on a clinic's few cases can make the model worse (too few cases, a bad learning
rate, preferences that pull away from the delivered plans), so a candidate is served only when it
is measurably not worse than the model it would replace, on cases it did not train on:

1. Held-out cases: a fixed list of case ids (`case_ids`), or else `holdout_cases` of the cases with
   a reference dose, chosen by a seeded hash of their ids (adding a case moves at most one case
   between the splits); at least one case is always left to train on.
2. The candidate and the served model predict every held-out case with the same seed and sampler
   steps (the same initial noise), and each dose is scored: OpenKBP dose score and DVH score (Gy,
   lower is better), Scorecard total in % of the case's best possible total and, when preference
   weights are given (ScardNFT), the same with those weights (higher is better).
3. Paired rule (`PromotionRule`): promote only when at least `min_cases` cases were validated,
   every figure of the candidate is finite, and the mean over cases of (candidate - served) is
   within each metric's margin: dose score <= +dose_score_margin_gy, DVH score <=
   +dvh_score_margin_gy, Scorecard >= -scorecard_margin_pct, preference-weighted Scorecard >=
   -preference_margin_pct. Otherwise the candidate is kept (not served), with the reasons.

Without a served model the candidate is compared with nothing: it is promoted when the case count
and finiteness conditions hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffkt3d.constants import DEFAULT_TEMPLATE
from diffkt3d.errors import ConfigError, reject_unknown_fields

log = logging.getLogger(__name__)

# Figure -> (better when lower?, PromotionRule margin field).
METRICS: dict[str, tuple[bool, str]] = {
    "dose_score_gy": (True, "dose_score_margin_gy"),
    "dvh_score_gy": (True, "dvh_score_margin_gy"),
    "scorecard_pct": (False, "scorecard_margin_pct"),
    "preference_scorecard_pct": (False, "preference_margin_pct"),
}
PROMOTE, KEEP = "promote", "keep"


@dataclass
class PromotionRule:
    """When a validated candidate replaces the served model (module docstring, step 3).

    Args:
        min_cases: fewest held-out cases a decision may rest on; fewer -> kept.
        dose_score_margin_gy, dvh_score_margin_gy: how much higher (worse) the candidate's mean
            paired dose / DVH score may be.
        scorecard_margin_pct, preference_margin_pct: how much lower (worse) its mean paired
            Scorecard / preference-weighted Scorecard (% of the best possible) may be.
    """

    min_cases: int = 3
    dose_score_margin_gy: float = 0.05
    dvh_score_margin_gy: float = 0.1
    scorecard_margin_pct: float = 0.5
    preference_margin_pct: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.min_cases, int) or self.min_cases < 1:
            raise ConfigError(f"validation rule.min_cases must be an integer >= 1, found {self.min_cases!r}")
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"validation rule.{f.name} must be a finite number >= 0, found {value!r}")


@dataclass
class ValidationConfig:
    """Which cases validate a candidate, how they are predicted, and the promotion rule.

    Args:
        holdout_cases: cases with a dose held out of training when `case_ids` is empty.
        case_ids: a fixed validation set (case ids); they are never trained on.
        seed: the sampler seed both models use.
        steps: sampler steps per prediction.
        template: Scorecard template of the Scorecard figures.
        rule: the promotion rule.
    """

    holdout_cases: int = 4
    case_ids: list[str] = field(default_factory=list)
    seed: int = 0
    steps: int = 10
    template: str = DEFAULT_TEMPLATE
    rule: PromotionRule = field(default_factory=PromotionRule)

    def __post_init__(self) -> None:
        if isinstance(self.rule, Mapping):
            reject_unknown_fields(self.rule, PromotionRule, "validation rule")
            self.rule = PromotionRule(**dict(self.rule))
        if not isinstance(self.holdout_cases, int) or self.holdout_cases < 0:
            raise ConfigError(f"validation holdout_cases must be an integer >= 0, found {self.holdout_cases!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 100:
            raise ConfigError(f"validation steps must be an integer from 1 to 100, found {self.steps!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ValidationConfig:
        reject_unknown_fields(d, cls, "validation config")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_validation_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ValidationConfig:
    """The validation YAML at `path` (e.g. configs/validation.yaml) with dotted overrides (`rule.min_cases`)."""
    from diffkt3d.training.recipe import apply_overrides, read_recipe

    merged = apply_overrides(read_recipe(path), overrides, ValidationConfig, str(path))
    try:
        return ValidationConfig.from_dict(merged)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{Path(path).name}: {exc}") from None


def split_cases(case_ids: Sequence[str], cfg: ValidationConfig) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of the cases with a reference dose (module docstring, step 1).

    Raises:
        ConfigError: a fixed validation case is not among `case_ids`, or nothing is left to train on.
    """
    ids = sorted(set(case_ids))
    if cfg.case_ids:
        unknown = sorted(set(cfg.case_ids) - set(ids))
        if unknown:
            raise ConfigError(f"validation case_ids {unknown} are not cases with a reference dose; cases: {ids}")
        held = sorted(set(cfg.case_ids))
    else:
        n = min(cfg.holdout_cases, max(len(ids) - 1, 0))
        held = sorted(sorted(ids, key=lambda c: hashlib.sha256(f"{cfg.seed}:{c}".encode()).hexdigest())[:n])
    train = [c for c in ids if c not in held]
    if not train:
        raise ConfigError(f"no case left to train on: all {len(ids)} case(s) with a dose are validation cases")
    return train, held


def score_model(model_path: str | Path, cases: Sequence[Any], cfg: ValidationConfig,
                item_weights: Mapping[str, float] | None = None, device: str | None = None) -> list[dict[str, Any]]:
    """Per-case figures (METRICS) of one checkpoint on `cases` (core Case objects with dose and body)."""
    from diffkt3d.inference import Predictor
    from diffkt3d.metrics import openkbp
    from diffkt3d.scorecard import load_template, score_case

    predictor = Predictor.load(model_path, device=device)
    template = load_template(cfg.template)
    weighted = template.with_weights(dict(item_weights)) if item_weights else None
    rows = []
    for case in cases:
        dose = predictor.predict_dose(case, steps=cfg.steps, candidates=1, seed=cfg.seed, template=None,
                                      with_dvh=False).candidates[0].dose_gy
        row: dict[str, Any] = {"case_id": case.case_id}
        if not np.isfinite(dose).all():
            row.update({k: None for k in METRICS})
        else:
            okbp = openkbp.score_case_object(case, dose)
            row["dose_score_gy"], row["dvh_score_gy"] = okbp.dose_score, okbp.dvh_score
            row["scorecard_pct"] = 100.0 * score_case(dose, case, template).fraction
            row["preference_scorecard_pct"] = (100.0 * score_case(dose, case, weighted).fraction
                                               if weighted is not None else None)
        rows.append(row)
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite and len(finite) == len(values) else None


def decide(candidate: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]] | None,
           rule: PromotionRule, weighted: bool = False) -> dict[str, Any]:
    """The paired rule on per-case figures -> {"decision", "reasons", "means", "paired_mean_difference", ...}.

    Args:
        candidate, reference: per-case rows of :func:`score_model` in the same case order
            (reference None: nothing is served).
        weighted: the preference-weighted Scorecard is part of the rule.
    """
    metrics = [m for m in METRICS if weighted or m != "preference_scorecard_pct"]
    n = len(candidate)
    reasons = []
    if n < rule.min_cases:
        reasons.append(f"only {n} validation case(s); the rule needs at least min_cases = {rule.min_cases}")
    cand_means = {m: _mean([r.get(m) for r in candidate]) for m in metrics}
    bad = [m for m in metrics if cand_means[m] is None and n]
    if bad:
        reasons.append(f"candidate figures not finite for {bad}")
    out: dict[str, Any] = {"n_cases": n, "metrics": metrics, "candidate_means": cand_means,
                           "reference_means": None, "paired_mean_difference": None}
    if reference is not None and n:
        if [r["case_id"] for r in reference] != [r["case_id"] for r in candidate]:
            raise ValueError("candidate and reference figures are not for the same cases in the same order")
        out["reference_means"] = {m: _mean([r.get(m) for r in reference]) for m in metrics}
        diffs: dict[str, float | None] = {}
        for m in metrics:
            pairs = [(c.get(m), r.get(m)) for c, r in zip(candidate, reference, strict=True)]
            d = [c - r for c, r in pairs if c is not None and r is not None]
            diffs[m] = float(np.mean(d)) if len(d) == n else None
            lower_better, margin_name = METRICS[m]
            margin = getattr(rule, margin_name)
            if diffs[m] is None:
                if m not in bad:
                    reasons.append(f"{m}: no paired figures for every case")
            elif lower_better and diffs[m] > margin:
                reasons.append(f"{m}: candidate worse by {diffs[m]:.3f} on average (allowed {margin})")
            elif not lower_better and diffs[m] < -margin:
                reasons.append(f"{m}: candidate worse by {-diffs[m]:.3f} on average (allowed {margin})")
        out["paired_mean_difference"] = diffs
    out["decision"] = KEEP if reasons else PROMOTE
    out["reasons"] = reasons
    return out


def validate_candidate(candidate: str | Path, reference: str | Path | None, case_dirs: Sequence[str | Path],
                       cfg: ValidationConfig, item_weights: Mapping[str, float] | None = None,
                       device: str | None = None) -> dict[str, Any]:
    """Score `candidate` and `reference` (the served model, or None) on the held-out case folders and decide.

    Returns:
        JSON-ready report: the cases, the settings, per-case figures of both models, the means,
        the paired mean differences, the rule, the decision and its reasons.
    """
    from diffkt3d.io.case_folder import load_case_folder

    cases = [load_case_folder(Path(d)) for d in case_dirs]
    cand_rows = score_model(candidate, cases, cfg, item_weights, device)
    ref_rows = score_model(reference, cases, cfg, item_weights, device) if reference is not None else None
    verdict = decide(cand_rows, ref_rows, cfg.rule, weighted=bool(item_weights))
    log.info("validation on %d case(s): %s %s", len(cases), verdict["decision"], "; ".join(verdict["reasons"]))
    return {"cases": [c.case_id for c in cases], "seed": cfg.seed, "steps": cfg.steps, "template": cfg.template,
            "rule": dataclasses.asdict(cfg.rule), "item_weights": dict(item_weights) if item_weights else None,
            "candidate": cand_rows, "reference": ref_rows, **verdict}


__all__ = ["KEEP", "METRICS", "PROMOTE", "PromotionRule", "ValidationConfig", "decide", "load_validation_config",
           "score_model", "split_cases", "validate_candidate"]
