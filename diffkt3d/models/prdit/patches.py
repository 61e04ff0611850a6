"""Overlapping 3D patch extraction and reassembly on the non-overlapping stride grid.

PRDiT (paper section 3.1) reads overlapping p^3 patches with stride s < p and predicts, for
each patch, only its central s^3 voxels. With p = s + 2 * padding and the volume padded by
``padding`` voxels on every side, patch i starts at i * s in padded coordinates and its centre
cell covers exactly voxels [i * s, (i + 1) * s) of the unpadded volume. The predictions therefore
tile the volume without overlap: reassembly is a pure reshape (a "pixel shuffle" in 3D), no
averaging, so a volume comes back bit-exactly. ``Tensor.unfold`` (a strided view) does the
extraction; only the final ``reshape`` copies.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["token_grid", "extract_patches", "center_crop_patches", "patchify_stride_grid", "fold_stride_grid"]


def token_grid(spatial: tuple[int, ...], stride: int) -> tuple[int, int, int]:
    """(D, H, W) -> (D/s, H/s, W/s) patches per axis.

    Raises:
        ValueError: a spatial size is not a positive multiple of the stride (the stride cells
            must tile the volume exactly); the message names the sizes.
    """
    if len(spatial) != 3 or any(n < stride or n % stride for n in spatial):
        raise ValueError(
            f"volume size (D, H, W) = {tuple(spatial)} must be positive multiples of the patch stride {stride}"
        )
    return spatial[0] // stride, spatial[1] // stride, spatial[2] // stride


def extract_patches(
    x: Tensor, patch_size: int, stride: int, padding: int, pad_mode: str = "constant"
) -> Tensor:
    """Flattened overlapping patches of a volume.

    Args:
        x: (B, C, D, H, W) volume; D, H, W multiples of ``stride``.
        patch_size, stride, padding: p, s and pad with p = s + 2 * pad.
        pad_mode: ``F.pad`` mode for the border ("constant" pads zeros).

    Returns:
        (B, N, C * p^3) with N = (D/s)(H/s)(W/s) in C-order over (d, h, w) patch indices; each row
        is ``vec(x_i)`` in (C, p, p, p) order.
    """
    assert patch_size == stride + 2 * padding, "patch must be centred on its stride cell"
    b, c = x.shape[:2]
    nd, nh, nw = token_grid(tuple(x.shape[2:]), stride)
    if padding:
        x = F.pad(x, (padding,) * 6, mode=pad_mode)
    p = patch_size
    windows = x.unfold(2, p, stride).unfold(3, p, stride).unfold(4, p, stride)  # (B, C, nd, nh, nw, p, p, p)
    windows = windows.permute(0, 2, 3, 4, 1, 5, 6, 7)  # (B, nd, nh, nw, C, p, p, p)
    return windows.reshape(b, nd * nh * nw, c * p**3)  # (B, N, C p^3)


def center_crop_patches(patches: Tensor, channels: int, patch_size: int, padding: int) -> Tensor:
    """(B, N, C * p^3) -> (B, N, C * s^3): the central stride cell of each flattened patch."""
    b, n = patches.shape[:2]
    p, s = patch_size, patch_size - 2 * padding
    cube = patches.reshape(b, n, channels, p, p, p)
    cube = cube[..., padding : padding + s, padding : padding + s, padding : padding + s]
    return cube.reshape(b, n, channels * s**3)


def patchify_stride_grid(x: Tensor, stride: int) -> Tensor:
    """(B, C, D, H, W) -> (B, N, C * s^3): the non-overlapping stride cells (inverse of the fold)."""
    b, c = x.shape[:2]
    nd, nh, nw = token_grid(tuple(x.shape[2:]), stride)
    s = stride
    cells = x.reshape(b, c, nd, s, nh, s, nw, s).permute(
        0, 2, 4, 6, 1, 3, 5, 7
    )  # (B, nd, nh, nw, C, s, s, s)
    return cells.reshape(b, nd * nh * nw, c * s**3)


def fold_stride_grid(tokens: Tensor, grid: tuple[int, int, int], channels: int, stride: int) -> Tensor:
    """(B, N, C * s^3) per-patch predictions -> (B, C, D, H, W) volume, D = grid[0] * s etc."""
    b = tokens.shape[0]
    nd, nh, nw = grid
    s = stride
    assert tokens.shape[1] == nd * nh * nw and tokens.shape[2] == channels * s**3, (
        "token shape does not match grid"
    )
    cells = tokens.reshape(b, nd, nh, nw, channels, s, s, s).permute(
        0, 4, 1, 5, 2, 6, 3, 7
    )  # (B, C, nd, s, nh, s, nw, s)
    return cells.reshape(b, channels, nd * s, nh * s, nw * s)
