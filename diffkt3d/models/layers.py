"""Shared layers of the Any2Any DiT: norms, timestep embedding, 4D RoPE, AdaLN modulation.

Numerics follow Wan 2.1 (``wan/modules/model.py``): the timestep embedding, the RoPE rotation and
the AdaLN modulation are computed in float32 even under bf16 autocast, because bf16 (8 mantissa
bits) cannot represent ``t * 1000`` phases or ``1 + scale`` close to 1 accurately.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "RMSNorm",
    "FP32LayerNorm",
    "sinusoidal_embedding",
    "rope_axis_dims",
    "wan_rope_axis_dims",
    "rope_cos_sin",
    "apply_rope",
    "modulate",
]


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis, computed in fp32, with a learned gain (Wan's q/k norm).

    Args:
        dim: size of the last axis.
        eps: added to the mean square (Wan: 1e-6).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., dim) -> same shape and dtype."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in fp32 and cast back (Wan's ``WanLayerNorm``); no affine by default."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., dim) -> same shape and dtype."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def sinusoidal_embedding(position: Tensor, dim: int) -> Tensor:
    """Wan's 1D sinusoidal embedding ``[cos, sin]`` in float64 -> float32.

    Args:
        position: (B,) positions, here ``t * time_scale`` with t in [0, 1] (Wan: timesteps 0-1000).
        dim: even embedding width (freq_dim).

    Returns:
        (B, dim) float32: ``cos(p * 10000^(-i/half))`` for i < half, then the sines.
    """
    assert dim % 2 == 0, "sinusoidal embedding width must be even"
    half = dim // 2
    pos = position.to(torch.float64)
    inv = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    angle = torch.outer(pos, inv)  # (B, half)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()


def rope_axis_dims(head_dim: int, slot_dims: int | None = None) -> tuple[int, int, int, int]:
    """Split the head dim between the 4 RoPE axes (slot, D, H, W), channels in that order.

    The slot (modality) axis gets ``max(2, 2 * (head_dim // 16))`` channels unless given; the rest
    ``r`` is split like Wan's t/h/w: ``D = r - 4 * (r // 6)``, ``H = W = 2 * (r // 6)``.
    E.g. head_dim 128 -> (16, 40, 36, 36); Wan's own 128 -> t/h/w (44, 42, 42). All even, because
    RoPE rotates adjacent channel pairs (2i, 2i+1), as in Wan (interleaved, not half-split).
    """
    slot = max(2, 2 * (head_dim // 16)) if slot_dims is None else slot_dims
    rest = head_dim - slot
    hw = 2 * (rest // 6)
    dims = (slot, rest - 2 * hw, hw, hw)
    assert all(d > 0 and d % 2 == 0 for d in dims), f"bad RoPE split {dims} for head_dim {head_dim}"
    return dims


def wan_rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan 2.1's RoPE split of the head dim over (t, h, w): ``h = w = 2 * (head_dim // 6)``, t the rest.

    Head dim 128 -> (44, 42, 42) (Wan 2.1 1.3B and 14B). Used by the Wan-compatible layout
    (``DiTConfig.rope_slot_stride > 0``), where D plays Wan's t axis.
    """
    hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * hw, hw, hw)
    assert all(d > 0 and d % 2 == 0 for d in dims), f"bad Wan RoPE split {dims} for head_dim {head_dim}"
    return dims


def rope_cos_sin(positions: Tensor, axis_dims: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables of the multi-axis RoPE, computed on the fly in float64 -> float32.

    Computed per call instead of stored: a buffer would be cast to bf16 by ``.to(dtype)`` (the trap
    Wan warns about) and token grids differ between calls anyway.

    Args:
        positions: (N, A) integer positions of each token along the A axes (slot, d, h, w).
        axis_dims: channels per axis (sum = head_dim), each even.
        theta: RoPE base period.

    Returns:
        cos, sin: (N, head_dim // 2) float32, one angle per channel pair, axes concatenated.
    """
    assert positions.shape[1] == len(axis_dims)
    angles = []
    for a, d in enumerate(axis_dims):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)
        angles.append(torch.outer(positions[:, a].to(torch.float64), inv))  # (N, d/2)
    angle = torch.cat(angles, dim=1)
    return torch.cos(angle).float(), torch.sin(angle).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` (B, N, heads, head_dim) by the token angles, in fp32.

    Pair (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), i.e. complex multiplication as in Wan.
    ``cos``/``sin``: (N, head_dim // 2). Returns the input dtype.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        b, n, h, d = x.shape
        pairs = x.float().reshape(b, n, h, d // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]  # (B, N, heads, d/2)
        c = cos[None, :, None, :]
        s = sin[None, :, None, :]
        out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)  # (B, N, heads, d/2, 2)
        return out.reshape(b, n, h, d).to(x.dtype)


def modulate(x_norm: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN: ``x_norm * (1 + scale) + shift`` in fp32 (shapes broadcast, e.g. (B, N, dim))."""
    with torch.autocast(device_type=x_norm.device.type, enabled=False):
        return x_norm.float() * (1.0 + scale.float()) + shift.float()


def init_modulation_table(rows: int, dim: int, zero: bool) -> nn.Parameter:
    """A (1, rows, dim) modulation table: zeros (adaLN-Zero) or Wan's ``randn / sqrt(dim)``."""
    if zero:
        return nn.Parameter(torch.zeros(1, rows, dim))
    return nn.Parameter(torch.randn(1, rows, dim) / math.sqrt(dim))
