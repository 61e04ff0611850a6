"""Small layers of PRDiT that the shared ``diffkt3d.models.layers`` does not provide.

The sinusoidal timestep features and the AdaLN ``modulate`` come from ``diffkt3d.models.layers``
(in fp32, where the numerics need it); here: the shared base time embedding, SwiGLU and the fixed 3D
sin/cos positions of the global DiT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffkt3d.models.layers import sinusoidal_embedding

__all__ = ["TimestepEmbedder", "SwiGLU", "sincos_3d"]


class TimestepEmbedder(nn.Module):
    """Base time embedding c = TimeEmbed(t) in R^h, shared by the local and global branches.

    Args:
        freq_dim: width of the fp32 sin/cos features of t (t in timestep units, 0..T).
        dim: output width h.
    """

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """(B,) float timesteps (non-integer allowed: the samplers query t = T * l / L) -> (B, h)."""
        freq = sinusoidal_embedding(t.float(), self.freq_dim)  # (B, freq_dim) fp32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class SwiGLU(nn.Module):
    """SwiGLU MLP: ``W_out(silu(W_gate x) * W_up x)`` (Shazeer 2020), as in the PRDiT local denoiser."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.gate = nn.Linear(dim_in, hidden)
        self.up = nn.Linear(dim_in, hidden)
        self.out = nn.Linear(hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        return self.out(F.silu(self.gate(x)) * self.up(x))


def _sincos_1d(pos: Tensor, dim: int) -> Tensor:
    """(N,) positions -> (N, dim) [sin, cos] with periods 10000^(i / (dim/2)) (MAE / DiT style)."""
    half = dim // 2
    inv = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angle = torch.outer(pos.to(torch.float64), inv)  # (N, half)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


def sincos_3d(grid: tuple[int, int, int], dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed (non-learnable) 3D sin/cos positions of the token grid, computed in float64 -> fp32.

    One third of the channels per axis (d, h, w); ``dim`` must be a multiple of 6. Computed per
    call rather than stored: the token grid depends on the volume size, and a buffer would follow
    ``.to(bf16)`` and lose the phase precision.

    Returns:
        (N, dim) with N = prod(grid), tokens in C-order over (d, h, w) like ``extract_patches``.
    """
    assert dim % 6 == 0, "3D sin/cos positions need a width divisible by 6"
    axes = [torch.arange(n, device=device) for n in grid]
    dd, hh, ww = torch.meshgrid(*axes, indexing="ij")
    per_axis = dim // 3
    emb = [_sincos_1d(a.reshape(-1), per_axis) for a in (dd, hh, ww)]
    return torch.cat(emb, dim=1).float()  # (N, dim)
