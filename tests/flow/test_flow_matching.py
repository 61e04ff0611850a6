"""Flow-matching maths: timestep sampling, noising, velocity target, x0 recovery."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkt3d.flow.matching import (
    FlowConfig,
    add_noise,
    predict_x0,
    sample_timesteps,
    shift_time,
    velocity_target,
)


def test_timesteps_lie_on_the_shifted_discrete_grid():
    cfg = FlowConfig(num_train_timesteps=1000, shift=3.0)
    t = sample_timesteps(4096, cfg, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert t.shape == (4096,) and (t > 0).all() and (t <= 1).all()
    # invert t = s u / (1 + (s - 1) u)  ->  u = t / (s - (s - 1) t); u * 1000 must be an integer
    u = t / (3.0 - 2.0 * t)
    np.testing.assert_allclose(u * 1000, np.round(u * 1000), atol=1e-3)
    # mean of the shift over the uniform discrete grid, computed independently
    grid = np.arange(1, 1001) / 1000
    expected_mean = np.mean(3 * grid / (1 + 2 * grid))
    assert abs(t.mean() - expected_mean) < 0.02
    assert expected_mean > 0.6  # shift 3 puts the mass at the noisy end


def test_timesteps_seeded_and_unshifted():
    cfg = FlowConfig(shift=1.0)
    a = sample_timesteps(8, cfg, generator=torch.Generator().manual_seed(5))
    b = sample_timesteps(8, cfg, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    np.testing.assert_allclose(a.numpy() * 1000, np.round(a.numpy() * 1000), atol=1e-3)
    assert a.dtype == torch.float32


def test_shift_time_is_monotone_bijection_of_unit_interval():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    t = shift_time(u, 3.0)
    assert t[0] == 0 and t[-1] == 1 and (t.diff() > 0).all()


def test_noising_endpoints_velocity_and_x0_recovery():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    torch.testing.assert_close(add_noise(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(add_noise(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.1, 0.5, 0.9])
    # v is the time derivative of x_t (central finite difference)
    h = 1e-3
    fd = (
        add_noise(x0.double(), noise.double(), t.double() + h)
        - add_noise(x0.double(), noise.double(), t.double() - h)
    ) / (2 * h)
    torch.testing.assert_close(fd.float(), velocity_target(x0, noise), atol=1e-5, rtol=1e-5)
    x_t = add_noise(x0, noise, t)
    torch.testing.assert_close(predict_x0(x_t, velocity_target(x0, noise), t), x0, atol=1e-6, rtol=1e-6)


def test_bad_time_shape_and_config():
    x = torch.zeros(2, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="expected shape \\(2,\\)"):
        add_noise(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="shift"):
        FlowConfig(shift=0.0)
