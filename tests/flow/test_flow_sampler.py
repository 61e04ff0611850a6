"""Euler sampler: schedule, exactness on straight flows, 1-step preview, determinism with the model."""

from __future__ import annotations

import pytest
import torch

from diffkt3d.flow.sampler import sample, sample_with_seeds, seeded_noise, timestep_schedule
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.config import get_config

torch.set_num_threads(1)


@pytest.mark.parametrize("steps, shift", [(1, 3.0), (10, 3.0), (7, 1.0), (50, 5.0)])
def test_schedule_monotone_from_one_to_zero(steps, shift):
    s = timestep_schedule(steps, shift)
    assert s.shape == (steps + 1,)
    assert s[0] == 1.0 and s[-1] == 0.0
    assert (s.diff() < 0).all()
    u = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    torch.testing.assert_close(s, shift * u / (1 + (shift - 1) * u))


def test_shift_puts_more_steps_at_the_noisy_end():
    s = timestep_schedule(10, 3.0)
    assert (s > 0.5).sum() > (s < 0.5).sum()


def test_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        timestep_schedule(0)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_is_exact_on_the_straight_path_to_a_point(steps):
    """For data = one point x0 the true field is v(x, t) = (x - x0) / t; Euler lands on x0."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 4, 4, 4, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    out = sample(lambda x, t: (x - x0) / t.view(-1, 1, 1, 1, 1), noise, steps=steps)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def _model_fn():
    torch.manual_seed(0)
    model = Any2AnyDiT(get_config("tiny")).eval()
    with torch.no_grad():  # non-zero head so the sampler sees a real velocity
        for lin in model.head.head.values():
            lin.weight.normal_(std=0.05)
    gen = torch.Generator().manual_seed(1)
    ct = torch.rand(1, 1, 8, 8, 8, generator=gen) * 2 - 1
    calls = []

    def velocity(x_t, t):
        calls.append(t.clone())
        return model({"dose": x_t, "ct": ct}, "dose", t)

    return velocity, calls


def test_one_step_preview_equals_noise_minus_velocity_at_t1():
    velocity, calls = _model_fn()
    noise = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        preview = sample(velocity, noise, steps=1)
        expected = noise - velocity(noise, torch.ones(1))
    torch.testing.assert_close(preview, expected)
    assert calls[0].tolist() == [1.0]


def test_sampling_is_deterministic_under_a_seed():
    velocity, calls = _model_fn()

    def run(seed):
        noise = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return sample(velocity, noise, steps=4)

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert len(calls) == 12  # 4 network evaluations per run


def test_seeded_noise_draws_each_row_from_its_own_seed():
    """Row k is what a fresh generator seeded with seeds[k] draws (the noise earlier versions used)."""
    shape = (1, 4, 4, 4)
    noise = seeded_noise(shape, [3, 8, 3])
    assert noise.shape == (3, *shape) and noise.dtype == torch.float32
    assert torch.equal(noise[0], torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(noise[1], torch.randn(shape, generator=torch.Generator().manual_seed(8)))
    assert torch.equal(noise[0], noise[2])
    with pytest.raises(ValueError, match="seeds is empty"):
        seeded_noise(shape, [])


def _seeded_model():
    torch.manual_seed(0)
    model = Any2AnyDiT(get_config("tiny")).eval()
    with torch.no_grad():
        for lin in model.head.head.values():
            lin.weight.normal_(std=0.05)
    ct = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, {"ct": ct}


def test_sample_with_seeds_is_the_euler_sampler_from_seeded_noise():
    model, conds = _seeded_model()
    shape = (1, 8, 8, 8)
    got = sample_with_seeds(model, conds, "dose", shape, [4, 5], steps=3)
    noise = seeded_noise(shape, [4, 5])
    with torch.no_grad():
        expected = sample(lambda x, t: model({"ct": conds["ct"].expand(2, -1, -1, -1, -1), "dose": x}, "dose", t),
                          noise, steps=3)
    assert torch.equal(got, expected)


def test_candidate_k_is_reproducible_from_seed_k_alone():
    model, conds = _seeded_model()
    shape = (1, 8, 8, 8)
    batch = sample_with_seeds(model, conds, "dose", shape, [7, 9], steps=2, one_by_one=True)
    assert torch.equal(batch, sample_with_seeds(model, conds, "dose", shape, [7, 9], steps=2, one_by_one=True))
    assert torch.equal(batch[1:], sample_with_seeds(model, conds, "dose", shape, [9], steps=2))
    assert not torch.allclose(batch[0], batch[1])
    # As one batch: the same samples up to float reordering.
    together = sample_with_seeds(model, conds, "dose", shape, [7, 9], steps=2)
    torch.testing.assert_close(together, batch, rtol=1e-5, atol=1e-5)


def test_on_step_reports_every_step_and_can_stop_the_sampling():
    calls = []
    noise = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(lambda x, t: torch.zeros_like(x), noise, steps=5, on_step=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(1, 6)] and torch.equal(out, noise)

    class Stop(Exception):
        pass

    evaluations = []

    def velocity(x, t):
        evaluations.append(float(t[0]))
        return torch.zeros_like(x)

    def stop_at_two(i, n):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        sample(velocity, noise, steps=10, on_step=stop_at_two)
    assert len(evaluations) == 2  # nothing after the step whose hook raised


def test_on_step_counts_over_all_seeds_one_by_one():
    enc_channels = {"ct": 1, "dose": 1}
    cfg = get_config("tiny", in_channels=enc_channels, modalities=list(enc_channels))
    model = Any2AnyDiT(cfg).eval()
    conditions = {"ct": torch.zeros(1, 1, 8, 8, 8)}
    calls = []
    sample_with_seeds(model, conditions, "dose", (1, 8, 8, 8), [1, 2, 3], steps=2, one_by_one=True,
                      on_step=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 6) for i in range(1, 7)]
