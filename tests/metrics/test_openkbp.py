"""OpenKBP dose and DVH scores vs hand-computed values and a brute-force re-implementation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffkt3d.metrics import dvh, openkbp


def _percentile_linear(values, q: float) -> float:
    """Linear-interpolation percentile written out (numpy's default method), no numpy call."""
    v = sorted(float(x) for x in values)
    rank = q / 100.0 * (len(v) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (rank - lo) * (v[hi] - v[lo])


def test_dose_score_counts_error_outside_the_mask() -> None:
    ref = np.zeros((4, 4, 4))
    pred = np.ones((4, 4, 4))
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[:2, :2, :2] = 1  # 8 voxels
    # the prediction is NOT masked: 64 voxels of 1 Gy error / 8 possible voxels
    assert openkbp.openkbp_dose_score(ref, pred, mask) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="empty"):
        openkbp.openkbp_dose_score(ref, pred, np.zeros_like(mask))
    with pytest.raises(ValueError, match="shapes differ"):
        openkbp.openkbp_dose_score(ref, pred[:3], mask)


def test_official_d01cc_vs_order_statistic() -> None:
    # 10 voxels of 30 mm^3 with doses 1..10 Gy: n = round(100 / 30) = 3 voxels.
    doses = np.arange(1.0, 11.0)
    # official: percentile(100 - 3/10*100 = 70) = 1 + 0.7 * 9 = 7.3 Gy
    assert openkbp.openkbp_d01cc(doses, 30.0) == pytest.approx(7.3)
    # dvh.dose_at_volume_cc: the 3rd hottest voxel = 8 Gy
    mask = np.ones(10, dtype=bool)
    assert dvh.dose_at_volume_cc(doses, mask, 0.1, 0.030) == 8.0
    # large voxels: n = max(1, round(100 / 400)) = 1 -> percentile(90) = 9.1 Gy
    assert openkbp.openkbp_d01cc(doses, 400.0) == pytest.approx(9.1)
    # ROI smaller than 0.1 cc: clipped to the minimum instead of numpy raising
    assert openkbp.openkbp_d01cc(np.array([5.0, 6.0]), 10.0) == 5.0


def _toy_case(seed: int):
    rng = np.random.default_rng(seed)
    shape = (10, 11, 12)
    ref = rng.gamma(3.0, 8.0, shape)
    pred = ref + rng.normal(0, 2.0, shape)
    structures = {}
    for name in ("Brainstem", "SpinalCord", "PTV70", "PTV56"):
        structures[name] = (rng.random(shape) > 0.8).astype(np.uint8)
    structures["LeftParotid"] = np.zeros(shape, np.uint8)  # empty -> skipped
    structures["Unrelated"] = np.ones(shape, np.uint8)  # not an OpenKBP ROI -> ignored
    possible = (rng.random(shape) > 0.3).astype(np.uint8)
    return ref, pred, possible, structures


def test_dvh_metrics_brute_force_and_missing_rois() -> None:
    ref, _, _, structures = _toy_case(0)
    voxel_mm3 = 3.9 * 3.9 * 2.5  # 38.0 mm^3 -> n = 3
    m = openkbp.openkbp_dvh_metrics(ref, structures, voxel_mm3)
    assert set(m) == {
        ("Brainstem", "D_0.1_cc"), ("Brainstem", "mean"), ("SpinalCord", "D_0.1_cc"), ("SpinalCord", "mean"),
        ("PTV70", "D_99"), ("PTV70", "D_95"), ("PTV70", "D_1"), ("PTV56", "D_99"), ("PTV56", "D_95"), ("PTV56", "D_1"),
    }
    for roi in ("Brainstem", "SpinalCord"):
        d = [ref[i] for i in zip(*np.nonzero(structures[roi]), strict=True)]
        n = max(1, round(100 / voxel_mm3))
        assert m[(roi, "D_0.1_cc")] == pytest.approx(_percentile_linear(d, 100 - n / len(d) * 100))
        assert m[(roi, "mean")] == pytest.approx(sum(d) / len(d))
    for roi in ("PTV70", "PTV56"):
        d = [ref[i] for i in zip(*np.nonzero(structures[roi]), strict=True)]
        assert m[(roi, "D_99")] == pytest.approx(_percentile_linear(d, 1))
        assert m[(roi, "D_95")] == pytest.approx(_percentile_linear(d, 5))
        assert m[(roi, "D_1")] == pytest.approx(_percentile_linear(d, 99))


def test_case_and_cohort_pooling() -> None:
    voxel_mm3 = 40.0
    a = openkbp.score_case(*_toy_case(1), voxel_mm3, case_id="a")
    ref, pred, possible, structures = _toy_case(2)
    del structures["PTV56"], structures["Brainstem"]  # fewer ROIs -> fewer errors
    b = openkbp.score_case(ref, pred, possible, structures, voxel_mm3, case_id="b")
    assert len(a.dvh_errors) == 10 and len(b.dvh_errors) == 5
    for key, err in a.dvh_errors.items():
        assert err == pytest.approx(abs(a.ref_metrics[key] - a.pred_metrics[key]))
    cohort = openkbp.score_cohort([a, b])
    pooled = (sum(a.dvh_errors.values()) + sum(b.dvh_errors.values())) / 15
    assert cohort.dvh_score == pytest.approx(pooled)
    assert cohort.dvh_score != pytest.approx((a.dvh_score + b.dvh_score) / 2)  # pooled, not per patient
    assert cohort.dose_score == pytest.approx((a.dose_score + b.dose_score) / 2)
    assert cohort.n_cases == 2 and cohort.n_dvh_errors == 15
    with pytest.raises(ValueError, match="no cases"):
        openkbp.score_cohort([])


PT_201 = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation/pt_201")


@pytest.mark.slow
@pytest.mark.skipif(not PT_201.is_dir(), reason="OpenKBP validation data not on this machine")
def test_real_case_against_brute_force() -> None:
    import nibabel as nib

    from diffkt3d.io.case_folder import load_case_folder

    case = load_case_folder(PT_201)
    ref = case.dose_gy
    assert ref is not None and case.body is not None

    # 1. Reference against itself: both scores are exactly 0.
    same = openkbp.score_case_object(case, ref.copy())
    assert same.dose_score == 0.0 and same.dvh_score == 0.0
    assert len(same.dvh_errors) > 0

    # 2. A perturbed copy (scaled, noisy, some dose outside the possible-dose mask).
    rng = np.random.default_rng(201)
    pred = ref * 1.03 + rng.normal(0.0, 1.0, ref.shape)
    pred[~case.body] += 0.5
    got = openkbp.score_case_object(case, pred)

    # Brute force, from the raw NIfTI files (nibabel directly, not our loader), plain Python sums.
    img = nib.load(PT_201 / "dose.nii.gz")
    ref_raw = np.asarray(img.get_fdata(), dtype=np.float64)
    np.testing.assert_allclose(ref_raw, ref, atol=1e-5)
    voxel_mm3 = float(np.prod(img.header.get_zooms()[:3]))
    possible = np.asarray(nib.load(PT_201 / "possible_dose_mask.nii.gz").get_fdata()) > 0
    diff = np.abs(ref_raw - pred)
    expected_dose_score = math_fsum(diff.ravel()) / int(possible.sum())
    errors = []
    for roi in ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                "Mandible", "PTV56", "PTV63", "PTV70"):
        path = PT_201 / f"{roi}.nii.gz"
        if not path.exists():
            continue
        mask = np.asarray(nib.load(path).get_fdata()) > 0
        r, p = ref_raw[mask].tolist(), pred[mask].tolist()
        if roi.startswith("PTV"):
            for q in (1, 5, 99):
                errors.append(abs(_percentile_linear(r, q) - _percentile_linear(p, q)))
        else:
            n = max(1, round(100 / voxel_mm3))
            q = 100 - n / len(r) * 100
            errors.append(abs(_percentile_linear(r, q) - _percentile_linear(p, q)))
            errors.append(abs(sum(r) / len(r) - sum(p) / len(p)))
    # our loader keeps the dose in float32 (~4e-6 Gy rounding at 70 Gy), the brute force float64
    assert got.dose_score == pytest.approx(expected_dose_score, abs=1e-5)
    assert len(got.dvh_errors) == len(errors)
    assert got.dvh_score == pytest.approx(sum(errors) / len(errors), abs=1e-5)
    assert got.dose_score > 1.0 and got.dvh_score > 0.5  # the perturbation is visible


def math_fsum(values) -> float:
    import math

    return math.fsum(values)
