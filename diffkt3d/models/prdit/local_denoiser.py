"""PRDiT stage 1: the local MLP denoiser on overlapping 3D patches (PRDiT paper, section 3.1, A.5).

Each overlapping p^3 patch of the noisy volume is flattened to v_i^t in R^d (d = C p^3) and denoised
on its own, with no knowledge of where it lies:

    c       = TimeEmbed(t)                       shared base embedding (R^h)
    c_local = W_c c + b_c                        branch-specific (R^d)
    (shift1, scale1, shift2, scale2) = AdaLN(c_local)
    z1 = SwiGLU(LN(v^t) (1 + scale1) + shift1)
    z2 = SwiGLU(LN(z1) (1 + scale2) + shift2)
    z  = z2 + v^t
    [x_hat_i, eps_hat_i] = W_final z             central s^3 cell of the patch, C channels each

The paper writes the modulation as gamma * LN + beta; we use DiT's ``(1 + scale)`` form so that the
zero-initialised AdaLN (table 9) starts at the plain LayerNorm instead of a zero input. The final
linear layer is zero-initialised as well, so an untrained denoiser predicts x_hat = eps_hat = 0.

Conditioning (our addition for CT imputation; the paper is unconditional): the condition volumes
(B, C_c, D, H, W) are cut into the same overlapping patches and added to v^t through a
zero-initialised linear map, v_in = v^t + W_cond vec(cond_i), which then replaces v^t above
(including the residual). Concatenating them as extra input features instead would grow the
width to (C + C_c) p^3 and the MLP cost by (1 + C_c)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffkt3d.models.layers import modulate
from diffkt3d.models.prdit.blocks import SwiGLU, TimestepEmbedder
from diffkt3d.models.prdit.config import PRDiTConfig
from diffkt3d.models.prdit.patches import extract_patches, fold_stride_grid, token_grid

__all__ = ["LocalDenoiser", "LocalOutput"]


@dataclass
class LocalOutput:
    """Local predictions and the intermediates the global DiT reuses.

    Attributes:
        x0_hat, eps_hat: (B, C, D, H, W) predicted clean volume and noise.
        tokens: (B, N, 2 C s^3) the same predictions per patch ([x_hat_i, eps_hat_i]).
        noisy_patches: (B, N, (C + C_c) p^3) flattened noisy patches, conditions appended.
        c: (B, h) base time embedding (shared with the global branch).
        grid: (D/s, H/s, W/s) token grid.
    """

    x0_hat: Tensor
    eps_hat: Tensor
    tokens: Tensor
    noisy_patches: Tensor
    c: Tensor
    grid: tuple[int, int, int]


class LocalDenoiser(nn.Module):
    """Patch-wise MLP denoiser predicting x_hat and eps_hat on the stride grid.

    Args:
        config: patch geometry, channels, conditions and time-embedding sizes are read from it
            (the ``global_*`` fields are ignored here).
    """

    def __init__(self, config: PRDiTConfig):
        super().__init__()
        self.config = config
        d = config.patch_dim
        hidden = max(1, round(config.local_mlp_ratio * d))
        self.time_embed = TimestepEmbedder(config.time_freq_dim, config.time_dim)
        self.c_local = nn.Linear(config.time_dim, d)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(d, 4 * d))
        self.cond_proj = nn.Linear(config.cond_patch_dim, d) if config.cond_channels else None
        self.norm1 = nn.LayerNorm(d, eps=config.eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(d, eps=config.eps, elementwise_affine=False)
        self.mlp1 = SwiGLU(d, hidden, d)
        self.mlp2 = SwiGLU(d, hidden, d)
        self.final = nn.Linear(d, 2 * config.out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier linears; zero AdaLN, condition projection and final layer (table 9)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero AdaLN: both blocks start as plain LayerNorm -> SwiGLU.
        nn.init.zeros_(self.adaln[-1].weight)
        nn.init.zeros_(self.adaln[-1].bias)
        # Zero condition projection: the conditional model starts as the unconditional one.
        if self.cond_proj is not None:
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)
        # Zero output head: predictions start at 0 (and a residual refiner at its base estimate).
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> LocalOutput:
        """Denoise every patch independently.

        Args:
            x_t: (B, C, D, H, W) noisy volume; D, H, W multiples of the stride.
            t: (B,) timesteps in [0, T] (float allowed).
            cond: (B, C_c, D, H, W) condition volumes in ``config.conditions`` order, or None
                for an unconditional config.
        """
        cfg = self.config
        b, c = x_t.shape[:2]
        if c != cfg.in_channels:
            raise ValueError(f"x_t must have {cfg.in_channels} channel(s) (B, C, D, H, W), found shape {tuple(x_t.shape)}")
        grid = token_grid(tuple(x_t.shape[2:]), cfg.stride)
        # 1. Overlapping patches, flattened.
        v_t = extract_patches(x_t, cfg.patch_size, cfg.stride, cfg.padding, cfg.pad_mode)  # (B, N, d)
        v_in = v_t
        noisy_patches = v_t
        if self.cond_proj is not None:
            if cond is None or cond.shape[1] != cfg.cond_channels or cond.shape[2:] != x_t.shape[2:]:
                found = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must be (B, {cfg.cond_channels}, {', '.join(map(str, x_t.shape[2:]))}) "
                                 f"stacked {list(cfg.conditions)}, found {found}")
            cond_patches = extract_patches(
                cond.to(x_t.dtype), cfg.patch_size, cfg.stride, cfg.padding, cfg.pad_mode
            )  # (B, N, C_c p^3)
            v_in = v_t + self.cond_proj(cond_patches)  # (B, N, d)
            noisy_patches = torch.cat([v_t, cond_patches], dim=-1)  # (B, N, (C + C_c) p^3)
        # 2. Time conditioning: shared base embedding, local projection, AdaLN parameters.
        c_base = self.time_embed(t)  # (B, h)
        c_loc = self.c_local(c_base)  # (B, d)
        shift1, scale1, shift2, scale2 = self.adaln(c_loc)[:, None, :].chunk(4, dim=-1)  # 4 x (B, 1, d)
        # 3. Two AdaLN-modulated SwiGLU blocks and the residual from the (conditioned) input.
        z1 = self.mlp1(modulate(self.norm1(v_in), shift1, scale1).to(v_in.dtype))  # (B, N, d)
        z2 = self.mlp2(modulate(self.norm2(z1), shift2, scale2).to(v_in.dtype))  # (B, N, d)
        z = z2 + v_in
        # 4. Linear head -> [x_hat_i, eps_hat_i] on each central s^3 cell, folded back to volumes.
        tokens = self.final(z)  # (B, N, 2 C s^3)
        x_tok, eps_tok = tokens.chunk(2, dim=-1)  # 2 x (B, N, C s^3)
        x0_hat = fold_stride_grid(x_tok, grid, c, cfg.stride)  # (B, C, D, H, W)
        eps_hat = fold_stride_grid(eps_tok, grid, c, cfg.stride)  # (B, C, D, H, W)
        return LocalOutput(x0_hat, eps_hat, tokens, noisy_patches, c_base, grid)
