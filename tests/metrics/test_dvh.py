"""DVH metrics checked against hand-built arrays with analytic answers and brute-force loops."""

from __future__ import annotations

import numpy as np
import pytest

from diffkt3d.metrics import dvh


def _ramp_case(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """A structure whose n voxels hold the doses 1, 2, ..., n Gy (in a scrambled order)."""
    rng = np.random.default_rng(0)
    dose = np.zeros((4, 5, 10), dtype=np.float32)  # 200 voxels
    mask = np.zeros(dose.shape, dtype=bool)
    idx = rng.choice(dose.size, size=n, replace=False)
    mask.flat[idx] = True
    dose.flat[idx] = rng.permutation(np.arange(1, n + 1))
    dose[~mask] = 500.0  # outside doses must never leak in
    return dose, mask


def test_structure_doses_errors() -> None:
    dose, mask = _ramp_case()
    with pytest.raises(ValueError, match="shapes differ"):
        dvh.structure_doses(dose, mask[:-1])
    with pytest.raises(ValueError, match="empty"):
        dvh.structure_doses(dose, np.zeros_like(mask))
    bad = dose.copy()
    bad[mask] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        dvh.structure_doses(bad, mask)
    # uint8 masks behave like bool masks
    np.testing.assert_array_equal(
        np.sort(dvh.structure_doses(dose, mask.astype(np.uint8))), np.arange(1, 101)
    )


def test_mean_max_min_on_ramp() -> None:
    dose, mask = _ramp_case()
    assert dvh.mean_dose(dose, mask) == pytest.approx(50.5)
    assert dvh.max_dose(dose, mask) == 100.0
    assert dvh.min_dose(dose, mask) == 1.0


def test_dose_at_volume_pct_matches_order_statistics() -> None:
    # With doses 1..101 (101 voxels) the linear percentile at 100 - x hits a voxel exactly when
    # x is a whole number: D_x% = 101 - x.
    dose, mask = _ramp_case(101)
    for x in (0, 1, 2, 5, 50, 95, 98, 99, 100):
        assert dvh.dose_at_volume_pct(dose, mask, x) == pytest.approx(101 - x)
    with pytest.raises(ValueError, match="volume_pct"):
        dvh.dose_at_volume_pct(dose, mask, 101)


def test_dose_at_volume_cc_is_nth_hottest() -> None:
    dose, mask = _ramp_case(100)
    voxel_cc = 0.05
    # 0.1 cc -> 2 voxels -> 2nd hottest = 99 Gy; 2 cc -> 40 voxels -> 61 Gy.
    assert dvh.dose_at_volume_cc(dose, mask, 0.1, voxel_cc) == 99.0
    assert dvh.dose_at_volume_cc(dose, mask, 2.0, voxel_cc) == 61.0
    # one voxel exactly -> the hottest voxel; huge volume -> whole structure (= min)
    assert dvh.dose_at_volume_cc(dose, mask, voxel_cc, voxel_cc) == 100.0
    assert dvh.dose_at_volume_cc(dose, mask, 1000.0, voxel_cc) == 1.0
    # brute force: sort descending, take n-th
    rng = np.random.default_rng(1)
    d = rng.gamma(2.0, 10.0, size=mask.shape)
    for cc in (0.05, 0.1, 0.5, 1.234):
        n = max(1, int(round(cc / voxel_cc)))
        expected = sorted(d[mask].tolist(), reverse=True)[n - 1]
        assert dvh.dose_at_volume_cc(d, mask, cc, voxel_cc) == pytest.approx(expected)


def test_dose_at_volume_below_one_voxel_is_interpolated_not_the_point_max() -> None:
    # dose rises 1 Gy per voxel along axis 0; structure = voxels 3, 4, 5 of one row, 0.8 cc each.
    dose = np.broadcast_to(np.arange(10, dtype=np.float64)[:, None, None], (10, 5, 5)).copy()
    mask = np.zeros(dose.shape, dtype=bool)
    mask[3:6, 2, 2] = True
    # The hottest voxel spans 4.5..5.5 Gy; its hottest 0.1 cc (1/8 of it) is the slab above
    # 5.5 - 1/8 Gy: the exact D0.1cc of this linear field, not the point maximum (5 Gy).
    assert dvh.dose_at_volume_cc(dose, mask, 0.1, 0.8) == pytest.approx(5.375)
    assert dvh.max_dose(dose, mask) == 5.0
    # half a voxel: the hot half of voxel 5 starts at its centre, 5 Gy (f = 3: 27 sub-voxels)
    assert dvh.dose_at_volume_cc(dose, mask, 0.4, 0.8) == pytest.approx(5.0)
    # a quarter voxel: exact 5.25 Gy; sub-voxel centres are within half a sub-voxel (f = 4: 1/8 Gy)
    assert abs(dvh.dose_at_volume_cc(dose, mask, 0.2, 0.8) - 5.25) <= 1 / 8
    # a uniform dose stays that dose; whole-voxel volumes keep the order statistic
    assert dvh.dose_at_volume_cc(np.full(dose.shape, 7.0), mask, 0.1, 0.8) == pytest.approx(7.0)
    assert dvh.dose_at_volume_cc(dose, mask, 1.6, 0.8) == 4.0
    # the neighbourhood pruning never changes the answer: compare with interpolating every voxel
    rng = np.random.default_rng(3)
    noisy = rng.gamma(2.0, 10.0, size=(12, 12, 12))
    region = rng.random(noisy.shape) > 0.6
    got = dvh.dose_at_volume_cc(noisy, region, 0.1, 0.3)  # 0.3 cc voxels: f = 3
    steps = (np.arange(3) + 0.5) / 3 - 0.5
    offs = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    pts = (np.argwhere(region)[:, None, :] + offs[None]).reshape(-1, 3).T
    from scipy import ndimage
    every = np.sort(ndimage.map_coordinates(noisy, pts, order=1, mode="nearest"))[::-1]
    n = round(0.1 / (0.3 / 27))
    assert got == pytest.approx(every[n - 1])


def test_volume_at_dose_counts_ge() -> None:
    dose, mask = _ramp_case(100)
    assert dvh.volume_at_dose_pct(dose, mask, 20.0) == pytest.approx(81.0)  # 20..100
    assert dvh.volume_at_dose_pct(dose, mask, 20.5) == pytest.approx(80.0)
    assert dvh.volume_at_dose_pct(dose, mask, 0.0) == 100.0
    assert dvh.volume_at_dose_pct(dose, mask, 1000.0) == 0.0
    assert dvh.volume_at_dose_cc(dose, mask, 20.0, 0.5) == pytest.approx(40.5)


def test_cumulative_dvh_brute_force() -> None:
    rng = np.random.default_rng(2)
    d = rng.uniform(0, 30, size=(6, 7, 8))
    mask = rng.random(d.shape) > 0.4
    levels, vol = dvh.cumulative_dvh(d, mask, bin_width_gy=0.5)
    inside = d[mask]
    for level, v in zip(levels, vol, strict=True):
        assert v == pytest.approx(100.0 * sum(1 for x in inside if x >= level) / inside.size)
    assert levels[0] == 0.0 and vol[0] == 100.0
    assert vol[-1] == 0.0  # default axis ends above the max
    assert np.all(np.diff(vol) <= 0)
    np.testing.assert_allclose(np.diff(levels), 0.5)
    levels2, _ = dvh.cumulative_dvh(d, mask, bin_width_gy=1.0, max_dose_gy=80.0)
    assert levels2[-1] == 80.0 and len(levels2) == 81


def test_cumulative_dvh_consistent_with_v_metrics() -> None:
    dose, mask = _ramp_case(100)
    levels, vol = dvh.cumulative_dvh(dose, mask, bin_width_gy=1.0)
    for threshold in (0.0, 10.0, 55.0, 100.0):
        i = int(np.flatnonzero(levels == threshold)[0])
        assert vol[i] == pytest.approx(dvh.volume_at_dose_pct(dose, mask, threshold))


@pytest.mark.parametrize(
    ("spec", "kind", "number", "as_rx", "unit"),
    [
        ("Dmean", "Dmean", None, False, "Gy"),
        ("dmax", "Dmax", None, False, "Gy"),
        ("Dmin", "Dmin", None, False, "Gy"),
        ("D95%", "D%", 95.0, False, "Gy"),
        ("D0.1cc", "Dcc", 0.1, False, "Gy"),
        ("D2cc", "Dcc", 2.0, False, "Gy"),
        ("V20Gy", "VGy", 20.0, False, "%"),
        ("V20Gy_cc", "VGy_cc", 20.0, False, "cc"),
        ("V95%Rx", "V%Rx", 95.0, False, "%"),
        ("V107%Rx_cc", "V%Rx_cc", 107.0, False, "cc"),
        ("D95%Rx", "D%", 95.0, True, "%Rx"),
        ("D95%_%Rx", "D%", 95.0, True, "%Rx"),
        ("Dmean_%Rx", "Dmean", None, True, "%Rx"),
        (" D0.03cc ", "Dcc", 0.03, False, "Gy"),
    ],
)
def test_parse_metric(spec, kind, number, as_rx, unit) -> None:
    assert dvh.parse_metric(spec) == (kind, number, as_rx)
    assert dvh.metric_unit(spec) == unit


@pytest.mark.parametrize("spec", ["", "D95", "V20", "Dmedian", "D-5%", "V20Gy_%Rx", "X95%", "D95%%"])
def test_parse_metric_rejects_unknown(spec) -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        dvh.parse_metric(spec)


def test_evaluate_metric_values() -> None:
    dose, mask = _ramp_case(101)  # doses 1..101 Gy
    vcc = 0.05
    assert dvh.evaluate_metric("Dmean", dose, mask, vcc) == pytest.approx(51.0)
    assert dvh.evaluate_metric("Dmax", dose, mask, vcc) == 101.0
    assert dvh.evaluate_metric("D95%", dose, mask, vcc) == pytest.approx(6.0)
    assert dvh.evaluate_metric("D0.1cc", dose, mask, vcc) == 100.0
    assert dvh.evaluate_metric("V51Gy", dose, mask, vcc) == pytest.approx(100.0 * 51 / 101)
    assert dvh.evaluate_metric("V51Gy_cc", dose, mask, vcc) == pytest.approx(51 * vcc)
    # Rx = 60 Gy: 95 % Rx = 57 Gy -> doses 57..101 = 45 voxels
    assert dvh.evaluate_metric("V95%Rx", dose, mask, vcc, 60.0) == pytest.approx(100.0 * 45 / 101)
    assert dvh.evaluate_metric("V95%Rx_cc", dose, mask, vcc, 60.0) == pytest.approx(45 * vcc)
    assert dvh.evaluate_metric("D95%Rx", dose, mask, vcc, 60.0) == pytest.approx(100.0 * 6.0 / 60.0)
    assert dvh.evaluate_metric("Dmean_%Rx", dose, mask, vcc, 60.0) == pytest.approx(100.0 * 51 / 60)
    with pytest.raises(ValueError, match="prescription"):
        dvh.evaluate_metric("V95%Rx", dose, mask, vcc)
    with pytest.raises(ValueError, match="unknown metric 'Dfoo'"):
        dvh.evaluate_metric("Dfoo", dose, mask, vcc)
