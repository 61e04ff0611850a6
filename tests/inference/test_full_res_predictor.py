"""Predictor with a full-res stage in its checkpoint: applied automatically, case-grid results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkt3d.errors import Cancelled, CaseError, ConfigError
from diffkt3d.inference import Predictor
from diffkt3d.inference.full_res import coarse_on_case_grid, refine_dose
from diffkt3d.models.checkpoint import load_checkpoint, write_full_res_stages
from diffkt3d.models.full_res import FullResConfig, FullResStage

torch.set_num_threads(1)
TINY = (4, 4, 8, 8, 16, 4)


def with_stages(base_path, out_path, targets, perturb: bool, **cfg):
    base = load_checkpoint(base_path)
    stages = {}
    for i, target in enumerate(targets):
        torch.manual_seed(i)
        config = FullResConfig(target=target, features=TINY, crop=(32, 32, 32), **cfg).resolved(base.encoding.modalities)
        stage = FullResStage(config, base.encoding)
        if perturb:
            with torch.no_grad():
                stage.net.final_conv.weight.normal_(0, 0.05)
        stages[target] = (config, stage.state_dict())
    return write_full_res_stages(base_path, out_path, stages)


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    return Predictor.load(tiny_checkpoint, device="cpu")


def test_fresh_dose_stage_reproduces_the_plain_prediction(plain, tiny_checkpoint, tmp_path, synthetic_case):
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose"], perturb=False), device="cpu")
    a = plain.predict_dose(synthetic_case, steps=1, candidates=2, template=None, with_dvh=False)
    b = staged.predict_dose(synthetic_case, steps=1, candidates=2, template=None, with_dvh=False)
    for ca, cb in zip(a.candidates, b.candidates, strict=True):
        np.testing.assert_array_equal(ca.dose_gy, cb.dose_gy)
    assert b.full_res and "full_res_s" in b.timings and b.to_dict()["full_res"] is True
    assert not a.full_res and "full_res_s" not in a.timings and "full_res" not in a.to_dict()


def test_trained_stages_change_the_outputs_on_the_case_grid(plain, tiny_checkpoint, tmp_path, synthetic_case):
    path = with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose", "ct", "oar", "ptv"], perturb=True)
    staged = Predictor.load(path, device="cpu")
    case = synthetic_case
    shape = case.grid.shape
    dose = staged.predict_dose(case, steps=1, template=None, with_dvh=False).dose_gy
    base = plain.predict_dose(case, steps=1, template=None, with_dvh=False).dose_gy
    assert dose.shape == shape and (dose >= 0).all() and (dose[~case.body] == 0).all()
    assert not np.array_equal(dose, base)
    ct = staged.impute(case, "ct", steps=1)
    assert ct.full_res and ct.ct_hu.shape == shape and (ct.ct_hu[~case.body] == -1000).all()
    oar = staged.impute(case, "oar", steps=1)
    assert list(oar.masks) == list(staged.encoding.oar_channels) and oar.timings["full_res_s"] >= 0
    assert all(m.shape == shape and m.dtype == bool and not m[~case.body].any() for m in oar.masks.values())
    ptv = staged.impute(case, "ptv", steps=1)
    assert sorted(ptv.masks) == ["PTV56", "PTV63", "PTV70"]


def test_a_missing_condition_enters_the_stage_as_empty(tiny_checkpoint, tmp_path, synthetic_case):
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose"], perturb=True), device="cpu")
    synthetic_case.ct_hu = None  # the DiT treats a missing CT as a missing condition; so does the stage
    pred = staged.predict_dose(synthetic_case, steps=1, template=None, with_dvh=False)
    assert pred.full_res and pred.dose_gy.shape == synthetic_case.grid.shape and np.isfinite(pred.dose_gy).all()


def test_coarse_prediction_is_what_the_dose_path_refines(plain, synthetic_case):
    coarse = plain.predict_coarse(synthetic_case, "dose", steps=1, seed=4)
    dose = plain.predict_dose(synthetic_case, steps=1, seed=4, template=None, with_dvh=False).dose_gy
    assert coarse.shape == (1, *synthetic_case.grid.shape)
    np.testing.assert_allclose((coarse[0].numpy() + 1) * 0.5 * plain.encoding.dose_scale_gy, dose, atol=1e-4)
    oar = plain.predict_coarse(synthetic_case, "oar", steps=1, seed=4)
    assert oar.shape == (len(plain.encoding.oar_channels), *synthetic_case.grid.shape)
    assert torch.equal(coarse_on_case_grid(torch.zeros(1, 16, 16, 16), "ct", synthetic_case, plain.encoding),
                       torch.zeros(1, *synthetic_case.grid.shape))


def test_a_coarse_dose_on_another_grid_is_refused(tiny_checkpoint, tmp_path, synthetic_case):
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose"], perturb=False), device="cpu")
    with pytest.raises(CaseError, match="coarse prediction has grid \\(8, 8, 8\\), expected the case grid"):
        refine_dose(staged.full_res["dose"], synthetic_case, np.zeros((8, 8, 8), np.float32))


def test_a_full_res_stage_is_the_last_step_of_the_progress_count(tiny_checkpoint, tmp_path, synthetic_case):
    """The stage runs after the sampler's last step: a client must not read "3 of 3" while it still runs."""
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose", "ct"], perturb=False),
                            device="cpu")
    seen = []
    ct = staged.impute(synthetic_case, "ct", steps=3, on_step=lambda done, total: seen.append((done, total)))
    assert ct.full_res and seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    seen.clear()
    staged.predict_dose(synthetic_case, steps=2, template=None, with_dvh=False, flip_average=True,
                        on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 5) for k in range(1, 6)]

    def cancel_at_last_sampling_step(done: int, total: int) -> None:
        if done == 3:
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):  # before the stage runs
        staged.impute(synthetic_case, "ct", steps=3, on_step=cancel_at_last_sampling_step)


def test_an_imputation_samples_the_coarse_steps_its_stage_was_trained_on(tiny_checkpoint, tmp_path, synthetic_case):
    """The stage learned on an N-step coarse prediction; a request for 3 steps must not hand it another."""
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["oar"], perturb=True, coarse_steps=1),
                            device="cpu")
    seen = []
    oar = staged.impute(synthetic_case, "oar", steps=3, seed=2, on_step=lambda done, total: seen.append((done, total)))
    assert oar.steps == 1 and seen == [(1, 2), (2, 2)]
    again = staged.impute(synthetic_case, "oar", steps=1, seed=2)
    assert all(np.array_equal(oar.masks[n], again.masks[n]) for n in oar.masks)


def test_a_stage_without_coarse_input_runs_no_sampling(tiny_checkpoint, tmp_path, synthetic_case):
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["oar"], perturb=True,
                                        coarse_input=False), device="cpu")
    seen = []
    oar = staged.impute(synthetic_case, "oar", steps=5, on_step=lambda done, total: seen.append((done, total)))
    assert oar.full_res and oar.steps == 0 and seen == [(1, 1)]
    assert list(oar.masks) == list(staged.encoding.oar_channels)


def test_a_dose_samples_the_coarse_steps_its_stage_was_trained_on(tiny_checkpoint, tmp_path, synthetic_case):
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose"], perturb=True, coarse_steps=1),
                            device="cpu")
    seen = []
    pred = staged.predict_dose(synthetic_case, steps=4, seed=3, template=None, with_dvh=False,
                               on_step=lambda done, total: seen.append((done, total)))
    assert pred.full_res and pred.steps == 1 and seen == [(1, 2), (2, 2)]
    again = staged.predict_dose(synthetic_case, steps=1, seed=3, template=None, with_dvh=False)
    np.testing.assert_array_equal(pred.dose_gy, again.dose_gy)


def test_a_dose_stage_without_coarse_input_predicts_alone(tiny_checkpoint, tmp_path, synthetic_case):
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose"], perturb=True,
                                        coarse_input=False), device="cpu")
    stage = staged.full_res["dose"]
    seen = []
    pred = staged.predict_dose(synthetic_case, steps=5, candidates=3, seed=7,
                               on_step=lambda done, total: seen.append((done, total)))
    assert pred.full_res and pred.steps == 0 and seen == [(1, 1)] and len(pred.candidates) == 1
    expected = refine_dose(stage, synthetic_case, np.zeros(synthetic_case.grid.shape, np.float32))
    np.testing.assert_array_equal(pred.dose_gy, expected)
    assert pred.chosen.scorecard is not None and pred.dvh  # the planner's tables, as for any prediction
    assert (pred.dose_gy[~synthetic_case.body] == 0).all()


def test_flip_averaging_a_stage_is_the_mean_over_the_case_and_its_mirror(tiny_checkpoint, tmp_path, synthetic_case):
    """Independent check: mirror the case itself (arrays flipped, Left/Right structures renamed; the
    plates mirrored as drawn, the convention of training's flips), run the stage on it, mirror its
    dose back and average with the plain run."""
    import copy

    from diffkt3d.data.plates import ensure_plates
    from diffkt3d.training.augment import LEFT_RIGHT_AXIS

    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose"], perturb=True,
                                        coarse_input=False), device="cpu")
    stage = staged.full_res["dose"]
    case = ensure_plates(synthetic_case)
    zero = np.zeros(case.grid.shape, np.float32)
    mirror = copy.deepcopy(case)
    for name in ("ct_hu", "body", "beam_plate", "angle_plate"):
        setattr(mirror, name, np.flip(getattr(case, name), LEFT_RIGHT_AXIS).copy())
    swap = {n: n.replace("Left", "@").replace("Right", "Left").replace("@", "Right") for n in case.structures}
    assert any(a != b for a, b in swap.items()), "the synthetic case needs a Left or Right structure"
    mirror.structures = {}
    for name, s in case.structures.items():
        s = copy.deepcopy(s)
        s.mask = np.flip(s.mask, LEFT_RIGHT_AXIS).copy()
        s.name = swap[name]
        mirror.structures[swap[name]] = s
    plain = refine_dose(stage, case, zero)
    mirrored = np.flip(refine_dose(stage, mirror, zero), LEFT_RIGHT_AXIS)
    averaged = refine_dose(stage, case, zero, flip_average=True)
    expected = np.where(case.body, np.clip(0.5 * (plain + mirrored), 0, None), 0)
    np.testing.assert_allclose(averaged, expected, atol=2e-3)
    assert np.abs(averaged - plain).max() > 1e-3  # the mirror changed something
    pred = staged.predict_dose(case, flip_average=True, template=None, with_dvh=False)
    np.testing.assert_array_equal(pred.dose_gy, averaged)


def test_a_preview_is_the_dits_quick_look_without_the_stage(plain, tiny_checkpoint, tmp_path, synthetic_case):
    staged = Predictor.load(with_stages(tiny_checkpoint, tmp_path / "m.pt", ["dose"], perturb=True), device="cpu")
    a = staged.predict_dose(synthetic_case, preview=True, seed=1, template=None, with_dvh=False)
    b = plain.predict_dose(synthetic_case, preview=True, seed=1, template=None, with_dvh=False)
    assert not a.full_res and "full_res_s" not in a.timings
    np.testing.assert_array_equal(a.dose_gy, b.dose_gy)
    full = staged.predict_dose(synthetic_case, steps=1, seed=1, template=None, with_dvh=False)
    assert full.full_res and not np.array_equal(full.dose_gy, a.dose_gy)


def test_coarse_steps_must_be_positive():
    with pytest.raises(ConfigError, match="coarse_steps must be an int >= 1 or null, found 0"):
        FullResConfig(target="oar", coarse_steps=0)


def test_an_oar_keeps_its_largest_connected_component():
    from diffkt3d.inference.full_res import largest_component

    mask = np.zeros((12, 12, 12), bool)
    mask[1:5, 1:5, 1:5] = True  # 64 voxels: the organ
    mask[8:10, 8:10, 8:10] = True  # 8 voxels elsewhere: a stray blob
    mask[5, 5, 5] = True  # touches the organ by a corner: 26-connected, so part of it
    kept = largest_component(mask)
    assert kept.sum() == 65 and not kept[8:10, 8:10, 8:10].any() and kept[5, 5, 5]
    assert largest_component(np.zeros((4, 4, 4), bool)).sum() == 0
