"""Predictor-corrector (Algorithm 1) and ancestral samplers, checked with independent formulas and
an oracle denoiser that knows the clean volume."""

import math

import pytest
import torch

from diffkt3d.models.prdit.sampler import (
    ancestral_step,
    predictor_corrector_step,
    sample_ancestral,
    sample_predictor_corrector,
)

T = 1000


def _fake_model(x_t, t):
    """Deterministic, nonlinear stand-in for a network."""
    return torch.tanh(x_t) * (1 - t.view(-1, 1, 1, 1, 1) / T), 0.5 * x_t + 0.1


def _oracle(x0):
    """Exact predictions for the cos/sin process given the true clean volume."""

    def fn(x_t, t):
        th = (t * math.pi / (2 * T)).view(-1, 1, 1, 1, 1)
        eps = (x_t - torch.cos(th) * x0) / torch.sin(th)
        return x0.expand_as(x_t), eps

    return fn


def test_k1_equals_cold_deterministic_update():
    x_T = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    steps = 5
    # Independent cold update (PRDiT paper eq. 5 with k = 1, step dt = T / L timesteps):
    # x_{t-dt} = x_t - dt * d/dt (cos(b_t) x0_hat + sin(b_t) eps_hat),  b_t = pi t / 2T.
    x = x_T.clone()
    for i in range(steps, 0, -1):
        t = T * i / steps
        dt = T / steps
        b = math.pi * t / (2 * T)
        x0_hat, eps_hat = _fake_model(x, torch.full((2,), t))
        grad_t = (math.pi / (2 * T)) * (-math.sin(b) * x0_hat + math.cos(b) * eps_hat)
        x = x - dt * grad_t
    for seed in (1, 2):  # the corrector noise must not matter for k = 1
        out = sample_predictor_corrector(_fake_model, x_T, steps, k=1.0, num_timesteps=T,
                                         generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out.sample, x, rtol=1e-5, atol=1e-6)


def test_k_greater_than_one_adds_noise_and_k_below_one_is_rejected():
    x_T = torch.randn(1, 1, 4, 4, 4)
    a = sample_predictor_corrector(_fake_model, x_T, 4, k=2.5, generator=torch.Generator().manual_seed(1)).sample
    b = sample_predictor_corrector(_fake_model, x_T, 4, k=2.5, generator=torch.Generator().manual_seed(2)).sample
    assert not torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="k must be >= 1"):
        sample_predictor_corrector(_fake_model, x_T, 4, k=0.5)


def test_clamped_steps_predict_to_zero_then_renoise_and_only_the_last_is_deterministic():
    # k = 3, 10 steps: t = 200 -> 100 would need t_pred = -100; clamped to 0 the step is
    # x_t' = cos(th') (x_t + th_t g) + sin(th') z with cos(th') = 0.988, sin(th') = 0.156 (a hot step).
    g = torch.Generator().manual_seed(0)
    x_t, z = torch.randn(1, 1, 4, 4, 4, generator=g), torch.randn(1, 1, 4, 4, 4, generator=g)
    x0_hat, eps_hat = _fake_model(x_t, torch.tensor([200.0]))
    th_t, th_next = math.pi * 200 / (2 * T), math.pi * 100 / (2 * T)
    assert (math.cos(th_next), math.sin(th_next)) == (pytest.approx(0.988, abs=1e-3), pytest.approx(0.156, abs=1e-3))
    x_tilde = x_t + th_t * (math.sin(th_t) * x0_hat - math.cos(th_t) * eps_hat)
    out = predictor_corrector_step(x_t, x0_hat, eps_hat, 200.0, 100.0, 3.0, T, z)
    torch.testing.assert_close(out, math.cos(th_next) * x_tilde + math.sin(th_next) * z)
    other = predictor_corrector_step(x_t, x0_hat, eps_hat, 200.0, 100.0, 3.0, T, -z)
    assert not torch.allclose(out, other)  # the step depends on the noise
    # The final step (t' = 0) is deterministic for any k and needs no noise.
    last = predictor_corrector_step(x_t, x0_hat, eps_hat, 100.0, 0.0, 3.0, T, None)
    torch.testing.assert_close(last, x_t + (math.pi / 20) * (math.sin(math.pi / 20) * x0_hat
                                                              - math.cos(math.pi / 20) * eps_hat))


@pytest.mark.parametrize("k", [2.0, 3.0])
def test_one_hot_step_has_the_right_marginal(k):
    # From x_t on the true path, one PC step must land (to Euler accuracy) on
    # cos(th') x0 + sin(th') * N(0, 1): check both coefficients on many voxels.
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.randn(1, 1, n, 1, 1, generator=g)
    t, t_next = 600.0, 595.0
    th, th_next = math.pi * t / (2 * T), math.pi * t_next / (2 * T)
    x_t = math.cos(th) * x0 + math.sin(th) * torch.randn(x0.shape, generator=g)
    x0_hat, eps_hat = _oracle(x0)(x_t, torch.tensor([t]))
    x_next = predictor_corrector_step(x_t, x0_hat, eps_hat, t, t_next, k, T, torch.randn(x0.shape, generator=g))
    coef = float((x_next * x0).sum() / (x0 * x0).sum())
    resid_std = float((x_next - coef * x0).std())
    assert coef == pytest.approx(math.cos(th_next), abs=5e-3)
    assert resid_std == pytest.approx(math.sin(th_next), abs=5e-3)


def test_ancestral_step_marginal_and_final_step():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, 200_000, 1, 1, generator=g)
    t, t_next = 700.0, 600.0
    th, th_next = math.pi * t / (2 * T), math.pi * t_next / (2 * T)
    x_t = math.cos(th) * x0 + math.sin(th) * torch.randn(x0.shape, generator=g)
    x0_hat, eps_hat = _oracle(x0)(x_t, torch.tensor([t]))
    x_next = ancestral_step(x_t, x0_hat, eps_hat, t, t_next, T, torch.randn(x0.shape, generator=g))
    coef = float((x_next * x0).sum() / (x0 * x0).sum())
    assert coef == pytest.approx(math.cos(th_next), abs=5e-3)
    assert float((x_next - coef * x0).std()) == pytest.approx(math.sin(th_next), abs=5e-3)
    # Last step (t' = 0) returns the eps-derived clean estimate exactly.
    last = ancestral_step(x_t, x0_hat, eps_hat, t, 0.0, T, None)
    torch.testing.assert_close(last, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler,k", [("pc", 1.0), ("pc", 2.0), ("pc", 2.5), ("ancestral", None)])
def test_samplers_recover_x0_with_an_oracle(sampler, k):
    g = torch.Generator().manual_seed(3)
    x0 = torch.tanh(torch.randn(1, 1, 6, 6, 6, generator=g))
    x_T = torch.randn(x0.shape, generator=g)
    if sampler == "pc":
        out = sample_predictor_corrector(_oracle(x0), x_T, 100, k=k, generator=g, keep_trajectory=True)
        assert len(out.trajectory) == 101 and len(out.x0_predictions) == 100
    else:
        out = sample_ancestral(_oracle(x0), x_T, 100, generator=g)
    assert float((out.sample - x0).abs().max()) < 0.05
