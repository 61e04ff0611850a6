"""Deterministic Euler ODE sampler for the flow of :mod:`diffkt3d.flow.matching`.

Integrates dx/dt = v(x_t, t) from t = 1 (noise) to t = 0 (data) on a shifted schedule (the same
shift as in training puts more steps at the noisy end). No randomness inside: the caller makes
``noise`` with a seeded ``torch.Generator``, so a seed fixes the result. ``steps=1`` is the one-step
preview x0 = eps - v(eps, 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffkt3d.flow.matching import shift_time

__all__ = ["timestep_schedule", "sample"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def timestep_schedule(steps: int, shift: float = 3.0) -> Tensor:
    """(steps + 1,) float64 times from exactly 1 down to exactly 0, strictly decreasing.

    Uniform u = 1, 1 - 1/steps, ..., 0, shifted with t = s * u / (1 + (s - 1) * u).
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, found {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, found {shift}")
    u = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64)
    return shift_time(u, shift)


def sample(velocity_fn: VelocityFn, noise: Tensor, steps: int = 10, shift: float = 3.0) -> Tensor:
    """Euler-integrate from ``noise`` (t = 1) to an x0 sample (t = 0).

    Args:
        velocity_fn: ``(x_t (B, ...), t (B,)) -> v_hat`` of x_t's shape, e.g. a closure over the
            model and the condition volumes. Gradients are not disabled here: wrap the call in
            ``torch.no_grad()`` for inference.
        noise: (B, ...) standard normal starting point.
        steps: number of Euler steps (network evaluations), >= 1; 1 = preview.
        shift: schedule shift (match training's flow shift).

    Returns:
        x0 sample, shape and dtype of ``noise``.
    """
    schedule = timestep_schedule(steps, shift)
    x = noise
    batch = noise.shape[0]
    for i in range(int(steps)):
        t_cur, t_next = float(schedule[i]), float(schedule[i + 1])
        t = torch.full((batch,), t_cur, dtype=torch.float32, device=noise.device)
        v = velocity_fn(x, t)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
        x = (x.float() + (t_next - t_cur) * v.float()).to(noise.dtype)
    return x
