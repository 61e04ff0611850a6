"""CT-backbone selection: config parsing and the PRDiT predictor on a real case object."""

from __future__ import annotations

import numpy as np
import pytest

from diffkt3d.errors import Cancelled, CaseError, ConfigError
from diffkt3d.inference.ct_backbone import CTImputationConfig
from diffkt3d.inference.prdit_predictor import PRDiTCTPredictor


def test_default_is_the_any2any_dit():
    cfg = CTImputationConfig.from_conf({})
    assert cfg.backbone == "any2any" and not cfg.uses_prdit


@pytest.mark.parametrize(("conf", "match"), [
    ({"ct_backbone": "unet"}, "ct_backbone must be one of"),
    ({"ct_backbone": "prdit"}, "needs a PRDiT checkpoint"),
    ({"ct_backbone": "prdit", "prdit_model": "/nonexistent/p.pt"}, "not found: /nonexistent/p.pt"),
    ({"prdit_k": "two"}, "prdit_k must be a number, found 'two'"),
    ({"prdit_k": "0.5"}, "must be >= 1, found 0.5"),
    ({"prdit_sampler": "ddim"}, "prdit_sampler must be one of"),
])
def test_bad_conf_is_refused_by_name(conf, match):
    with pytest.raises(ConfigError, match=match):
        CTImputationConfig.from_conf(conf)


def test_not_a_prdit_checkpoint_is_refused_by_file(tmp_path, tiny_checkpoint):
    cfg = CTImputationConfig(backbone="prdit", prdit_model=tiny_checkpoint)  # an Any2Any file
    with pytest.raises(ConfigError, match="not a diffkt3d-prdit file"):
        PRDiTCTPredictor.load(cfg)


@pytest.fixture(scope="module")
def predictor(tiny_prdit_checkpoint):
    return PRDiTCTPredictor.load(CTImputationConfig.from_conf(
        {"ct_backbone": "prdit", "prdit_model": str(tiny_prdit_checkpoint), "prdit_k": "2"}))


def test_ct_on_the_case_grid_air_outside_body_and_seeded(predictor, synthetic_case):
    res = predictor.impute(synthetic_case, "ct", steps=3, seed=4)
    assert res.target == "ct" and res.steps == 3 and res.seed == 4
    assert res.model_version.startswith("prdit:tiny-prdit@")
    ct = res.ct_hu
    assert ct.shape == synthetic_case.grid.shape and ct.dtype == np.float32
    assert (ct[~synthetic_case.body] == -1000).all()
    assert ct[synthetic_case.body].std() > 0
    np.testing.assert_array_equal(ct, predictor.impute(synthetic_case, "ct", steps=3, seed=4).ct_hu)
    assert not np.array_equal(ct, predictor.impute(synthetic_case, "ct", steps=3, seed=5).ct_hu)


def test_progress_and_cancel_between_sampler_steps(predictor, synthetic_case):
    """The same `on_step` hook as the Any2Any predictor, so a server follows and cancels either backbone."""
    seen = []
    predictor.impute(synthetic_case, "ct", steps=3, on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()

    def cancel_at_one(done: int, total: int) -> None:
        seen.append(done)
        raise Cancelled("cancelled by the client")

    with pytest.raises(Cancelled):
        predictor.impute(synthetic_case, "ct", steps=5, on_step=cancel_at_one)
    assert seen == [1]


def test_stored_ct_is_not_an_input(predictor, synthetic_case):
    a = predictor.impute(synthetic_case, "ct", steps=2).ct_hu
    synthetic_case.ct_hu = synthetic_case.ct_hu * 0 + 500.0
    np.testing.assert_array_equal(a, predictor.impute(synthetic_case, "ct", steps=2).ct_hu)


def test_other_targets_and_missing_body_are_refused(predictor, synthetic_case):
    with pytest.raises(ConfigError, match="imputes CT only, not 'oar'"):
        predictor.impute(synthetic_case, "oar")
    synthetic_case.body = None
    with pytest.raises(CaseError, match="body mask is missing"):
        predictor.impute(synthetic_case, "ct", steps=1)
