"""Augmentation: a mirror swaps Left/Right organs, rotation and shift move every modality alike."""

from __future__ import annotations

import math
import random

import pytest
import torch

from diffkt3d.errors import ConfigError
from diffkt3d.training import StageConfig
from diffkt3d.training.augment import Augmentation, _rotate_shift, augment_case, mirrored_channels

OARS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Larynx")


def blob_case(n: int = 16) -> dict[str, torch.Tensor]:
    """A case whose right parotid sits at low axis-1 indices (axis 1 runs right -> left)."""
    oar = -torch.ones(len(OARS), n, n, n)
    oar[2, 6:9, 2:5, 7:10] = 1.0  # RightParotid on the patient's right
    dose = -torch.ones(1, n, n, n)
    dose[0, 4:8, 1:6, 3:12] = 0.5
    ct = torch.linspace(-1, 1, n**3).view(1, n, n, n)
    return {"ct": ct, "oar": oar, "dose": dose}


def test_mirrored_channels_swaps_only_left_right_pairs():
    assert mirrored_channels(OARS) == [0, 1, 3, 2, 4]
    assert mirrored_channels(("Brainstem", "LeftLung")) == [0, 1]  # no partner: stays


def test_flip_mirrors_every_modality_and_keeps_the_left_channel_on_the_left():
    case = blob_case()
    out = augment_case(case, Augmentation(flip_lr=1.0), random.Random(0), OARS)
    assert torch.equal(out["dose"], case["dose"].flip(2))
    assert torch.equal(out["ct"], case["ct"].flip(2))
    # what was the right parotid is now on the left side of the image, and is named left
    assert torch.equal(out["oar"][3], case["oar"][2].flip(1))
    assert out["oar"][3, 6:9, 11:14, 7:10].min() == 1.0
    assert out["oar"][2].max() == -1.0  # the case had no left parotid to mirror
    assert torch.equal(out["oar"][0], case["oar"][0].flip(1))


def test_quarter_turn_is_a_rotation_of_the_axial_plane():
    x = torch.randn(2, 8, 8, 4)
    turned = _rotate_shift(x, math.pi / 2, [0.0, 0.0, 0.0])
    candidates = [torch.rot90(x, k, dims=(1, 2)) for k in (1, 3)]
    assert any(torch.allclose(turned, c, atol=1e-5) for c in candidates)


def test_integer_shift_moves_content_and_fills_with_empty():
    x = torch.rand(1, 8, 8, 8) * 2 - 1
    moved = _rotate_shift(x, 0.0, [2.0, 0.0, -1.0])
    assert torch.allclose(moved[:, 2:, :, :7], x[:, :6, :, 1:], atol=1e-5)
    assert torch.allclose(moved[:, :2], -torch.ones(1, 2, 8, 8), atol=1e-6)
    assert torch.allclose(moved[:, :, :, 7], -torch.ones(1, 8, 8), atol=1e-6)


def test_inactive_augmentation_is_the_identity_and_draws_nothing():
    case = blob_case()
    rng = random.Random(5)
    state = rng.getstate()
    assert augment_case(case, Augmentation(), rng, OARS) is case
    assert rng.getstate() == state


def test_random_draws_keep_shapes_range_and_dose_inside_the_grid():
    case = blob_case(16)
    rng = random.Random(1)
    for _ in range(5):
        out = augment_case(case, Augmentation(flip_lr=0.5, rotate_deg=20, shift_voxels=2), rng, OARS)
        for m, v in out.items():
            assert v.shape == case[m].shape and v.dtype == torch.float32
            assert float(v.min()) >= -1.0 - 1e-5 and float(v.max()) <= 1.0 + 1e-5
        # a dose blob 4 voxels from every edge stays nearly whole under 20 deg and 2 voxels
        assert float((out["dose"] + 1).sum()) == pytest.approx(float((case["dose"] + 1).sum()), rel=0.2)


@pytest.mark.parametrize("field,value", [("augment_flip_lr", 1.5), ("augment_rotate_deg", -1),
                                         ("augment_shift_voxels", -2), ("dvh_loss_weight", -0.1)])
def test_stage_refuses_out_of_range_settings(field, value):
    with pytest.raises(ConfigError, match=field):
        StageConfig("dose", **{field: value})
