"""Flow matching with v-prediction (Wan / SD3 convention).

x_t = (1 - t) * x0 + t * eps, with t in [0, 1] (t = 1 is pure noise), and the network predicts
the velocity v = dx_t/dt = eps - x0, so x0 = x_t - t * v. Training times are drawn uniformly over
the ``num_train_timesteps`` discrete steps and then shifted towards the noisy end,
t = s * u / (1 + (s - 1) * u) (Wan / SD3 "flow shift", s = 3 in DiffKT3D supplement B.7): high
resolution volumes keep a lot of signal at mid t, so more training time is spent at large t.

Note: MONAI's ``RFlowScheduler`` uses the same x_t but trains on x0 - eps (opposite sign), so it is
not used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FlowConfig", "shift_time", "sample_timesteps", "add_noise", "velocity_target", "predict_x0"]


@dataclass
class FlowConfig:
    """Flow-matching settings.

    Args:
        num_train_timesteps: discrete training times u in {1/T, 2/T, ..., 1} (T = 1000, like Wan).
        shift: flow shift s >= 1 moves times towards 1 (noise); 1 = no shift. Default 3.0 (B.7).
    """

    num_train_timesteps: int = 1000
    shift: float = 3.0

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, found {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, found {self.shift}")


def shift_time(u: Tensor, shift: float) -> Tensor:
    """Shifted time t = s * u / (1 + (s - 1) * u); maps [0, 1] onto [0, 1] monotonically."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_timesteps(
    batch: int,
    cfg: FlowConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times (B,) float32 in (0, 1].

    u is uniform over the discrete steps k / T, k = 1..T (never 0: a clean target would teach
    nothing), then shifted with :func:`shift_time`. Drawn on the generator's device (CPU by default)
    and moved to ``device`` so a seeded CPU generator gives the same times on any device.
    """
    steps = cfg.num_train_timesteps
    gen_device = generator.device if generator is not None else "cpu"
    k = torch.randint(1, steps + 1, (batch,), generator=generator, device=gen_device)
    t = shift_time(k.to(torch.float64) / steps, cfg.shift).to(torch.float32)
    return t.to(device) if device is not None else t


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) in ``like``'s dtype/device for broadcasting over a volume."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t: expected shape ({like.shape[0]},), found {tuple(t.shape)}")
    return t.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) * x0 + t * noise; x0, noise (B, ...), t (B,)."""
    tt = _expand(t, x0)
    return (1.0 - tt) * x0 + tt * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = noise - x0 (the time derivative of x_t)."""
    return noise - x0


def predict_x0(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x0_hat = x_t - t * v (exact inverse of :func:`add_noise` when v is the true velocity)."""
    return x_t - _expand(t, x_t) * v
