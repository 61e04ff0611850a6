"""Geometric dose prior: the spread against brute-force definitions, and its place in the dose head."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.config import DiTConfigError, get_config
from diffkt3d.models.dose_prior import dilate_max, prior_basis, spread_prescription

torch.set_num_threads(1)

PRIOR = {"prediction": "x0", "dose_head": {"prior_falloffs": [0.75, 0.92], "prior_weights": [0.85, 0.15]}}


def test_dilate_max_is_scipy_maximum_filter():
    x = torch.rand(2, 3, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    expected = ndimage.maximum_filter(x.numpy(), size=(1, 1, 3, 3, 3), mode="nearest")
    assert torch.equal(dilate_max(x), torch.from_numpy(expected))


def test_spread_equals_brute_force_max_product():
    """P(x) = max_y rx(y) g^chebyshev(x, y), written out voxel by voxel (reach covers the volume)."""
    gen = torch.Generator().manual_seed(1)
    rx = (torch.rand(1, 1, 5, 6, 4, generator=gen) > 0.85).float() * torch.rand(1, 1, 5, 6, 4, generator=gen)
    g = 0.7
    got = spread_prescription(rx, g, iterations=10)[0, 0].numpy()
    src = rx[0, 0].numpy()
    shape = src.shape
    expected = np.zeros(shape, dtype=np.float32)
    for x in itertools.product(*map(range, shape)):
        best = 0.0
        for y in itertools.product(*map(range, shape)):
            d = max(abs(a - b) for a, b in zip(x, y, strict=True))
            best = max(best, float(src[y]) * g**d)
        expected[x] = best
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_spread_keeps_prescription_inside_targets_and_respects_reach():
    rx = torch.zeros(1, 1, 9, 9, 9)
    rx[0, 0, 4, 4, 4] = 0.875  # 70 Gy of 80
    p = spread_prescription(rx, 0.5, iterations=2)
    assert p[0, 0, 4, 4, 4] == pytest.approx(0.875)
    assert p[0, 0, 4, 4, 6] == pytest.approx(0.875 * 0.25)
    assert p[0, 0, 4, 4, 7] == 0.0  # beyond the reach


def test_prior_basis_masks_outside_body():
    ptv = -torch.ones(1, 1, 8, 8, 8)
    ptv[..., 3:5, 3:5, 3:5] = 2 * 70 / 80 - 1
    body = torch.ones_like(ptv)
    body[..., :, :, :2] = -1
    maps = prior_basis(ptv, body, (0.8, 0.9), iterations=10)
    assert maps.shape == (1, 2, 8, 8, 8)
    assert torch.all(maps[..., :2] == 0)
    assert maps[0, 0, 4, 4, 4] == pytest.approx(70 / 80)
    assert maps[0, 1, 4, 4, 7] > maps[0, 0, 4, 4, 7] > 0  # slower falloff reaches further


def test_fresh_model_with_prior_predicts_the_prior_mix():
    """Zero-initialised head: residual 0 and weights w0, so x0_hat is exactly the fitted prior mix."""
    cfg = get_config("tiny", **PRIOR)
    model = Any2AnyDiT(cfg).eval()
    gen = torch.Generator().manual_seed(2)
    vols = {m: torch.rand(1, cfg.in_channels[m], 8, 8, 8, generator=gen) * 2 - 1 for m in cfg.modalities}
    t = torch.tensor([0.6])
    with torch.no_grad():
        x0_hat = vols["dose"] - t * model(vols, "dose", t)
    basis = prior_basis(vols["ptv"], vols["body"], (0.75, 0.92), cfg.dose_head.prior_reach)
    expected = 2 * (0.85 * basis[:, :1] + 0.15 * basis[:, 1:]) - 1
    torch.testing.assert_close(x0_hat, expected, rtol=0, atol=1e-5)
    # Without the prescription map there is no prior: x0_hat is the (zero) residual.
    del vols["ptv"]
    with torch.no_grad():
        x0_no_ptv = vols["dose"] - t * model(vols, "dose", t)
    torch.testing.assert_close(x0_no_ptv, torch.zeros_like(x0_no_ptv), rtol=0, atol=1e-5)


def test_prior_only_changes_the_dose_head():
    cfg = get_config("tiny", **PRIOR)
    model = Any2AnyDiT(cfg)
    assert model.head.head["dose"].out_features == 3 * cfg.patch_volume  # residual + 2 weights
    assert model.head.head["ct"].out_features == cfg.patch_volume
    vols = {m: torch.zeros(1, cfg.in_channels[m], 8, 8, 8) for m in cfg.modalities}
    assert model(vols, "ct", torch.tensor([0.5])).shape == (1, 1, 8, 8, 8)


def test_prior_gradients_reach_the_weight_channels():
    cfg = get_config("tiny", **PRIOR)
    model = Any2AnyDiT(cfg)
    vols = {m: torch.rand(1, cfg.in_channels[m], 8, 8, 8) * 2 - 1 for m in cfg.modalities}
    t = torch.tensor([0.5])
    loss = (vols["dose"] - t * model(vols, "dose", t)).pow(2).mean()
    loss.backward()
    grad = model.head.head["dose"].weight.grad.view(3, cfg.patch_volume, -1)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dose_head": {"prior_falloffs": [0.8], "prior_weights": [0.5, 0.5]}, "prediction": "x0"},
         "one weight per falloff"),
        ({"dose_head": {"prior_falloffs": [1.2], "prior_weights": [1.0]}, "prediction": "x0"}, r"lie in \(0, 1\)"),
        ({"dose_head": {"prior_falloffs": [0.8], "prior_weights": [1.0]}, "prediction": "v"}, "prediction='x0'"),
        ({"dose_head": {"prior_weights": [1.0]}, "prediction": "x0"}, r"without dose_head.prior_falloffs"),
    ],
)
def test_bad_prior_configs_name_the_problem(overrides, message):
    with pytest.raises(DiTConfigError, match=message):
        get_config("tiny", **overrides)


def test_prior_config_round_trips_through_a_dict():
    cfg = get_config("tiny", **PRIOR)
    again = type(cfg).from_dict(cfg.to_dict())
    assert again == cfg and again.dose_head.prior_falloffs == (0.75, 0.92)
