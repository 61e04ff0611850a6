"""Preference learner: Bradley-Terry item weights, fit quality, simulated-rater recovery."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from diffkt3d.preferences import CandidateRef, PreferenceRecord
from diffkt3d.preferences.learner import (
    SimulatedRater,
    fit_bradley_terry,
    item_features,
    learn_item_weights,
    preference_pairs,
    simulate_records,
)
from diffkt3d.scorecard import load_template, score_case

TEMPLATE = load_template("openkbp_hn")
IDS = [it.id for it in TEMPLATE.items]


def _hidden(seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {i: float(w) for i, w in zip(IDS, rng.permutation(np.linspace(0.2, 3.0, len(IDS))), strict=True)}


def test_item_features_sum_structures_and_ignore_unknown():
    f = item_features({"parotid_dmean/LeftParotid": 4.0, "parotid_dmean/RightParotid": 2.5, "cord_d01cc": 7.0,
                       "not_an_item/X": 99.0}, IDS)
    assert f[IDS.index("parotid_dmean")] == 6.5
    assert f[IDS.index("cord_d01cc")] == 7.0
    assert f.sum() == 13.5


def test_features_times_weights_equal_scorecard_total(synthetic_case):
    """Σ_i w_i f_i is the engine's total: the model's utility is the Scorecard itself."""
    res = score_case(synthetic_case.dose_gy * 0.97, synthetic_case, TEMPLATE)
    w = np.array([it.weight for it in TEMPLATE.items])
    assert float(w @ item_features(res.item_scores(), IDS)) == pytest.approx(res.total)


def test_fit_matches_independent_projected_gradient_descent():
    rng = np.random.default_rng(1)
    deltas = rng.normal(0, 2, (60, 4))
    true = np.array([1.0, 0.0, 0.5, 2.0])
    y = rng.random(60) < 1 / (1 + np.exp(-deltas @ true))
    deltas[~y] *= -1  # rows are chosen - rejected
    w_fit = fit_bradley_terry(deltas, l2=0.5)
    w = np.zeros(4)
    for _ in range(20000):  # plain projected gradient descent on the same objective
        grad = -deltas.T @ (1 - 1 / (1 + np.exp(-deltas @ w))) + 0.5 * w
        w = np.maximum(w - 1e-3 * grad, 0)
    np.testing.assert_allclose(w_fit, w, atol=2e-3)
    assert (w_fit >= 0).all()


def test_simulated_rater_is_recovered_with_enough_preferences():
    hidden = _hidden(0)
    rater = SimulatedRater(hidden, temperature=5.0)
    records = simulate_records(rater, TEMPLATE, n=400, seed=2)
    fit = learn_item_weights(records, TEMPLATE, l2=1.0, heldout_fraction=0.25, seed=0)
    rho = spearmanr([hidden[i] for i in IDS], [fit.weights[i] for i in IDS]).statistic
    assert rho > 0.85, fit.weights
    assert fit.heldout_accuracy > 0.75
    assert fit.heldout_pairs == 100 and fit.n_pairs == 400
    assert fit.log_likelihood < 0
    # weights are a valid template override: > 0 and on the template's total scale
    assert all(w > 0 for w in fit.weights.values())
    assert sum(fit.weights.values()) == pytest.approx(sum(it.weight for it in TEMPLATE.items))
    TEMPLATE.with_weights(fit.weights)


def test_few_preferences_recover_less_than_many():
    hidden = _hidden(4)
    rhos = {}
    for n in (10, 300):
        vals = []
        for rep in range(5):
            recs = simulate_records(SimulatedRater(hidden), TEMPLATE, n=n, seed=100 * rep + n)
            fit = learn_item_weights(recs, TEMPLATE, heldout_fraction=0.0)
            vals.append(spearmanr([hidden[i] for i in IDS], [fit.weights[i] for i in IDS]).statistic)
        rhos[n] = float(np.mean(vals))
    assert rhos[300] > rhos[10]


def test_records_without_item_scores_are_skipped_and_multi_candidate_pairs():
    c = [CandidateRef(id=f"c{k}", seed=k, model_version="m", scorecard_items={"cord_d01cc/SpinalCord": float(k)})
         for k in range(3)]
    rec3 = PreferenceRecord(case_id="a", candidates=c, chosen_id="c2", rater="dr")
    bare = PreferenceRecord(case_id="b", candidates=[CandidateRef(id="x", seed=0, model_version="m"),
                                                     CandidateRef(id="y", seed=1, model_version="m")],
                            chosen_id="x", rater="dr")
    deltas, owner = preference_pairs([bare, rec3], IDS)
    assert deltas.shape == (2, len(IDS))  # chosen c2 vs c0 and vs c1
    assert sorted(deltas[:, IDS.index("cord_d01cc")].tolist()) == [1.0, 2.0]
    assert owner.tolist() == [1, 1]
    with pytest.raises(ValueError, match="no usable preference pairs"):
        learn_item_weights([bare], TEMPLATE)
