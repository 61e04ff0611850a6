"""Samplers for the cos/sin process: predictor-corrector (PRDiT paper, Algorithm 1) and ancestral.

Notation: theta(t) = pi t / (2T); x_t = cos(theta) x0 + sin(theta) eps. Along this path
d x_t / d theta = -(sin(theta) x0 - cos(theta) eps) = -g_t.

Predictor-corrector step from t to t' = t - dt with multiplier k >= 1 (non-integer allowed):

    g      = sin(theta_t) x0_hat - cos(theta_t) eps_hat
    t_pred = max(t - k dt, 0)                        cold predictor: jump k steps
    x~     = x_t - (theta_pred - theta_t) g          (Euler step in angle)
    alpha  = cos(theta_t') / cos(theta_pred),  sigma = sqrt(1 - alpha^2)
    x_t'   = alpha x~ + sigma z,  z ~ N(0, I)        hot corrector: exact Gaussian t_pred -> t'

k = 1 gives t_pred = t', alpha = 1, sigma = 0: the deterministic "cold" update of Zhang et al.

Clamping t_pred at 0 is ours. Algorithm 1 does not treat t - k dt < 0, which on the uniform
schedule (t = l dt) happens in the last ceil(k) - 1 steps (l < k): theta_pred would be negative
(the Euler step overshoots past the clean end t = 0), and once t - k dt < -t' it gives
cos(theta_pred) < cos(theta_t'), alpha > 1 and no real sigma. Clamped, theta_pred = 0 and the step
becomes "predict the clean volume, then re-noise it to t'":

    x~     = x_t + theta_t g                          Euler jump all the way to t = 0
    alpha  = cos(theta_t'),  sigma = sin(theta_t')
    x_t'   = cos(theta_t') x~ + sin(theta_t') z       the forward process q(x_t' | x~), fresh z

This is a hot step, not a cold one: e.g. k = 3, 10 steps, T = 1000, the step t = 200 -> 100 has
alpha = cos(pi/20) = 0.988, sigma = sin(pi/20) = 0.156. Only the final step to t' = 0 is
deterministic (alpha = 1, sigma = 0), for every k. For integer k the step with t = k dt reaches
t_pred = 0 exactly, without clamping, and has the same form.

The ancestral ("conventional hot", A.6.3 eq. 7, DDPM / DDIM eta = 1) sampler uses eps_hat only:
with sqrt(abar_t) = cos(theta_t), x0 = (x_t - sin(theta_t) eps_hat) / cos(theta_t),
x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - s^2) eps_hat + s z,
s = sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t'). At t = T (cos = 0) the eps
formula is undefined; there we use the model's own x0_hat (the only step where it is used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffkt3d.constants import PRDIT_DEFAULT_K
from diffkt3d.flow.sampler import StepCallback
from diffkt3d.models.prdit.model import DenoiseFn, angle

__all__ = [
    "timestep_schedule",
    "predictor_corrector_step",
    "ancestral_step",
    "sample_predictor_corrector",
    "sample_ancestral",
    "SampleResult",
]


def timestep_schedule(steps: int, num_timesteps: int) -> list[float]:
    """0 = t_0 < t_1 < ... < t_L = T, uniform: t_l = T l / L (floats; non-integer t is fine)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, found {steps}")
    return [num_timesteps * i / steps for i in range(steps + 1)]


@dataclass
class SampleResult:
    """Final sample (B, C, D, H, W) and, if kept, the trajectory (x_{t_L}, ..., x_{t_0}) and x0_hat per step."""

    sample: Tensor
    trajectory: list[Tensor] = field(default_factory=list)
    x0_predictions: list[Tensor] = field(default_factory=list)


def predictor_corrector_step(
    x_t: Tensor,
    x0_hat: Tensor,
    eps_hat: Tensor,
    t: float,
    t_next: float,
    k: float,
    num_timesteps: int,
    noise: Tensor | None,
) -> Tensor:
    """One step of Algorithm 1 from t to t_next < t (see module docstring).

    Args:
        noise: standard normal like ``x_t`` for the corrector; may be None only when sigma = 0
            (k = 1, or the final step to ``t_next = 0``).
    """
    if k < 1:
        raise ValueError(f"predictor multiplier k must be >= 1, found {k}")
    dt = t - t_next
    t_pred = max(t - k * dt, 0.0)
    th_t, th_next, th_pred = (float(angle(v, num_timesteps)) for v in (t, t_next, t_pred))
    g = math.sin(th_t) * x0_hat - math.cos(th_t) * eps_hat
    x_pred = x_t - (th_pred - th_t) * g
    alpha = math.cos(th_next) / math.cos(th_pred)
    sigma = math.sqrt(max(0.0, 1.0 - alpha * alpha))
    if sigma == 0.0:
        return alpha * x_pred
    if noise is None:
        raise ValueError("the corrector needs noise when k > 1")
    return alpha * x_pred + sigma * noise


def ancestral_step(
    x_t: Tensor,
    x0_hat: Tensor,
    eps_hat: Tensor,
    t: float,
    t_next: float,
    num_timesteps: int,
    noise: Tensor | None,
) -> Tensor:
    """One conventional ancestral step t -> t_next driven by eps_hat (module docstring)."""
    th_t, th_next = float(angle(t, num_timesteps)), float(angle(t_next, num_timesteps))
    abar_t, abar_next = math.cos(th_t) ** 2, math.cos(th_next) ** 2
    if math.cos(th_t) > 1e-6:
        x0 = (x_t - math.sin(th_t) * eps_hat) / math.cos(th_t)
    else:
        x0 = x0_hat  # t = T: cos(theta_T) = 0, the eps-only estimate is undefined
    s2 = (1.0 - abar_next) / (1.0 - abar_t) * (1.0 - abar_t / abar_next) if abar_t < 1.0 else 0.0
    s2 = min(max(s2, 0.0), 1.0 - abar_next)
    out = math.sqrt(abar_next) * x0 + math.sqrt(max(0.0, 1.0 - abar_next - s2)) * eps_hat
    if s2 > 0.0:
        if noise is None:
            raise ValueError("the ancestral step needs noise")
        out = out + math.sqrt(s2) * noise
    return out


def _run(
    denoise: DenoiseFn,
    x_T: Tensor,
    steps: int,
    num_timesteps: int,
    step_fn,
    generator: torch.Generator | None,
    keep_trajectory: bool,
    on_step: StepCallback | None = None,
) -> SampleResult:
    ts = timestep_schedule(steps, num_timesteps)
    x = x_T
    result = SampleResult(sample=x_T)
    if keep_trajectory:
        result.trajectory.append(x_T)
    b = x_T.shape[0]
    for i in range(steps, 0, -1):
        t, t_next = ts[i], ts[i - 1]
        t_vec = torch.full((b,), t, dtype=torch.float32, device=x.device)
        x0_hat, eps_hat = denoise(x, t_vec)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = step_fn(x, x0_hat, eps_hat, t, t_next, noise)
        if keep_trajectory:
            result.trajectory.append(x)
            result.x0_predictions.append(x0_hat)
        if on_step is not None:  # the same hook as the flow sampler's: progress, and cancel by raising
            on_step(steps - i + 1, steps)
    result.sample = x
    return result


@torch.no_grad()
def sample_predictor_corrector(
    denoise: DenoiseFn,
    x_T: Tensor,
    steps: int,
    k: float = PRDIT_DEFAULT_K,
    num_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    keep_trajectory: bool = False,
    on_step: StepCallback | None = None,
) -> SampleResult:
    """Algorithm 1 of the PRDiT paper over ``steps`` uniform steps from t = T to 0.

    Args:
        denoise: ``(x_t, t) -> (x0_hat, eps_hat)``, e.g. ``PRDiT.denoiser(cond)``.
        x_T: (B, C, D, H, W) start, normally standard normal (x_T = eps under this process).
        steps: number of outer steps L.
        k: predictor multiplier (1 = cold deterministic; the paper's best values are 2-3.5);
            default ``diffkt3d.constants.PRDIT_DEFAULT_K`` (1).
        num_timesteps: T of the model.
        generator: drives the corrector noise (one draw per step, also for k = 1, so that runs with
            different k consume the generator identically).
        keep_trajectory: keep every x_t and x0_hat (memory!).
        on_step: called as ``on_step(done, steps)`` after every step, as by the flow sampler
            (``diffkt3d.flow.sampler.sample``); an exception it raises stops the sampling.
    """
    if k < 1:
        raise ValueError(f"predictor multiplier k must be >= 1, found {k}")

    def step(x, x0_hat, eps_hat, t, t_next, noise):
        return predictor_corrector_step(x, x0_hat, eps_hat, t, t_next, k, num_timesteps, noise)

    return _run(denoise, x_T, steps, num_timesteps, step, generator, keep_trajectory, on_step)


@torch.no_grad()
def sample_ancestral(
    denoise: DenoiseFn,
    x_T: Tensor,
    steps: int,
    num_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    keep_trajectory: bool = False,
    on_step: StepCallback | None = None,
) -> SampleResult:
    """Conventional ancestral (DDPM / DDIM eta = 1) sampler on the cos/sin schedule, eps-driven
    (``on_step`` as in :func:`sample_predictor_corrector`)."""

    def step(x, x0_hat, eps_hat, t, t_next, noise):
        return ancestral_step(x, x0_hat, eps_hat, t, t_next, num_timesteps, noise)

    return _run(denoise, x_T, steps, num_timesteps, step, generator, keep_trajectory, on_step)
