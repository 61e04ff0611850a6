"""Voxel-level dose refiner: neutral when fresh, local (conv) or grid-wide (U-Net), fed by the conditions, trainable."""

from __future__ import annotations

import pytest
import torch

from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.config import DiTConfigError, get_config
from diffkt3d.models.dose_prior import prior_basis

torch.set_num_threads(1)

PRIOR_HEAD = {"prior_falloffs": [0.75, 0.92], "prior_weights": [0.85, 0.15]}
PRIOR = {"prediction": "x0", "dose_head": PRIOR_HEAD}
REFINER_HEAD = {**PRIOR_HEAD, "refiner_width": 6, "refiner_features": 3, "refiner_kernels": [3, 3]}
REFINER = {"prediction": "x0", "dose_head": REFINER_HEAD}
# Patch 8: the U-Net needs a 32^3 grid, and 8^3 patches keep the DiT part of it cheap.
UNET = {"prediction": "x0", "patch": [8, 8, 8], "dose_head": {**REFINER_HEAD, "refiner_unet": [4, 4, 8, 8, 8, 4]}}


def _head(**fields):
    """Overrides of the tiny preset with a dose head of the prior plus ``fields``."""
    return {"prediction": "x0", "dose_head": {**PRIOR_HEAD, **fields}}


def _volumes(cfg, seed=0, size=8):
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.rand(1, cfg.in_channels[m], size, size, size, generator=gen) * 2 - 1 for m in cfg.modalities}


def _x0(model, vols, t=0.6):
    t = torch.tensor([t])
    with torch.no_grad():
        return vols["dose"] - t * model(vols, "dose", t)


def _randomise_refiner_output(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model.target_heads["dose"].refiner.out
        out.weight.copy_(torch.randn(out.weight.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("refiner, size", [(REFINER, 8), (UNET, 32)], ids=["conv", "unet"])
def test_fresh_refiner_leaves_the_prior_mix_unchanged(refiner, size):
    cfg = get_config("tiny", **refiner)
    model = Any2AnyDiT(cfg).eval()
    vols = _volumes(cfg, size=size)
    basis = prior_basis(vols["ptv"], vols["body"], (0.75, 0.92), cfg.dose_head.prior_reach)
    expected = 2 * (0.85 * basis[:, :1] + 0.15 * basis[:, 1:]) - 1
    torch.testing.assert_close(_x0(model, vols), expected, rtol=0, atol=1e-5)


def test_head_emits_the_refiner_features_and_other_heads_are_untouched():
    cfg = get_config("tiny", **REFINER)
    model = Any2AnyDiT(cfg)
    assert model.head.head["dose"].out_features == (1 + 2 + 3) * cfg.patch_volume
    assert model.head.head["ct"].out_features == cfg.patch_volume
    assert get_config("tiny").dose_head is None and "dose" not in Any2AnyDiT(get_config("tiny")).target_heads


def test_refiner_is_exactly_local_in_the_conditions():
    """A one-voxel change of a condition moves the refined dose within 2 voxels (two 3^3 convs).

    The head is zeroed so that its tokens, which attention spreads over the whole volume, do not
    move; what is left is the refiner reading the condition at voxel level.
    """
    cfg = get_config("tiny", **REFINER)
    model = Any2AnyDiT(cfg).eval()
    _randomise_refiner_output(model)
    with torch.no_grad():
        model.head.head["dose"].weight.zero_()
        model.head.head["dose"].bias.zero_()
    vols = _volumes(cfg, size=12)
    base = _x0(model, vols)
    changed = {k: v.clone() for k, v in vols.items()}
    changed["beam"][0, 0, 6, 6, 6] += 0.7
    diff = (_x0(model, changed) - base).abs()[0, 0]
    near = diff[4:9, 4:9, 4:9]
    assert near.max() > 0
    far = diff.clone()
    far[4:9, 4:9, 4:9] = 0
    assert far.max() == 0


def test_unet_refiner_reaches_across_the_grid():
    """With ``refiner_unet`` a one-voxel change of a condition moves the dose at the far corner
    too (the conv stack above stays within 2 voxels): the multi-scale body the option is for."""
    cfg = get_config("tiny", **UNET)
    model = Any2AnyDiT(cfg).eval()
    assert any(type(m).__name__ == "BasicUNet" for m in model.target_heads["dose"].refiner.modules())
    _randomise_refiner_output(model)
    with torch.no_grad():
        model.head.head["dose"].weight.zero_()
        model.head.head["dose"].bias.zero_()
    vols = _volumes(cfg, size=32)
    changed = {k: v.clone() for k, v in vols.items()}
    changed["beam"][0, 0, 2, 2, 2] += 0.7
    diff = (_x0(model, changed) - _x0(model, vols)).abs()[0, 0]
    assert diff[24:, 24:, 24:].max() > 0


def test_unet_refiner_names_a_grid_it_cannot_halve():
    cfg = get_config("tiny", **UNET)
    with pytest.raises(ValueError, match=r"multiples of 16, at least 32 per axis; found \(8, 8, 8\)"):
        _x0(Any2AnyDiT(cfg), _volumes(cfg, size=8))


def test_absent_conditions_enter_as_zeros():
    cfg = get_config("tiny", **REFINER)
    model = Any2AnyDiT(cfg).eval()
    _randomise_refiner_output(model)
    vols = _volumes(cfg)
    few = {m: vols[m] for m in ("dose", "ptv", "body")}
    out = _x0(model, few)
    assert out.shape == (1, 1, 8, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, _x0(model, vols))
    # Without ptv there is no prior; the refined residual is still the prediction.
    assert torch.isfinite(_x0(model, {"dose": vols["dose"], "ct": vols["ct"]})).all()


@pytest.mark.parametrize("refiner, size, steps", [(REFINER, 8, 30), (UNET, 32, 20)], ids=["conv", "unet"])
def test_a_few_steps_on_one_case_train_the_refiner(refiner, size, steps):
    cfg = get_config("tiny", **refiner)
    torch.manual_seed(0)
    model = Any2AnyDiT(cfg)
    vols = _volumes(cfg, seed=4, size=size)
    x0 = vols["dose"].clone()
    opt = torch.optim.Adam(model.target_heads["dose"].refiner.parameters(), lr=3e-3)
    t = torch.tensor([0.5])
    losses = []
    for _ in range(steps):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
        inp = dict(vols, dose=(1 - t) * x0 + t * noise)
        loss = (inp["dose"] - t * model(inp, "dose", t) - x0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dose_head": {"refiner_width": 4}}, "prediction='x0'"),
        (_head(refiner_width=-1), r"dose_head.refiner_width must be >= 0"),
        (_head(refiner_width=4, refiner_kernels=[2]), "odd sizes"),
        (_head(refiner_width=4, refiner_features=0), r"dose_head.refiner_features"),
        (_head(refiner_width=4, refiner_unet=[4, 8]), "6 BasicUNet feature widths"),
        (_head(refiner_unet=[4, 4, 8, 8, 8, 4]), r"without dose_head.refiner_width"),
        ({"prediction": "x0", "dose_head": {"refiner_size": 4}}, "refiner_size"),
    ],
)
def test_bad_refiner_configs_name_the_problem(overrides, message):
    with pytest.raises(DiTConfigError, match=message):
        get_config("tiny", **overrides)


def test_refiner_config_round_trips_and_configs_without_it_load():
    cfg = get_config("tiny", **REFINER)
    again = type(cfg).from_dict(cfg.to_dict())
    assert again == cfg and again.dose_head.refiner_kernels == (3, 3) and again.dose_head.refiner_unet == ()
    unet = get_config("tiny", **UNET)
    assert type(unet).from_dict(unet.to_dict()).dose_head.refiner_unet == (4, 4, 8, 8, 8, 4)
    old = get_config("tiny", **PRIOR).to_dict()
    for key in ("refiner_width", "refiner_features", "refiner_kernels", "refiner_unet"):
        old["dose_head"].pop(key)
    assert type(cfg).from_dict(old).dose_head.refiner_width == 0
