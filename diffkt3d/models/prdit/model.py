"""PRDiT: local MLP denoiser + global residual DiT, the cos/sin forward process and the loss.

Forward process (PRDiT paper, eq. 1, after Zhang et al. 2023), t in {1, ..., T}:

    theta(t) = pi t / (2 T),     x_t = cos(theta) x + sin(theta) eps,     eps ~ N(0, I)

so x_0 = x and x_T = eps. The network predicts both x_hat and eps_hat; the loss (eq. 3 / 4) is

    L = ||x_hat - x||^2 + ||eps_hat - eps||^2

taken here as the mean over voxels of each squared error (the paper's "MSE"), summed over the two
terms. Stage 1 trains the local denoiser on the local predictions; stage 2 freezes it and trains
the global DiT on the refined predictions x_hat + dx_hat, eps_hat + deps_hat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkt3d.models.prdit.config import PRDiTConfig
from diffkt3d.models.prdit.global_dit import GlobalResidualDiT
from diffkt3d.models.prdit.local_denoiser import LocalDenoiser
from diffkt3d.models.prdit.patches import fold_stride_grid

__all__ = [
    "PRDiT",
    "PRDiTOutput",
    "DenoiseFn",
    "angle",
    "q_sample",
    "prdit_loss",
    "sample_timesteps",
    "stack_conditions",
]

# A denoiser as the samplers see it: (x_t (B, C, D, H, W), t (B,)) -> (x0_hat, eps_hat).
DenoiseFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def angle(t: Tensor | float, num_timesteps: int) -> Tensor:
    """theta(t) = pi t / (2 T) in radians, as an fp32 tensor (scalar or (B,))."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return t * (math.pi / (2.0 * num_timesteps))


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1, 1) matching ``like``'s rank, dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, num_timesteps: int) -> Tensor:
    """x_t = cos(theta_t) x0 + sin(theta_t) eps for each batch item (t: (B,) timesteps)."""
    theta = angle(t, num_timesteps)
    return _bcast(torch.cos(theta), x0) * x0 + _bcast(torch.sin(theta), x0) * noise


def prdit_loss(x0_hat: Tensor, eps_hat: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """mean((x_hat - x)^2) + mean((eps_hat - eps)^2), a scalar."""
    return F.mse_loss(x0_hat, x0) + F.mse_loss(eps_hat, eps)


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator | None = None) -> Tensor:
    """(B,) integer timesteps uniform in {1, ..., T} as float32 (the paper's training draw)."""
    return torch.randint(1, num_timesteps + 1, (batch,), generator=generator).float()


def stack_conditions(
    conditions: Mapping[str, Tensor] | None, config: PRDiTConfig, like: Tensor
) -> Tensor | None:
    """Concatenate named condition volumes in ``config.conditions`` order.

    Args:
        conditions: name -> (B, C_name, D, H, W) tensors (e.g. from ``diffkt3d.data.encoding``).
        config: declares the expected names and channel counts.
        like: (B, C, D, H, W) the noisy target, for batch/spatial size, dtype and device.

    Returns:
        (B, C_c, D, H, W) or None for an unconditional config.

    Raises:
        ValueError: a missing or unexpected name, or a shape that does not match (names the
            condition, expected vs found).
    """
    if not config.conditions:
        if conditions:
            raise ValueError(f"this PRDiT model is unconditional but got conditions {sorted(conditions)}")
        return None
    conditions = dict(conditions or {})
    missing = [n for n in config.conditions if n not in conditions]
    extra = sorted(set(conditions) - set(config.conditions))
    if missing or extra:
        raise ValueError(
            f"PRDiT conditions mismatch: expected {list(config.conditions)}, missing {missing}, unexpected {extra}"
        )
    b, spatial = like.shape[0], tuple(like.shape[2:])
    parts = []
    for name, channels in config.conditions.items():
        v = conditions[name]
        expected = (b, channels, *spatial)
        if tuple(v.shape) != expected:
            raise ValueError(
                f"condition {name!r}: expected shape {expected} (B, C, D, H, W), found {tuple(v.shape)}"
            )
        parts.append(v.to(device=like.device, dtype=like.dtype))
    return torch.cat(parts, dim=1)


@dataclass
class PRDiTOutput:
    """Predictions of one forward pass, all (B, C, D, H, W).

    Attributes:
        x0_hat, eps_hat: final predictions (refined when the global DiT ran, else local).
        x0_local, eps_local: the local denoiser's predictions.
    """

    x0_hat: Tensor
    eps_hat: Tensor
    x0_local: Tensor
    eps_local: Tensor


class PRDiT(nn.Module):
    """Pixel-level residual diffusion transformer (PRDiT paper; docs/method.md).

    Args:
        config: architecture; ``global_depth == 0`` builds the local denoiser alone.
    """

    def __init__(self, config: PRDiTConfig):
        super().__init__()
        self.config = config
        self.local = LocalDenoiser(config)
        self.global_dit = GlobalResidualDiT(config) if config.global_depth > 0 else None

    @property
    def has_global(self) -> bool:
        return self.global_dit is not None

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, use_global: bool = True
    ) -> PRDiTOutput:
        """Predict clean volume and noise.

        Args:
            x_t: (B, C, D, H, W) noisy volume (sizes multiples of the stride).
            t: (B,) timesteps in [0, T].
            cond: (B, C_c, D, H, W) stacked conditions (see :func:`stack_conditions`) or None.
            use_global: add the global DiT's residuals (False = local denoiser only, stage 1
                and the "w/o global DiT" ablation).
        """
        cfg = self.config
        # 1. Local estimate (no graph is recorded when the local part is frozen: stage 2).
        loc = self.local(x_t, t, cond)
        if not use_global or self.global_dit is None:
            return PRDiTOutput(loc.x0_hat, loc.eps_hat, loc.x0_hat, loc.eps_hat)
        # 2. Global residuals on the same stride cells.
        resid = self.global_dit(loc.noisy_patches, loc.tokens, loc.c, loc.grid)  # (B, N, 2 C s^3)
        dx_tok, deps_tok = resid.chunk(2, dim=-1)  # 2 x (B, N, C s^3)
        dx = fold_stride_grid(dx_tok, loc.grid, cfg.in_channels, cfg.stride)  # (B, C, D, H, W)
        deps = fold_stride_grid(deps_tok, loc.grid, cfg.in_channels, cfg.stride)
        return PRDiTOutput(loc.x0_hat + dx, loc.eps_hat + deps, loc.x0_hat, loc.eps_hat)

    def denoiser(self, cond: Tensor | None = None, use_global: bool = True) -> DenoiseFn:
        """A ``(x_t, t) -> (x0_hat, eps_hat)`` closure with fixed conditions, for the samplers."""

        def fn(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            out = self(x_t, t, cond, use_global=use_global)
            return out.x0_hat, out.eps_hat

        return fn

    def training_loss(
        self, x0: Tensor, cond: Tensor | None, stage: str, generator: torch.Generator | None = None
    ) -> Tensor:
        """One draw of the PRDiT loss for a batch of clean volumes.

        Args:
            x0: (B, C, D, H, W) clean volumes in [-1, 1].
            cond: stacked conditions or None.
            stage: "local" (loss on the local predictions) or "global" (on the refined ones).
            generator: for t and eps (reproducible runs).
        """
        if stage not in ("local", "global"):
            raise ValueError(f"stage must be 'local' or 'global', found {stage!r}")
        t = sample_timesteps(x0.shape[0], self.config.num_timesteps, generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = q_sample(x0, t, eps, self.config.num_timesteps)
        out = self(x_t, t, cond, use_global=(stage == "global"))
        return prdit_loss(out.x0_hat, out.eps_hat, x0, eps)

    def num_parameters(self, part: str = "all") -> int:
        """Parameter count of "all", "local" or "global"."""
        module = {"all": self, "local": self.local, "global": self.global_dit}[part]
        return 0 if module is None else sum(p.numel() for p in module.parameters())
