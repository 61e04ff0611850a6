"""Overlapping patch extraction and stride-grid reassembly of PRDiT, checked against slicing."""

import pytest
import torch
import torch.nn.functional as F

from diffkt3d.models.prdit.patches import (
    center_crop_patches,
    extract_patches,
    fold_stride_grid,
    patchify_stride_grid,
    token_grid,
)

GEOMETRIES = [(12, 8, 2), (6, 4, 1), (8, 8, 0)]  # paper default, tiny, no overlap


@pytest.mark.parametrize("p,s,pad", GEOMETRIES)
def test_patches_match_explicit_slices(p, s, pad):
    x = torch.randn(2, 3, 2 * s, 3 * s, s)
    patches = extract_patches(x, p, s, pad)
    nd, nh, nw = 2, 3, 1
    assert patches.shape == (2, nd * nh * nw, 3 * p**3)
    padded = F.pad(x, (pad,) * 6)  # zeros, the default pad mode
    i = 0
    for a in range(nd):
        for b in range(nh):
            for c in range(nw):
                ref = padded[:, :, a * s : a * s + p, b * s : b * s + p, c * s : c * s + p].reshape(2, -1)
                assert torch.equal(patches[:, i], ref)
                i += 1


@pytest.mark.parametrize("p,s,pad", GEOMETRIES)
def test_overlapping_patches_reassemble_exactly(p, s, pad):
    # A constant volume comes back exactly, and so does any volume (no averaging of overlaps).
    const = torch.full((1, 1, 2 * s, 2 * s, 3 * s), -0.37)
    for x in (const, torch.randn(2, 2, 2 * s, s, 3 * s)):
        grid = token_grid(tuple(x.shape[2:]), s)
        cells = center_crop_patches(extract_patches(x, p, s, pad, "replicate"), x.shape[1], p, pad)
        assert torch.equal(fold_stride_grid(cells, grid, x.shape[1], s), x)
    # With replicate padding every overlapping patch of a constant volume is that constant.
    patches = extract_patches(const, p, s, pad, "replicate")
    assert torch.all(patches == -0.37)


def test_stride_grid_patchify_is_inverse_of_fold():
    x = torch.randn(2, 2, 8, 12, 4)
    tokens = patchify_stride_grid(x, 4)
    assert tokens.shape == (2, 2 * 3 * 1, 2 * 64)
    # token 1 is cell (0, 1, 0): voxels [0:4, 4:8, 0:4]
    assert torch.equal(tokens[:, 1], x[:, :, 0:4, 4:8, 0:4].reshape(2, -1))
    assert torch.equal(fold_stride_grid(tokens, (2, 3, 1), 2, 4), x)


def test_size_not_multiple_of_stride_is_a_clear_error():
    with pytest.raises(ValueError, match="multiples of the patch stride 8"):
        extract_patches(torch.zeros(1, 1, 16, 12, 16), 12, 8, 2)
