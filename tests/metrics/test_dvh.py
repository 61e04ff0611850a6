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
    # tiny volume -> at least one voxel (= max); huge volume -> whole structure (= min)
    assert dvh.dose_at_volume_cc(dose, mask, 1e-6, voxel_cc) == 100.0
    assert dvh.dose_at_volume_cc(dose, mask, 1000.0, voxel_cc) == 1.0
    # brute force: sort descending, take n-th
    rng = np.random.default_rng(1)
    d = rng.gamma(2.0, 10.0, size=mask.shape)
    for cc in (0.03, 0.1, 0.5, 1.234):
        n = max(1, int(round(cc / voxel_cc)))
        expected = sorted(d[mask].tolist(), reverse=True)[n - 1]
        assert dvh.dose_at_volume_cc(d, mask, cc, voxel_cc) == pytest.approx(expected)


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
