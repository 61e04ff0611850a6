"""Low -> high resolution PRDiT (paper section 3.4, A.8): a frozen low-resolution model plus a
high-resolution local refinement module, used inside the sampling loop.

At every call on a high-resolution noisy volume x_t (B, C, fD, fH, fW):

1. nearest-downsample x_t by the integer factor f (x_t[..., ::f, ::f, ::f]): unlike averaging, it
   keeps the noise energy, so the low-resolution model sees the sin(theta) noise level it was
   trained on; conditions are average-pooled (they are not noise);
2. query the frozen low-resolution PRDiT -> x0_lr, eps_lr;
3. upsample: x0 trilinearly (smooth anatomy), eps by nearest neighbour (keeps its energy);
4. a local denoiser at high resolution (same patch design, no global DiT) reads the noisy
   high-resolution patches with [conditions, x0_up, eps_up] as condition channels and predicts
   residuals; its zero-initialised head makes it start exactly at the upsampled estimate.

Training (frozen low model, refiner only) uses the PRDiT loss on the refined predictions plus the
low-frequency consistency term  lambda * mean((avgpool_f(x0_hat_hr) - x0_lr)^2), which keeps the
average-pooled high-resolution estimate on the low-resolution one so the refiner spends its
capacity on high frequencies. The model exposes the same ``denoiser(cond)`` interface as
:class:`PRDiT`, so both samplers run on it unchanged (in-loop refinement, not a post-hoc
super-resolution of the final sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkt3d.models.prdit.config import PRDiTConfig
from diffkt3d.models.prdit.local_denoiser import LocalDenoiser
from diffkt3d.models.prdit.model import DenoiseFn, PRDiT, prdit_loss, q_sample, sample_timesteps

__all__ = ["PRDiTHighRes", "HighResOutput", "refiner_config"]


def refiner_config(
    low: PRDiTConfig, patch_size: int | None = None, stride: int | None = None, padding: int | None = None
) -> PRDiTConfig:
    """Config of the high-resolution refiner: the low model's channels and conditions plus the
    upsampled estimates ``x0_up`` and ``eps_up`` as extra condition channels; no global DiT.
    Patch geometry defaults to the low model's (the paper keeps 12 / 8 / 2)."""
    data = low.to_dict()
    data["conditions"] = {**low.conditions, "x0_up": low.in_channels, "eps_up": low.in_channels}
    data["global_depth"] = 0
    for name, value in (("patch_size", patch_size), ("stride", stride), ("padding", padding)):
        if value is not None:
            data[name] = value
    return PRDiTConfig.from_dict(data)


@dataclass
class HighResOutput:
    """x0_hat, eps_hat: (B, C, fD, fH, fW) refined; x0_low: (B, C, D, H, W) the frozen low model's x0_hat;
    x0_up, eps_up: its upsampled estimates (the refiner's starting point)."""

    x0_hat: Tensor
    eps_hat: Tensor
    x0_low: Tensor
    x0_up: Tensor
    eps_up: Tensor


class PRDiTHighRes(nn.Module):
    """Frozen low-resolution PRDiT + trainable high-resolution local refiner.

    Args:
        low: trained low-resolution PRDiT; frozen here (``requires_grad_(False)``, eval mode).
        refiner: config from :func:`refiner_config` (must list ``x0_up`` and ``eps_up`` last).
        scale: integer resolution factor f (2 = 64^3 -> 128^3).
    """

    def __init__(self, low: PRDiT, refiner: PRDiTConfig, scale: int = 2):
        super().__init__()
        if scale < 2:
            raise ValueError(f"scale must be an integer >= 2, found {scale}")
        expected = list(low.config.conditions) + ["x0_up", "eps_up"]
        if list(refiner.conditions) != expected or refiner.global_depth != 0:
            raise ValueError(
                f"refiner config must have conditions {expected} and global_depth 0; "
                f"found {list(refiner.conditions)}, depth {refiner.global_depth}"
            )
        self.scale = int(scale)
        self.low = low
        self.low.requires_grad_(False)
        self.low.eval()
        self.refiner = LocalDenoiser(refiner)
        self.config = low.config  # channels, conditions and T as seen by callers

    def train(self, mode: bool = True) -> PRDiTHighRes:
        """Only the refiner switches to training mode; the low model stays frozen in eval mode."""
        super().train(mode)
        self.low.eval()
        return self

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> HighResOutput:
        """x_t (B, C, fD, fH, fW), t (B,), cond (B, C_c, fD, fH, fW) or None -> refined predictions."""
        f = self.scale
        if any(n % f for n in x_t.shape[2:]):
            raise ValueError(f"volume size {tuple(x_t.shape[2:])} is not divisible by the scale {f}")
        # 1. Nearest downsampling of the noisy volume; area (average) pooling of the conditions.
        x_t_low = x_t[..., ::f, ::f, ::f]  # (B, C, D, H, W)
        cond_low = F.avg_pool3d(cond, f) if cond is not None else None
        # 2. Frozen low-resolution prediction.
        with torch.no_grad():
            low = self.low(x_t_low, t, cond_low)
        # 3. Upsampling: trilinear for x0, nearest for eps.
        x0_up = F.interpolate(low.x0_hat, scale_factor=f, mode="trilinear", align_corners=False)
        eps_up = F.interpolate(low.eps_hat, scale_factor=f, mode="nearest")
        # 4. High-resolution local refinement of both estimates (residuals).
        extra = [x0_up, eps_up] if cond is None else [cond.to(x_t.dtype), x0_up, eps_up]
        ref = self.refiner(x_t, t, torch.cat(extra, dim=1))
        return HighResOutput(x0_up + ref.x0_hat, eps_up + ref.eps_hat, low.x0_hat, x0_up, eps_up)

    def denoiser(self, cond: Tensor | None = None, use_global: bool = True) -> DenoiseFn:
        """``(x_t, t) -> (x0_hat, eps_hat)`` for the samplers (``use_global`` is accepted for
        interface parity; the frozen low model always uses its global DiT if it has one)."""

        def fn(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            out = self(x_t, t, cond)
            return out.x0_hat, out.eps_hat

        return fn

    def training_loss(
        self,
        x0: Tensor,
        cond: Tensor | None,
        lf_weight: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """PRDiT loss on the refined predictions + ``lf_weight`` x low-frequency consistency.

        Args:
            x0: (B, C, fD, fH, fW) clean high-resolution volumes.
            cond: stacked high-resolution conditions or None.
        """
        t = sample_timesteps(x0.shape[0], self.config.num_timesteps, generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = q_sample(x0, t, eps, self.config.num_timesteps)
        out = self(x_t, t, cond)
        loss = prdit_loss(out.x0_hat, out.eps_hat, x0, eps)
        if lf_weight > 0:
            loss = loss + lf_weight * F.mse_loss(F.avg_pool3d(out.x0_hat, self.scale), out.x0_low)
        return loss
