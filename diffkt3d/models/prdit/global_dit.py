"""PRDiT stage 2: the global residual DiT (PRDiT paper, section 3.2, A.9 table 10).

The local denoiser sees one patch at a time; this transformer sees all patches at once and predicts
residuals that correct the local estimates across patch boundaries:

    x_tilde = x_hat + dx_hat,   eps_tilde = eps_hat + deps_hat     (trained with the local frozen)

Token i is a linear embedding of [noisy patch v_i^t (with its condition patches), x_hat_i, eps_hat_i]
plus fixed 3D sin/cos positions (the only place PRDiT sees positions, figure 1). The paper does not
spell out the token input; feeding the local predictions lets the DiT see what it must correct.
Blocks are DiT blocks with adaLN-Zero driven by c_fine = W_f c + b_f from the shared base time
embedding, attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels where the device has them), GELU(tanh) MLP. The output head is zero-
initialised, so stage 2 starts exactly at the local denoiser's prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkt3d.models.layers import modulate
from diffkt3d.models.prdit.blocks import sincos_3d
from diffkt3d.models.prdit.config import PRDiTConfig

__all__ = ["GlobalResidualDiT", "DiTBlock"]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero (Peebles & Xie 2023): 6 modulation vectors."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        hidden = max(1, round(mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, N, dim) tokens, c (B, dim) time conditioning -> (B, N, dim)."""
        b, n, dim = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c)[:, None, :].chunk(
            6, dim=-1
        )  # 6 x (B, 1, dim)
        # 1. Self-attention over all patch tokens.
        h = modulate(self.norm1(x), shift1, scale1).to(x.dtype)  # (B, N, dim)
        q, k, v = (
            self.qkv(h).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        )  # 3 x (B, heads, N, hd)
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd)
        attn = attn.transpose(1, 2).reshape(b, n, dim)  # (B, N, dim)
        x = x + gate1 * self.proj(attn)
        # 2. Feed-forward.
        h = modulate(self.norm2(x), shift2, scale2).to(x.dtype)
        return x + gate2 * self.mlp(h)


class GlobalResidualDiT(nn.Module):
    """Transformer over all patch tokens predicting residuals [dx_hat_i, deps_hat_i] per stride cell.

    Args:
        config: ``global_depth`` (>= 1), ``global_hidden``, ``global_heads``, ``global_mlp_ratio``,
            plus the patch geometry and channels shared with the local denoiser.
    """

    def __init__(self, config: PRDiTConfig):
        super().__init__()
        assert config.global_depth >= 1, "GlobalResidualDiT needs global_depth >= 1"
        self.config = config
        dim = config.global_hidden
        token_in = config.patch_dim + config.cond_patch_dim + 2 * config.out_dim
        self.token_embed = nn.Linear(token_in, dim)
        self.c_fine = nn.Linear(config.time_dim, dim)
        self.blocks = nn.ModuleList(
            [
                DiTBlock(dim, config.global_heads, config.global_mlp_ratio, config.eps)
                for _ in range(config.global_depth)
            ]
        )
        self.norm_out = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.adaln_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.head = nn.Linear(dim, 2 * config.out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier linears; adaLN-Zero gates and the residual head at zero (table 10)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaln[-1].weight)
            nn.init.zeros_(block.adaln[-1].bias)
        # Zero residual head: stage 2 starts from the frozen local prediction.
        nn.init.zeros_(self.adaln_out[-1].weight)
        nn.init.zeros_(self.adaln_out[-1].bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, noisy_patches: Tensor, local_tokens: Tensor, c: Tensor, grid: tuple[int, int, int]
    ) -> Tensor:
        """Residuals for every patch.

        Args:
            noisy_patches: (B, N, (C + C_c) p^3) flattened noisy (and condition) patches.
            local_tokens: (B, N, 2 C s^3) local predictions [x_hat_i, eps_hat_i].
            c: (B, h) shared base time embedding.
            grid: token grid (N = prod(grid)), for the positions.

        Returns:
            (B, N, 2 C s^3) residuals [dx_hat_i, deps_hat_i].
        """
        # 1. Token embedding + fixed 3D sin/cos positions.
        x = self.token_embed(torch.cat([noisy_patches, local_tokens], dim=-1))  # (B, N, dim)
        x = x + sincos_3d(grid, x.shape[-1], device=x.device).to(x.dtype)[None]  # (B, N, dim)
        # 2. Time conditioning of the global branch.
        c_fine = self.c_fine(c)  # (B, dim)
        # 3. DiT blocks.
        for block in self.blocks:
            x = block(x, c_fine)  # (B, N, dim)
        # 4. Modulated output head -> residuals.
        shift, scale = self.adaln_out(c_fine)[:, None, :].chunk(2, dim=-1)  # 2 x (B, 1, dim)
        return self.head(modulate(self.norm_out(x), shift, scale).to(x.dtype))  # (B, N, 2 C s^3)
