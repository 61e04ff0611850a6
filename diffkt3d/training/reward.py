"""ScardNFT reward: Scorecard points, hinge penalties of hard constraints, MAE anchor to the plan.

Raw reward of one candidate dose y of case C (DiffKT3D paper and supplement B.5; docs/method.md):

    R(y) = w_score · 100 · Σ_s w_s·score_s(φ_s(y; C)) / Σ_s w_s·max_s     (Scorecard, % of max)
         − w_hinge · Σ_h penalty_h(y; C)                                  (hard constraints)
         − w_mae   · MAE(y, y_ref)                                        (anchor, Gy)

* ``w_s`` are the template's item weights, or institution-specific ones learned from clinician
  preferences (:mod:`diffkt3d.preferences.learner`); ``score_s`` and ``penalty_h`` come from the
  Scorecard engine (:func:`diffkt3d.scorecard.score_case`), nothing is recomputed here.
* The Scorecard term is expressed in % of the case's best possible total so that one unit means
  the same for cases with different structure sets; the *group* normalisation (candidates of one
  case: A = (R − mean) / (std + 1e-4)) is done by :func:`group_advantages`, as in DiffusionNFT.
* The hinge penalties are the template's (e.g. 1 point per % Rx that the high-dose PTV D95 falls
  below 95 %): a candidate cannot buy coverage loss with OAR points.
* The MAE anchor is the OpenKBP dose score of the candidate against the reference dose (Gy,
  Σ|ref − pred| / Σ possible-dose mask): it stops the policy from drifting away from
  clinically delivered plans while it chases Scorecard points (reward hacking).

Every term and its weight are returned in :class:`RewardTerms` so the trainer can log them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from torch import Tensor

from diffkt3d.constants import DEFAULT_TEMPLATE
from diffkt3d.data.case import Case
from diffkt3d.errors import ConfigError
from diffkt3d.metrics.openkbp import openkbp_dose_score
from diffkt3d.scorecard import ScorecardTemplate, load_template, score_case

__all__ = ["RewardConfig", "RewardTerms", "candidate_reward", "group_advantages", "advantages_to_r"]


@dataclass
class RewardConfig:
    """Weights of the reward terms (all configurable, all logged).

    Args:
        template: Scorecard template name or path (default the shipped ``openkbp_hn``).
        item_weights: item id -> weight overriding the template's (e.g. learned from preferences);
            None keeps the template's weights.
        w_score: weight of the Scorecard term (per % of the best possible total). Default 1.
        w_hinge: weight of the sum of hard-constraint hinge penalties (per penalty point). Default 1.
        w_mae: weight of the MAE anchor (per Gy of OpenKBP dose score). Default 1.
    """

    template: str = DEFAULT_TEMPLATE
    item_weights: dict[str, float] | None = None
    w_score: float = 1.0
    w_hinge: float = 1.0
    w_mae: float = 1.0

    def __post_init__(self) -> None:
        for name in ("w_score", "w_hinge", "w_mae"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"reward.{name} must be a finite number >= 0, found {value!r}")

    def load_template(self) -> ScorecardTemplate:
        """The template with ``item_weights`` applied (ConfigError on unknown ids / bad weights)."""
        tpl = load_template(self.template)
        return tpl.with_weights(self.item_weights) if self.item_weights else tpl


@dataclass
class RewardTerms:
    """One candidate's reward and its parts (for logging and tests).

    Attributes:
        scorecard_pct: 100 · weighted total / weighted max total (%).
        scorecard_total: weighted Scorecard total (points, with the reward's weights).
        penalty: sum of hinge penalties (penalty points, >= 0).
        mae_gy: OpenKBP dose score vs the reference (Gy); NaN when the case has no reference.
        reward: R = w_score·scorecard_pct − w_hinge·penalty − w_mae·mae_gy.
        item_scores: "<item id>/<structure>" -> unweighted item score (for preference learning).
    """

    scorecard_pct: float
    scorecard_total: float
    penalty: float
    mae_gy: float
    reward: float
    item_scores: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_reward(dose_gy: np.ndarray, case: Case, cfg: RewardConfig,
                     template: ScorecardTemplate | None = None) -> RewardTerms:
    """Reward of one candidate dose (I, J, K) in Gy on the case grid.

    Args:
        template: the already weighted template (``cfg.load_template()``), to avoid reloading it
            for every candidate; loaded from ``cfg`` when None.

    Raises:
        CaseError: from the Scorecard engine (wrong grid, NaN dose, required structure missing).
        ValueError: ``w_mae > 0`` but the case has no reference dose or possible-dose mask.
    """
    tpl = template if template is not None else cfg.load_template()
    sc = score_case(dose_gy, case, tpl)
    pct = 100.0 * sc.fraction
    if case.dose_gy is not None and case.body is not None:
        mae = openkbp_dose_score(case.dose_gy, dose_gy, case.body, case.case_id)
    elif cfg.w_mae > 0:
        raise ValueError(f"case {case.case_id}: the MAE anchor (reward.w_mae = {cfg.w_mae}) needs a "
                         "reference dose and a possible-dose mask; the case has none")
    else:
        mae = float("nan")
    reward = cfg.w_score * pct - cfg.w_hinge * sc.penalty_total - (cfg.w_mae * mae if cfg.w_mae > 0 else 0.0)
    return RewardTerms(scorecard_pct=pct, scorecard_total=sc.total, penalty=sc.penalty_total, mae_gy=mae,
                       reward=float(reward), item_scores=sc.item_scores())


def group_advantages(rewards: Tensor, clip: float = 5.0, eps: float = 1e-4) -> Tensor:
    """DiffusionNFT group normalisation: A = (R − mean_group) / (std_group + eps), clipped to ±clip.

    ``rewards`` (G,) are the raw rewards of the G candidates of one case (one group). The std is
    the population std (``unbiased=False``), as in DiffusionNFT's per-prompt statistics.
    """
    r = rewards.double()
    adv = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return adv.clamp(-clip, clip).to(rewards.dtype)


def advantages_to_r(advantages: Tensor, scale: float = 10.0) -> Tensor:
    """Optimality probability r = clip(A / scale + 0.5, 0, 1) (DiffusionNFT, scale 10 with A in ±5)."""
    return (advantages / scale + 0.5).clamp(0.0, 1.0)


def item_weights_from_mapping(weights: Mapping[str, float] | None) -> dict[str, float] | None:
    """Plain-float copy of a weight mapping (YAML may give ints), None stays None."""
    return None if weights is None else {str(k): float(v) for k, v in weights.items()}

