"""Learn institution-specific Scorecard item weights from clinicians' pairwise choices.

Model (Bradley-Terry on Scorecard item scores): a rater prefers candidate A over B of the same case
with probability

    P(A ≻ B) = σ(Σ_i w_i · (f_i(A) − f_i(B))),    w_i >= 0,

where f_i(y) = Σ_{structures s matched by item i} score_{i,s}(y) is the unweighted Scorecard score
of item i (points, 0-10 per structure), so that Σ_i w_i f_i(y) is exactly the Scorecard total
with weights w. Fitting w is a logistic regression without intercept on the item-score
differences of (chosen − rejected) pairs, with an L2 penalty (λ/2)‖w‖² (few labels: keep weights
small and the fit stable) and the bound w >= 0 (a clinician never *wants* a worse item score).
A record with k candidates gives k − 1 pairs (chosen vs each rejected one).

The fitted w has a scale (how consistently the rater follows the Scorecard); only the ratios are
institution-specific weights, so :func:`learn_item_weights` rescales w to the template's total
weight and floors it at a small positive value (templates need weights > 0). Fit quality is
reported as the log-likelihood and the accuracy on held-out pairs (records split before fitting).

A :class:`SimulatedRater` with known hidden weights checks the learner: after N preferences the
learned weights should rank the items like the hidden ones (Spearman ρ → 1 as N grows).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from diffkt3d.constants import DEFAULT_TEMPLATE
from diffkt3d.preferences.record import CandidateRef, PreferenceRecord
from diffkt3d.scorecard import ScorecardTemplate, load_template

log = logging.getLogger(__name__)

__all__ = ["item_features", "preference_pairs", "fit_bradley_terry", "WeightFit", "learn_item_weights",
           "SimulatedRater", "simulate_records"]


def item_features(item_scores: Mapping[str, float], item_ids: Sequence[str]) -> np.ndarray:
    """(K,) per-item features: sum of the unweighted scores over the structures of each item.

    ``item_scores`` keys are ``"<item id>/<structure>"`` (``ScorecardResult.item_scores()``) or a
    bare ``"<item id>"``; keys of items not in ``item_ids`` are ignored.
    """
    index = {i: k for k, i in enumerate(item_ids)}
    f = np.zeros(len(item_ids), dtype=np.float64)
    for key, score in item_scores.items():
        k = index.get(key.split("/", 1)[0])
        if k is not None:
            f[k] += float(score)
    return f


def preference_pairs(records: Sequence[PreferenceRecord], item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Item-score differences (chosen − rejected) of all usable pairs.

    Returns:
        deltas: (P, K) float64, one row per (chosen, rejected) pair.
        record_index: (P,) index of the record each pair comes from (for record-wise splits).

    Records whose candidates carry no ``scorecard_items`` cannot be learned from without
    re-running the model; they are skipped and counted in the log.
    """
    rows, owner, skipped = [], [], 0
    for r_idx, rec in enumerate(records):
        by_id: dict[str, CandidateRef] = {c.id: c for c in rec.candidates}
        chosen = by_id[rec.chosen_id]
        if not chosen.scorecard_items or any(not by_id[i].scorecard_items for i in rec.rejected_ids):
            skipped += 1
            continue
        f_chosen = item_features(chosen.scorecard_items, item_ids)
        for rid in rec.rejected_ids:
            rows.append(f_chosen - item_features(by_id[rid].scorecard_items, item_ids))
            owner.append(r_idx)
    if skipped:
        log.warning("%d preference record(s) without Scorecard item scores skipped", skipped)
    deltas = np.asarray(rows, dtype=np.float64).reshape(-1, len(item_ids))
    return deltas, np.asarray(owner, dtype=np.int64)


def _nll_and_grad(w: np.ndarray, deltas: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Penalised negative log-likelihood −Σ log σ(Δ·w) + (λ/2)‖w‖² and its gradient."""
    z = deltas @ w
    nll = -float(np.sum(log_expit(z))) + 0.5 * l2 * float(w @ w)
    grad = -deltas.T @ (1.0 - expit(z)) + l2 * w
    return nll, grad


def fit_bradley_terry(deltas: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """Non-negative, L2-penalised Bradley-Terry coefficients (K,) from (P, K) chosen − rejected rows.

    Solved with L-BFGS-B (bounds w >= 0); the objective is convex, so the optimum is unique for
    λ > 0.
    """
    if deltas.ndim != 2 or deltas.shape[0] == 0:
        raise ValueError(f"need at least one preference pair, found deltas of shape {deltas.shape}")
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (an unpenalised fit diverges on separable pairs), found {l2}")
    k = deltas.shape[1]
    res = minimize(_nll_and_grad, np.zeros(k), args=(deltas, l2), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None)] * k)
    if not res.success:
        log.warning("Bradley-Terry fit did not converge: %s", res.message)
    return res.x


def _log_likelihood(w: np.ndarray, deltas: np.ndarray) -> tuple[float, float]:
    """(Σ log P(chosen ≻ rejected), accuracy of sign(Δ·w) > 0; ties count half)."""
    z = deltas @ w
    acc = float(np.mean((z > 0) + 0.5 * (z == 0))) if len(z) else float("nan")
    return float(np.sum(log_expit(z))), acc


@dataclass
class WeightFit:
    """Learned weights and fit quality.

    Attributes:
        weights: item id -> weight, rescaled to the template's total weight, each > 0 (usable as
            ``score_case(..., weights=...)`` / ``RewardConfig.item_weights``).
        coefficients: item id -> raw Bradley-Terry coefficient (1/point), fitted on all pairs.
        n_records, n_pairs: records and pairs used.
        log_likelihood: Σ log P of the training pairs under the full fit (nats).
        train_accuracy: fraction of training pairs whose chosen candidate the fit ranks higher.
        heldout_pairs: pairs of the held-out records (0: no held-out evaluation).
        heldout_log_likelihood, heldout_accuracy: same, for a fit on the other records only.
        unobserved: items whose scores never differed within a pair (weight kept from template).
        l2: penalty used.
    """

    weights: dict[str, float]
    coefficients: dict[str, float]
    n_records: int
    n_pairs: int
    log_likelihood: float
    train_accuracy: float
    heldout_pairs: int = 0
    heldout_log_likelihood: float = float("nan")
    heldout_accuracy: float = float("nan")
    unobserved: list[str] = field(default_factory=list)
    l2: float = 1.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def learn_item_weights(records: Sequence[PreferenceRecord], template: ScorecardTemplate | str = DEFAULT_TEMPLATE,
                       l2: float = 1.0, heldout_fraction: float = 0.2, seed: int = 0,
                       min_weight_fraction: float = 0.01) -> WeightFit:
    """Fit institution-specific item weights of ``template`` from preference records.

    Args:
        records: preference records whose candidates carry ``scorecard_items``.
        template: the Scorecard the weights are for (its item ids define the features and its
            total weight the scale of the result).
        l2: L2 penalty λ on the raw coefficients.
        heldout_fraction: fraction of records held out to report generalisation (0 = none);
            the returned weights always come from a fit on all records.
        seed: seed of the held-out split.
        min_weight_fraction: weights are floored at this fraction of the mean template weight,
            because a template weight must be > 0.

    Raises:
        ValueError: no usable pair.
    """
    tpl = load_template(template) if isinstance(template, str) else template
    item_ids = [it.id for it in tpl.items]
    deltas, owner = preference_pairs(records, item_ids)
    if len(deltas) == 0:
        raise ValueError(f"no usable preference pairs among {len(records)} record(s): the candidates "
                         "need Scorecard item scores ('scorecard_items')")
    coef = fit_bradley_terry(deltas, l2)
    ll, acc = _log_likelihood(coef, deltas)

    fit_kw: dict = {}
    n_rec = len(set(owner.tolist()))
    n_held = int(round(heldout_fraction * n_rec))
    if 0 < n_held < n_rec:
        rng = np.random.default_rng(seed)
        held = set(rng.choice(sorted(set(owner.tolist())), size=n_held, replace=False).tolist())
        mask = np.array([o in held for o in owner])
        coef_tr = fit_bradley_terry(deltas[~mask], l2)
        h_ll, h_acc = _log_likelihood(coef_tr, deltas[mask])
        fit_kw = dict(heldout_pairs=int(mask.sum()), heldout_log_likelihood=h_ll, heldout_accuracy=h_acc)

    template_w = np.array([it.weight for it in tpl.items], dtype=np.float64)
    observed = np.abs(deltas).sum(axis=0) > 0
    weights = template_w.copy()
    if coef[observed].sum() > 0:
        scaled = coef * (template_w[observed].sum() / coef[observed].sum())
        weights[observed] = np.maximum(scaled[observed], min_weight_fraction * template_w.mean())
    else:
        log.warning("all learned coefficients are 0 (preferences contradict every item); keeping template weights")
    result = WeightFit(
        weights={i: float(w) for i, w in zip(item_ids, weights, strict=True)},
        coefficients={i: float(c) for i, c in zip(item_ids, coef, strict=True)},
        n_records=n_rec, n_pairs=len(deltas), log_likelihood=ll, train_accuracy=acc,
        unobserved=[i for i, o in zip(item_ids, observed, strict=True) if not o], l2=l2, **fit_kw)
    log.info("preference weights from %d records / %d pairs: log-lik %.2f (%.3f/pair), train acc %.3f, "
             "held-out acc %s on %d pairs", n_rec, len(deltas), ll, ll / len(deltas), acc,
             f"{result.heldout_accuracy:.3f}" if not math.isnan(result.heldout_accuracy) else "n/a",
             result.heldout_pairs)
    return result


@dataclass
class SimulatedRater:
    """A rater following hidden item weights through the Bradley-Terry model.

    P(A ≻ B) = σ(Σ_i w*_i (f_i(A) − f_i(B)) / temperature); temperature in Scorecard points:
    a weighted difference of ``temperature`` points is preferred with probability σ(1) = 0.73.

    Args:
        hidden_weights: item id -> w*_i > 0.
        temperature: noise of the choices (points); smaller = more consistent rater.
    """

    hidden_weights: dict[str, float]
    temperature: float = 5.0

    def p_prefers(self, items_a: Mapping[str, float], items_b: Mapping[str, float]) -> float:
        ids = list(self.hidden_weights)
        w = np.array([self.hidden_weights[i] for i in ids])
        d = item_features(items_a, ids) - item_features(items_b, ids)
        return float(expit(w @ d / self.temperature))

    def choose(self, candidates: Sequence[CandidateRef], rng: np.random.Generator) -> str:
        """Id of the chosen candidate among two (Bradley-Terry draw)."""
        if len(candidates) != 2:
            raise ValueError(f"the simulated rater compares 2 candidates, found {len(candidates)}")
        a, b = candidates
        return a.id if rng.random() < self.p_prefers(a.scorecard_items, b.scorecard_items) else b.id


def simulate_records(rater: SimulatedRater, template: ScorecardTemplate | str, n: int,
                     seed: int = 0, structures_per_item: Mapping[str, Sequence[str]] | None = None,
                     spread: float = 2.0) -> list[PreferenceRecord]:
    """``n`` simulated preference records (two candidates per case) labelled by ``rater``.

    Each simulated case has base item scores uniform in [0, 10] (one per item and structure);
    its two candidates perturb them with N(0, spread²) points, clipped to [0, 10], like two
    samples of one model from different noises.

    Args:
        structures_per_item: item id -> structure names (default one structure "S" per item).
    """
    tpl = load_template(template) if isinstance(template, str) else template
    rng = np.random.default_rng(seed)
    keys = [f"{it.id}/{s}" for it in tpl.items
            for s in (structures_per_item or {}).get(it.id, ("S",))]
    out = []
    for k in range(n):
        base = rng.uniform(0, 10, len(keys))
        cands = []
        for c in range(2):
            scores = np.clip(base + rng.normal(0, spread, len(keys)), 0, 10)
            cands.append(CandidateRef(id=f"c{c}", seed=2 * k + c, model_version="simulated",
                                      scorecard_items={key: float(v) for key, v in zip(keys, scores, strict=True)}))
        chosen = rater.choose(cands, rng)
        out.append(PreferenceRecord(case_id=f"sim-{k:04d}", candidates=cands, chosen_id=chosen,
                                    rater="simulated", template=tpl.name))
    return out
