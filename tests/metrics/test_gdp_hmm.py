"""GDP-HMM MAE vs a hand-computed case and a loop over voxels."""

from __future__ import annotations

import numpy as np
import pytest

from diffkt3d.metrics.gdp_hmm import gdp_hmm_cohort_mae, gdp_hmm_mae, gdp_hmm_norm_factor


def _hand_case():
    ref = np.array([35, 35, 35, 35, 10, 10, 2, 2, 0, 0], dtype=float)
    pred = np.array([70, 68, 70, 70, 20, 25, 6, 4, 0, 9], dtype=float)
    body = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    ptv = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    return ref, pred, body, ptv


def test_hand_case() -> None:
    ref, pred, body, ptv = _hand_case()
    s = 70.0 / (35.0 + 1e-5)
    assert gdp_hmm_norm_factor(ref, ptv, 70.0) == pytest.approx(s, rel=1e-12)
    # scaled ref ~ [70,70,70,70,20,20,4,4,0,0]; region = voxels 0-5 (ref > 5) + voxel 6 (pred 6 > 5);
    # voxel 9 (pred 9) is outside the body. Errors 0,2,0,0,0,5,2 -> 9 Gy over 6 reference voxels.
    ref_s = ref * s
    expected = (abs(ref_s - pred)[:7]).sum() / 6
    assert expected == pytest.approx(1.5, abs=1e-4)
    assert gdp_hmm_mae(ref, pred, body, ptv, 70.0) == pytest.approx(expected, rel=1e-12)


def test_scale_prediction_option() -> None:
    ref, _, body, ptv = _hand_case()
    # A prediction equal to the raw (un-normalised) reference: 0 only when scaled the same way.
    assert gdp_hmm_mae(ref, ref, body, ptv, 70.0, scale_prediction=True) == pytest.approx(0.0, abs=1e-9)
    assert gdp_hmm_mae(ref, ref, body, ptv, 70.0) > 10.0
    assert gdp_hmm_mae(ref * 2, ref * 2, body, ptv, 70.0, normalise_reference=False) == 0.0


def test_loop_reference_random() -> None:
    rng = np.random.default_rng(5)
    shape = (6, 7, 8)
    ref = rng.gamma(2.0, 12.0, shape)
    pred = ref + rng.normal(0, 4.0, shape)
    body = rng.random(shape) > 0.2
    ptv = rng.random(shape) > 0.7
    rx = 60.0
    ptv_vals = sorted(ref[ptv].tolist())
    rank = 0.03 * (len(ptv_vals) - 1)
    lo = int(rank)
    d97 = ptv_vals[lo] + (rank - lo) * (ptv_vals[lo + 1] - ptv_vals[lo])
    s = rx / (d97 + 1e-5)
    num = 0.0
    den = 0
    for idx in np.ndindex(shape):
        r, p = ref[idx] * s, pred[idx]
        if body[idx] and (r > 5 or p > 5):
            num += abs(r - p)
        if body[idx] and r > 5:
            den += 1
    assert gdp_hmm_mae(ref, pred, body, ptv, rx) == pytest.approx(num / den, rel=1e-12)
    assert gdp_hmm_cohort_mae([1.0, 2.0, 4.5]) == pytest.approx(2.5)


def test_errors() -> None:
    ref, pred, body, ptv = _hand_case()
    with pytest.raises(ValueError, match="PTV_High mask is empty"):
        gdp_hmm_mae(ref, pred, body, np.zeros_like(ptv), 70.0, case_id="p1")
    with pytest.raises(ValueError, match="shapes differ"):
        gdp_hmm_mae(ref, pred[:-1], body, ptv, 70.0)
    with pytest.raises(ValueError, match="prescription"):
        gdp_hmm_mae(ref, pred, body, ptv, 0.0)
    with pytest.raises(ValueError, match="no body voxel"):
        gdp_hmm_mae(ref, pred, np.zeros_like(body), ptv, 70.0)
