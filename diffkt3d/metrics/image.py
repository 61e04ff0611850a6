"""Image-similarity metrics of the paper's tables (PSNR, SSIM), Dice for imputed masks, and HU MAE.

Data range (PSNR's peak and SSIM's ``L``): dose defaults to a FIXED 80 Gy
(:data:`diffkt3d.constants.DOSE_SCALE_GY`, the model's dose scale), not the per-case maximum,
so the figures of different cases and different models are comparable and a prediction cannot
change its own score by changing its hot spot. For CT pass ``data_range=2000`` (the width of
:data:`diffkt3d.constants.CT_WINDOW_HU`). PSNR and SSIM are computed over the whole array (the
crop the model sees), as MONAI does; pass a cropped array to restrict them.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from diffkt3d.constants import CT_WINDOW_HU, DOSE_SCALE_GY

__all__ = ["dice", "masked_mae_hu", "psnr", "ssim"]


def _as_batch(name: str, a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(D, H, W) or (H, W) array -> (1, 1, ...) float32 tensor on CPU."""
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    if t.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D array, got shape {tuple(t.shape)}")
    return t.detach().to(device="cpu", dtype=torch.float32)[None, None]


def _check_pair(pred, ref) -> None:
    if np.shape(pred) != np.shape(ref):
        raise ValueError(f"prediction and reference shapes differ: {np.shape(pred)} vs {np.shape(ref)}")


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float = DOSE_SCALE_GY) -> float:
    """Peak signal-to-noise ratio (dB): ``20 log10(data_range) - 10 log10(mean((pred-ref)^2))``.

    Args:
        pred, ref: arrays of the same shape, (D, H, W) or (H, W), in the same unit (Gy or HU).
        data_range: peak value (default 80 Gy; see module docstring).

    Returns:
        PSNR in dB; ``inf`` when the arrays are identical.
    """
    _check_pair(pred, ref)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    metric = PSNRMetric(max_val=float(data_range), reduction="none")
    return float(metric(_as_batch("pred", pred), _as_batch("ref", ref)).item())


def ssim(
    pred: np.ndarray,
    ref: np.ndarray,
    data_range: float = DOSE_SCALE_GY,
    win_size: int = 11,
    kernel_sigma: float = 1.5,
) -> float:
    """Mean structural similarity (MONAI ``SSIMMetric``: Gaussian window, K1 0.01, K2 0.03).

    The SSIM map is computed on the "valid" region (windows fully inside the array) and
    averaged; every spatial size must be >= ``win_size``.

    Args:
        pred, ref: arrays of the same shape, (D, H, W) or (H, W).
        data_range: ``L`` of the stability constants (default 80 Gy; see module docstring).
        win_size: Gaussian window width (voxels). kernel_sigma: its sigma (voxels).
    """
    _check_pair(pred, ref)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    if min(np.shape(ref)) < win_size:
        raise ValueError(f"SSIM needs every dimension >= win_size {win_size}, got shape {np.shape(ref)}")
    spatial_dims = len(np.shape(ref))
    metric = SSIMMetric(
        spatial_dims=spatial_dims, data_range=float(data_range), win_size=win_size,
        kernel_sigma=kernel_sigma, reduction="none",
    )
    return float(metric(_as_batch("pred", pred), _as_batch("ref", ref)).item())


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray, empty_value: float = 1.0) -> float:
    """Dice overlap ``2 |A & B| / (|A| + |B|)`` of two masks (non-zero = inside).

    Args:
        empty_value: returned when both masks are empty (default 1.0: both agree there is
            nothing; MONAI would return NaN).
    """
    _check_pair(pred_mask, ref_mask)
    a = np.asarray(pred_mask) > 0
    b = np.asarray(ref_mask) > 0
    denom = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if denom == 0:
        return float(empty_value)
    return 2.0 * int(np.count_nonzero(a & b)) / denom


def masked_mae_hu(
    pred_ct_hu: np.ndarray,
    ref_ct_hu: np.ndarray,
    mask: np.ndarray | None = None,
    clip_hu: tuple[float, float] | None = CT_WINDOW_HU,
) -> float:
    """Mean absolute CT error (HU) inside ``mask`` (e.g. the body), for CT imputation.

    Args:
        pred_ct_hu, ref_ct_hu: CT volumes in HU, same shape.
        mask: voxels to average over (non-zero = inside); None = whole volume.
        clip_hu: both volumes are clipped to this window first (default the model's
            [-1000, 1000] HU window: the model cannot represent values outside it, so errors
            there would measure the window, not the model). None disables clipping.

    Raises:
        ValueError: shape mismatch or empty mask.
    """
    _check_pair(pred_ct_hu, ref_ct_hu)
    pred = np.asarray(pred_ct_hu, dtype=np.float64)
    ref = np.asarray(ref_ct_hu, dtype=np.float64)
    if clip_hu is not None:
        pred = np.clip(pred, *clip_hu)
        ref = np.clip(ref, *clip_hu)
    err = np.abs(pred - ref)
    if mask is None:
        return float(err.mean())
    _check_pair(mask, ref_ct_hu)
    inside = np.asarray(mask) > 0
    if not inside.any():
        raise ValueError("mask is empty (0 voxels); cannot average the CT error")
    return float(err[inside].mean())
