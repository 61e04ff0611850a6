"""PSNR / SSIM (MONAI) vs written-out formulas with scipy filters; Dice vs hand counts and MONAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffkt3d.metrics.image import dice, masked_mae_hu, psnr, ssim

torch.set_num_threads(1)


def _smooth(rng, shape, scale=60.0):
    return ndimage.gaussian_filter(rng.random(shape), 2.0) * scale


def test_psnr_formula() -> None:
    rng = np.random.default_rng(0)
    ref = _smooth(rng, (12, 13, 14))
    pred = ref + rng.normal(0, 1.5, ref.shape)
    mse = np.mean((pred - ref) ** 2)
    assert psnr(pred, ref) == pytest.approx(20 * np.log10(80.0) - 10 * np.log10(mse), rel=1e-5)
    assert psnr(pred, ref, data_range=70.0) == pytest.approx(10 * np.log10(70.0**2 / mse), rel=1e-5)
    assert psnr(ref, ref) == np.inf
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(pred[:-1], ref)


def _ssim_reference(x, y, data_range, sigma=1.5, radius=5):
    """SSIM (Wang 2004) with scipy Gaussian filters, valid region only, population variances."""
    filt = lambda a: ndimage.gaussian_filter(a, sigma, truncate=radius / sigma, mode="constant")  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    crop = tuple(slice(radius, n - radius) for n in x.shape)
    return float(s[crop].mean())


@pytest.mark.parametrize("shape", [(16, 17, 18), (24, 26)])
def test_ssim_against_scipy_formula(shape) -> None:
    rng = np.random.default_rng(1)
    ref = _smooth(rng, shape)
    pred = 0.9 * ref + _smooth(rng, shape, 10.0) + rng.normal(0, 0.5, shape)
    expected = _ssim_reference(pred.astype(np.float64), ref.astype(np.float64), 80.0)
    assert ssim(pred, ref) == pytest.approx(expected, abs=2e-4)
    assert 0.3 < expected < 0.999  # not a trivial value
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="win_size"):
        ssim(ref[:8], ref[:8])


def test_dice_hand_counts_and_monai() -> None:
    a = np.zeros((5, 5, 5), dtype=np.uint8)
    b = np.zeros_like(a)
    a[0:2, 0:2, 0:2] = 1  # 8 voxels
    b[1:3, 0:2, 0:2] = 1  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert np.isnan(dice(np.zeros_like(a), np.zeros_like(a), empty_value=float("nan")))
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(2)
    p = rng.random((9, 10, 11)) > 0.5
    r = rng.random((9, 10, 11)) > 0.4
    monai_value = DiceMetric(include_background=True, reduction="none")(
        torch.as_tensor(p)[None, None].float(), torch.as_tensor(r)[None, None].float()
    ).item()
    assert dice(p, r) == pytest.approx(monai_value, rel=1e-6)


def test_masked_mae_hu() -> None:
    ref = np.array([[-1000.0, 0.0, 50.0, 3000.0]])
    pred = np.array([[-900.0, 10.0, 50.0, 1000.0]])
    mask = np.array([[1, 1, 0, 1]])
    # clipped to [-1000, 1000]: errors 100, 10, (masked out), 0 -> 110 / 3
    assert masked_mae_hu(pred, ref, mask) == pytest.approx(110 / 3)
    # unclipped: 100, 10, 2000 -> 2110 / 3
    assert masked_mae_hu(pred, ref, mask, clip_hu=None) == pytest.approx(2110 / 3)
    assert masked_mae_hu(pred, ref) == pytest.approx(110 / 4)
    with pytest.raises(ValueError, match="empty"):
        masked_mae_hu(pred, ref, np.zeros_like(mask))
