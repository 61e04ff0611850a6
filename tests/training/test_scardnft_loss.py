"""ScardNFT objective and reward, checked against independent re-computations (no peft needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkt3d.scorecard import load_template, score_case
from diffkt3d.training.reward import RewardConfig, advantages_to_r, candidate_reward, group_advantages
from diffkt3d.training.scardnft import nft_loss

torch.set_num_threads(1)


def _reference_loss(v_theta, v_old, x_t, x0, t, r, beta, v_ref, kl_weight):
    """The DiffusionNFT formula (docs/method.md) written out per sample in float64 numpy."""
    v_theta, v_old, x_t, x0, v_ref = (a.detach().double().numpy() for a in (v_theta, v_old, x_t, x0, v_ref))
    per_sample = []
    for b in range(x0.shape[0]):
        v_pos = beta * v_theta[b] + (1 - beta) * v_old[b]
        v_neg = (1 + beta) * v_old[b] - beta * v_theta[b]
        losses = []
        for v in (v_pos, v_neg):
            x0_hat = x_t[b] - float(t[b]) * v
            err = x0_hat - x0[b]
            losses.append(np.mean(err ** 2) / max(np.mean(np.abs(err)), 1e-5))
        per_sample.append((float(r[b]) * losses[0] + (1 - float(r[b])) * losses[1]) / beta)
    return float(np.mean(per_sample)) + kl_weight * float(np.mean((v_theta - v_ref) ** 2))


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.7])
def test_nft_loss_matches_written_formula(beta):
    g = torch.Generator().manual_seed(1)
    shape = (3, 1, 4, 4, 4)
    x0, eps, v_theta, v_old, v_ref = (torch.randn(shape, generator=g) for _ in range(5))
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    r = torch.tensor([1.0, 0.25, 0.0])
    loss, stats = nft_loss(v_theta, v_old, x_t, x0, t, r, beta, v_ref, kl_weight=0.3)
    expected = _reference_loss(v_theta, v_old, x_t, x0, t, r, beta, v_ref, 0.3)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert stats["kl"] == pytest.approx(float(((v_theta - v_ref) ** 2).mean()), rel=1e-6)


def test_denominator_is_clipped_and_not_differentiated():
    # x̂0 == x0 exactly -> the mean |err| is 0, clipped to 1e-5: loss 0, finite gradient.
    x0 = torch.zeros(1, 1, 2, 2, 2)
    v_old = torch.zeros_like(x0)
    v_theta = torch.zeros_like(x0, requires_grad=True)
    loss, _ = nft_loss(v_theta, v_old, x0.clone(), x0, torch.tensor([0.5]), torch.tensor([1.0]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(v_theta.grad).all()


@pytest.mark.parametrize("r_value, branch", [(1.0, "pos"), (0.0, "neg")])
def test_gradient_pushes_towards_the_right_branch(r_value, branch):
    """r = 1: a small step brings v_θ closer to the v⁺ target (v⁺ = true velocity); r = 0: the v⁻ one."""
    g = torch.Generator().manual_seed(3)
    shape = (2, 1, 4, 4, 4)
    x0, eps, v_old = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.tensor([0.3, 0.8])
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    v_true = (x_t - x0) / tt  # x̂0 = x0 exactly when the branch velocity equals this
    beta = 0.5
    # v⁺ = β v_θ + (1 − β) v_old = v_true  /  v⁻ = (1 + β) v_old − β v_θ = v_true
    target = (v_true - (1 - beta) * v_old) / beta if branch == "pos" else ((1 + beta) * v_old - v_true) / beta
    v_theta = torch.randn(shape, generator=g).requires_grad_(True)
    loss, _ = nft_loss(v_theta, v_old, x_t, x0, t, torch.full((2,), r_value), beta)
    loss.backward()
    with torch.no_grad():
        before = (v_theta - target).norm()
        stepped = v_theta - 1e-2 * v_theta.grad
        assert (stepped - target).norm() < before


def test_group_advantages_and_r_match_numpy():
    rewards = torch.tensor([3.0, 1.0, 2.0, 10.0], dtype=torch.float64)
    r_np = rewards.numpy()
    adv_np = np.clip((r_np - r_np.mean()) / (r_np.std() + 1e-4), -5, 5)
    adv = group_advantages(rewards)
    np.testing.assert_allclose(adv.numpy(), adv_np, rtol=1e-12)
    np.testing.assert_allclose(advantages_to_r(adv).numpy(), np.clip(adv_np / 10 + 0.5, 0, 1), rtol=1e-12)
    # identical candidates: A = 0 -> r = 0.5 (both branches weighted equally)
    assert torch.allclose(advantages_to_r(group_advantages(torch.ones(4))), torch.full((4,), 0.5))
    # clipping at ±5
    big = torch.tensor([0.0] * 99 + [1.0])
    assert float(group_advantages(big).max()) == 5.0


def test_reward_terms_and_weights(synthetic_case):
    case = synthetic_case
    pred = (case.dose_gy * 0.85).astype(np.float32)  # under-dosed: PTV70 D95 below 95 % Rx -> hinge
    cfg = RewardConfig(w_score=2.0, w_hinge=3.0, w_mae=0.5)
    terms = candidate_reward(pred, case, cfg)
    sc = score_case(pred, case, load_template("openkbp_hn"))
    mae = np.abs(case.dose_gy - pred).sum() / case.body.sum()
    assert sc.penalty_total > 0
    assert terms.penalty == pytest.approx(sc.penalty_total)
    assert terms.mae_gy == pytest.approx(float(mae), rel=1e-5)
    assert terms.scorecard_pct == pytest.approx(100 * sc.total / sc.max_total)
    assert terms.reward == pytest.approx(2.0 * terms.scorecard_pct - 3.0 * sc.penalty_total - 0.5 * mae, rel=1e-6)
    # the reference dose itself: no MAE, a higher reward than the under-dosed one
    assert candidate_reward(case.dose_gy, case, cfg).reward > terms.reward


def test_reward_uses_learned_item_weights(synthetic_case):
    case = synthetic_case
    pred = (case.dose_gy * 0.95).astype(np.float32)
    plain = candidate_reward(pred, case, RewardConfig(w_mae=0.0))
    weighted = candidate_reward(pred, case, RewardConfig(w_mae=0.0, item_weights={"ptv_high_d95": 10.0}))
    sc = score_case(pred, case, "openkbp_hn", weights={"ptv_high_d95": 10.0})
    assert weighted.scorecard_pct == pytest.approx(100 * sc.fraction)
    assert weighted.scorecard_pct != pytest.approx(plain.scorecard_pct)


def test_reward_config_rejects_negative_weight():
    from diffkt3d.errors import ConfigError

    with pytest.raises(ConfigError, match="w_mae"):
        RewardConfig(w_mae=-1.0)
