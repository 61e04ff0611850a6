"""Shared DiT layers against independent computations (numpy / complex arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkt3d.models.layers import (
    FP32LayerNorm,
    RMSNorm,
    apply_rope,
    modulate,
    rope_axis_dims,
    rope_cos_sin,
    sinusoidal_embedding,
)


def test_rmsnorm_matches_formula_and_keeps_dtype():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    xn = x.numpy().astype(np.float64)
    expected = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5, 16)
    np.testing.assert_allclose(norm(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_layernorm_has_no_affine_and_runs_in_fp32_under_autocast():
    ln = FP32LayerNorm(8)
    assert list(ln.parameters()) == []
    x = torch.randn(2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ln(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)


def test_sinusoid_matches_numpy_wan_formula():
    t = torch.tensor([0.0, 0.25, 1.0]) * 1000
    emb = sinusoidal_embedding(t, 256)
    half = 128
    angle = np.outer(t.numpy().astype(np.float64), 10000.0 ** (-np.arange(half) / half))
    expected = np.concatenate([np.cos(angle), np.sin(angle)], axis=1)
    assert emb.dtype == torch.float32 and emb.shape == (3, 256)
    np.testing.assert_allclose(emb.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    "head_dim, expected",
    [(128, (16, 40, 36, 36)), (24, (2, 10, 6, 6)), (32, (4, 12, 8, 8)), (64, (8, 20, 18, 18))],
)
def test_rope_axis_split(head_dim, expected):
    dims = rope_axis_dims(head_dim)
    assert dims == expected and sum(dims) == head_dim
    assert rope_axis_dims(head_dim, slot_dims=4)[0] == 4


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, dims, theta: float) -> torch.Tensor:
    """Wan-style reference: view channel pairs as complex numbers, multiply by exp(i * angle)."""
    b, n, h, d = x.shape
    xc = torch.view_as_complex(x.double().reshape(b, n, h, d // 2, 2))
    freqs = []
    for a, da in enumerate(dims):
        inv = 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64), torch.arange(0, da, 2).double() / da)
        freqs.append(
            torch.polar(
                torch.ones(n, da // 2, dtype=torch.float64), torch.outer(positions[:, a].double(), inv)
            )
        )
    f = torch.cat(freqs, dim=1)  # (N, d/2) complex
    return torch.view_as_real(xc * f[None, :, None, :]).reshape(b, n, h, d).float()


def test_apply_rope_matches_complex_reference_and_is_relative():
    dims = rope_axis_dims(32)
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 7, (10, 4), generator=gen)
    x = torch.randn(2, 10, 3, 32, generator=gen)
    cos, sin = rope_cos_sin(positions, dims, 10000.0)
    torch.testing.assert_close(
        apply_rope(x, cos, sin), _rope_complex(x, positions, dims, 10000.0), atol=1e-5, rtol=1e-5
    )

    # attention logits depend only on position differences: shift every token by the same offset
    q = torch.randn(1, 10, 1, 32, generator=gen)
    k = torch.randn(1, 10, 1, 32, generator=gen)

    def logits(pos):
        c, s = rope_cos_sin(pos, dims, 10000.0)
        return apply_rope(q, c, s)[0, :, 0] @ apply_rope(k, c, s)[0, :, 0].T

    torch.testing.assert_close(
        logits(positions), logits(positions + torch.tensor([3, 1, 2, 5])), atol=1e-4, rtol=1e-4
    )
    # ... and a different slot offset between tokens changes them
    moved = positions.clone()
    moved[0, 0] += 1
    assert not torch.allclose(logits(positions), logits(moved), atol=1e-4)


def test_modulate_is_fp32_under_autocast():
    x = torch.randn(2, 3, 8).bfloat16()
    shift, scale = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = modulate(x, shift, scale)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() * (1 + scale) + shift)
