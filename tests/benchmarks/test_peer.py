"""benchmarks/peer.py: the regression peer's loss regions and its input layout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from peer import CONDITIONS, body_channel, peer_loss, stack_inputs  # noqa: E402

from diffkt3d.data.encoding import EncodingConfig  # noqa: E402


def _case(enc: EncodingConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    chans = enc.channels()
    tensors = {m: torch.rand((chans[m], *enc.grid), generator=gen) * 2 - 1 for m in CONDITIONS}
    body = -torch.ones((1, *enc.grid))
    body[:, 2:6, 1:5, 3:7] = 1.0  # a box of body voxels; everything else is air (-1)
    body[:, 6, 2, 3] = -0.5  # a partial edge voxel still counts as body
    tensors["body"] = body
    return tensors


def test_body_channel_is_where_stack_inputs_puts_the_body() -> None:
    enc = EncodingConfig(grid=(8, 8, 8))
    tensors = _case(enc)
    stacked = stack_inputs(tensors, enc)
    assert torch.equal(stacked[body_channel(enc)], tensors["body"][0])


@pytest.mark.parametrize("region", ["all", "body"])
def test_peer_loss_matches_an_independent_masked_mean(region: str) -> None:
    enc = EncodingConfig(grid=(8, 8, 8))
    cases = [_case(enc, seed) for seed in (0, 1)]
    x = torch.stack([stack_inputs(c, enc) for c in cases])  # (2, C, 8, 8, 8)
    gen = torch.Generator().manual_seed(3)
    pred = torch.rand((2, 1, 8, 8, 8), generator=gen) * 2 - 1
    dose = torch.rand((2, 1, 8, 8, 8), generator=gen) * 2 - 1
    loss = peer_loss(pred, dose, x, enc, region)
    errors = (pred - dose).abs()
    if region == "all":
        expected = errors.mean()
    else:
        # Independent: the voxels of each case's body tensor above -1, gathered one by one.
        picked = [errors[i, 0][cases[i]["body"][0] > -1] for i in range(2)]
        expected = torch.cat(picked).mean()
        assert sum(p.numel() for p in picked) == 2 * (4 * 4 * 4 + 1)
        assert not torch.isclose(loss, errors.mean())
    assert torch.isclose(loss, expected)


def test_body_loss_ignores_air() -> None:
    enc = EncodingConfig(grid=(8, 8, 8))
    case = _case(enc)
    x = stack_inputs(case, enc)[None]
    dose = torch.zeros((1, 1, 8, 8, 8))
    pred = torch.where(case["body"][None] > -1, dose, torch.full_like(dose, 0.9))  # wrong in air only
    assert peer_loss(pred, dose, x, enc, "body") == 0
    assert peer_loss(pred, dose, x, enc, "all") > 0
