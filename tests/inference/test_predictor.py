"""Predictor: case grid in, case grid out; seeds reproduce; candidates; imputation outputs."""

from __future__ import annotations

import numpy as np
import pytest

from diffkt3d.errors import Cancelled, CaseError, ConfigError
from diffkt3d.inference import Predictor


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.load(tiny_checkpoint, device="cpu")


def test_dose_is_on_the_case_grid_nonnegative_and_zero_outside_body(predictor, synthetic_case):
    synthetic_case.dose_gy = None
    pred = predictor.predict_dose(synthetic_case, steps=2, template=None)
    assert pred.dose_gy.shape == synthetic_case.grid.shape and pred.dose_gy.dtype == np.float32
    assert (pred.dose_gy >= 0).all()
    assert (pred.dose_gy[~synthetic_case.body] == 0).all()
    assert pred.steps == 2 and pred.model_version.startswith("tiny-test@")


def test_stored_dose_is_never_an_input(predictor, synthetic_case):
    a = predictor.predict_dose(synthetic_case, steps=1, template=None).dose_gy
    synthetic_case.dose_gy = synthetic_case.dose_gy * 0 + 33.0
    b = predictor.predict_dose(synthetic_case, steps=1, template=None).dose_gy
    np.testing.assert_array_equal(a, b)


def test_same_seed_same_dose_other_seed_other_dose(predictor, synthetic_case):
    a = predictor.predict_dose(synthetic_case, steps=2, seed=7, template=None).dose_gy
    b = predictor.predict_dose(synthetic_case, steps=2, seed=7, template=None).dose_gy
    c = predictor.predict_dose(synthetic_case, steps=2, seed=8, template=None).dose_gy
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_candidates_are_individually_reproducible(predictor, synthetic_case):
    pred = predictor.predict_dose(synthetic_case, steps=2, candidates=3, seed=5, template=None)
    assert [c.seed for c in pred.candidates] == [5, 6, 7]
    single = predictor.predict_dose(synthetic_case, steps=2, seed=6, template=None).dose_gy
    np.testing.assert_allclose(pred.candidates[1].dose_gy, single, atol=1e-4)


def test_mean_aggregate_is_the_voxel_mean(predictor, synthetic_case):
    pred = predictor.predict_dose(synthetic_case, steps=1, candidates=2, aggregate="mean", template=None)
    assert pred.chosen_id == "mean"
    np.testing.assert_allclose(pred.dose_gy, (pred.candidates[0].dose_gy + pred.candidates[1].dose_gy) / 2,
                               atol=1e-4)


def test_preview_is_one_step(predictor, synthetic_case):
    assert predictor.predict_dose(synthetic_case, steps=10, preview=True, template=None).steps == 1


def test_case_without_target_is_refused_by_name(predictor, synthetic_case):
    for name in ("PTV70", "PTV56"):
        del synthetic_case.structures[name]
    with pytest.raises(CaseError, match="synthetic.*target"):
        predictor.predict_dose(synthetic_case, steps=1, template=None)


@pytest.mark.parametrize("target", ["ct", "ptv", "oar"])
def test_imputation_returns_case_grid_outputs(predictor, synthetic_case, target):
    res = predictor.impute(synthetic_case, target, steps=1)
    if target == "ct":
        assert res.ct_hu.shape == synthetic_case.grid.shape
        assert res.ct_hu.min() >= -1000 and res.ct_hu.max() <= 1000
    else:
        assert res.masks and all(m.shape == synthetic_case.grid.shape and m.dtype == bool for m in res.masks.values())


@pytest.mark.parametrize("target", ["ct", "oar"])
def test_imputation_reports_every_sampling_step(predictor, synthetic_case, target):
    seen = []
    res = predictor.impute(synthetic_case, target, steps=4, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 4) for k in range(1, 5)]
    assert not res.full_res


def test_a_cancelled_imputation_stops_between_steps(predictor, synthetic_case):
    seen = []

    def cancel_at_two(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            raise Cancelled("cancelled by the client")

    with pytest.raises(Cancelled):
        predictor.impute(synthetic_case, "ptv", steps=10, on_step=cancel_at_two)
    assert seen == [1, 2]  # no step ran after the cancel


def test_unknown_imputation_target_and_missing_model(predictor, synthetic_case, tmp_path):
    with pytest.raises(ValueError, match="cannot impute"):
        predictor.impute(synthetic_case, "dose")
    with pytest.raises(ConfigError, match="model not found"):
        Predictor.load(tmp_path / "nope.pt")


def test_dvh_table_is_built_unless_the_caller_scores_the_dose_itself(predictor, synthetic_case):
    synthetic_case.dose_gy = None
    full = predictor.predict_dose(synthetic_case, steps=1, template=None)
    bare = predictor.predict_dose(synthetic_case, steps=1, template=None, with_dvh=False)
    assert set(full.dvh) == {n for n, s in synthetic_case.structures.items() if s.mask.any()} and full.dvh
    assert bare.dvh == {} and bare.to_dict()["dvh"] == {}
    np.testing.assert_array_equal(full.dose_gy, bare.dose_gy)


def test_flip_average_is_the_mean_of_the_sample_and_the_mirrored_sample(tiny_checkpoint, synthetic_case):
    import torch

    from diffkt3d.training.augment import mirror_volumes

    predictor = Predictor.load(tiny_checkpoint, device="cpu")
    plain = predictor.predict_dose(synthetic_case, steps=2, template=None, with_dvh=False)
    tta = predictor.predict_dose(synthetic_case, steps=2, template=None, with_dvh=False, flip_average=True)
    conditions = predictor.encode_conditions(synthetic_case, exclude={"dose"})
    a = predictor._sample(conditions, "dose", [plain.candidates[0].seed], 2)
    b = predictor._sample(mirror_volumes(conditions, predictor.encoding.oar_channels), "dose",
                          [plain.candidates[0].seed], 2)
    from diffkt3d.data.encoding import decode_dose

    expected = decode_dose((0.5 * (a + mirror_volumes({"dose": b})["dose"]))[0], synthetic_case.grid,
                           predictor.encoding, synthetic_case.body)
    assert np.allclose(tta.dose_gy, expected, atol=1e-5)
    assert not np.allclose(tta.dose_gy, plain.dose_gy)
    assert torch.is_tensor(a)


def test_flip_average_reports_one_progress_count_over_both_passes(tiny_checkpoint, synthetic_case):
    predictor = Predictor.load(tiny_checkpoint, device="cpu")
    seen = []
    predictor.predict_dose(synthetic_case, steps=3, template=None, with_dvh=False, flip_average=True,
                           on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 6) for k in range(1, 7)]


def test_imputable_structures_and_a_requested_subset(tiny_checkpoint, synthetic_case):
    from diffkt3d.inference import Predictor

    pred = Predictor.load(tiny_checkpoint, device="cpu")
    assert pred.imputable_structures(synthetic_case, "oar") == list(pred.encoding.oar_channels)
    levels = sorted({s.prescription_gy for s in synthetic_case.targets.values()})
    assert pred.imputable_structures(synthetic_case, "ptv") == [f"PTV{v:g}" for v in levels]
    res = pred.impute(synthetic_case, "oar", steps=1, structures=["SpinalCord", "SpinalCord", "Brainstem"])
    assert list(res.masks) == ["SpinalCord", "Brainstem"]
    full = pred.impute(synthetic_case, "oar", steps=1)
    assert all(np.array_equal(res.masks[n], full.masks[n]) for n in res.masks)  # a subset, not another answer
    for bad, message in ((["Heart"], r"cannot impute oar structure\(s\) \['Heart'\]"), ([], "an empty list"),
                         ("SpinalCord", "must be a list of names")):
        with pytest.raises(ValueError, match=message):
            pred.impute(synthetic_case, "oar", steps=1, structures=bad)
    with pytest.raises(ValueError, match="a ct imputation has none"):
        pred.impute(synthetic_case, "ct", steps=1, structures=["SpinalCord"])
