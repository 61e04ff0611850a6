"""The DVH-aware moment loss against an independent numpy computation of the same moments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkt3d.training.dvh_loss import (
    FLOOR,
    OAR_POWERS,
    PTV_POWERS,
    generalized_mean,
    moment_loss,
    structure_weights,
)

SCALE = 80.0


def encode_gy(gy: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gy / SCALE * 2 - 1).float()


def make_case(rng: np.random.Generator, n: int = 12):
    ptv_gy = np.zeros((n, n, n))
    ptv_gy[3:6, 3:7, 3:7] = 70.0
    ptv_gy[7:10, 4:8, 4:8] = 56.0
    oar = -np.ones((2, n, n, n))
    oar[0, 1:3, 8:11, 1:4] = 1.0  # whole voxels
    oar[1, 8:11, 1:3, 8:11] = 0.0  # half-covered voxels: weight 0.5
    dose_gy = rng.uniform(0, 75, size=(n, n, n))
    vols = {"ptv": encode_gy(ptv_gy)[None, None], "oar": torch.from_numpy(oar).float()[None]}
    return vols, ptv_gy, oar, dose_gy


def numpy_moment(d: np.ndarray, w: np.ndarray, p: float) -> float:
    return float((np.sum(w * d**p) / np.sum(w)) ** (1 / p))


def test_generalized_mean_limits():
    d = torch.tensor([[0.2, 0.5, 0.9]])
    w = torch.ones_like(d)
    assert float(generalized_mean(d, w, 1.0)) == pytest.approx(float(d.mean()))
    assert float(generalized_mean(d, w, 60.0)) == pytest.approx(0.9, rel=0.03)
    assert float(generalized_mean(d, w, -60.0)) == pytest.approx(0.2, rel=0.03)


def test_structures_are_each_oar_and_each_prescription_level():
    vols, _, _, _ = make_case(np.random.default_rng(0))
    structures = structure_weights(vols, SCALE)
    assert [p for _, p in structures] == [OAR_POWERS, OAR_POWERS, PTV_POWERS, PTV_POWERS]
    sums = [float(w.sum()) for w, _ in structures]
    assert sums == pytest.approx([2 * 3 * 3, 0.5 * 3 * 2 * 3, 3 * 4 * 4, 3 * 4 * 4])


def test_moment_loss_matches_an_independent_computation():
    rng = np.random.default_rng(1)
    vols, ptv_gy, oar, ref_gy = make_case(rng)
    pred_gy = np.clip(ref_gy + rng.normal(0, 8, size=ref_gy.shape), 0, None)
    got = float(moment_loss(encode_gy(pred_gy)[None, None], encode_gy(ref_gy)[None, None], vols, SCALE))
    expected = []
    d_pred = np.maximum(pred_gy / SCALE, FLOOR)
    d_ref = np.maximum(ref_gy / SCALE, FLOOR)
    for k in range(2):
        w = (oar[k] + 1) / 2
        expected += [abs(numpy_moment(d_pred, w, p) - numpy_moment(d_ref, w, p)) for p in OAR_POWERS]
    for level in (56.0, 70.0):
        w = (np.round(ptv_gy) == level).astype(float)
        expected += [abs(numpy_moment(d_pred, w, p) - numpy_moment(d_ref, w, p)) for p in PTV_POWERS]
    assert got == pytest.approx(float(np.mean(expected)), rel=1e-4)


def test_zero_for_the_reference_and_gradients_reach_the_prediction():
    vols, _, _, ref_gy = make_case(np.random.default_rng(2))
    ref = encode_gy(ref_gy)[None, None]
    assert float(moment_loss(ref, ref, vols, SCALE)) == 0.0
    pred = (ref * 0.9).requires_grad_(True)
    loss = moment_loss(pred, ref, vols, SCALE)
    loss.backward()
    assert float(loss) > 0 and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # voxels outside every structure get no gradient from this loss
    outside = (vols["ptv"] <= -1) & (vols["oar"] <= -1).all(dim=1, keepdim=True)
    assert float(pred.grad[outside].abs().max()) == 0.0


def test_no_structures_gives_zero():
    x = torch.zeros(1, 1, 4, 4, 4)
    assert float(moment_loss(x, x - 0.5, {}, SCALE)) == 0.0


def test_a_case_without_a_structure_neither_counts_nor_poisons_the_gradient():
    vols, _, _, ref_gy = make_case(np.random.default_rng(3))
    ref = encode_gy(ref_gy)[None, None]
    no_oar = -torch.ones_like(vols["oar"])
    batch_vols = {"ptv": vols["ptv"].repeat(2, 1, 1, 1, 1), "oar": torch.cat([vols["oar"], no_oar])}
    pred = (ref.repeat(2, 1, 1, 1, 1) * 0.8).requires_grad_(True)
    loss = moment_loss(pred, ref.repeat(2, 1, 1, 1, 1), batch_vols, SCALE)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    # the second case's OAR terms are absent, so its OAR voxels get no gradient
    oar_voxels = vols["oar"][0, 0] > -1
    assert float(pred.grad[1, 0][oar_voxels].abs().max()) == 0.0
    assert float(pred.grad[0, 0][oar_voxels].abs().max()) > 0.0
