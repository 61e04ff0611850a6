"""The one dose-result description: DosePrediction keeps Scorecard objects and serialises them once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffkt3d.constants import DEFAULT_STEPS, DEFAULT_TEMPLATE
from diffkt3d.inference import DOSE_RESULT_SCHEMA, Predictor
from diffkt3d.metrics.dvh_table import dvh_table
from diffkt3d.scorecard import ScorecardResult, score_case


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.load(tiny_checkpoint, device="cpu")


def test_prediction_keeps_scorecard_objects_of_every_candidate(predictor, synthetic_case):
    pred = predictor.predict_dose(synthetic_case, steps=1, candidates=2, seed=3)
    assert all(isinstance(c.scorecard, ScorecardResult) for c in pred.candidates)
    best = max(pred.candidates, key=lambda c: c.scorecard.total)
    assert pred.chosen_id == best.id and pred.chosen is best and pred.dose_gy is best.dose_gy
    assert pred.scorecard is best.scorecard and pred.template == DEFAULT_TEMPLATE
    assert pred.scorecard.total == pytest.approx(score_case(best.dose_gy, synthetic_case, DEFAULT_TEMPLATE).total)


def test_to_dict_is_json_and_serialises_the_core_objects(predictor, synthetic_case):
    pred = predictor.predict_dose(synthetic_case, steps=1, candidates=2, seed=3)
    d = json.loads(json.dumps(pred.to_dict()))  # plain JSON types only
    assert d["schema"] == DOSE_RESULT_SCHEMA
    assert (d["steps"], d["seed"], d["aggregate"], d["preview"]) == (1, 3, "best", False)
    assert d["case"]["id"] == synthetic_case.case_id and d["case"]["shape"] == list(synthetic_case.grid.shape)
    assert d["case"]["inferred"] == list(synthetic_case.plan.inferred)
    assert d["chosen_id"] == pred.chosen_id
    assert d["scorecard"] == json.loads(json.dumps(pred.scorecard.to_dict()))
    assert d["dvh"] == {n: row.to_dict() for n, row in dvh_table(pred.dose_gy, synthetic_case).items()}
    for entry, cand in zip(d["candidates"], pred.candidates, strict=True):
        assert (entry["id"], entry["seed"]) == (cand.id, cand.seed)
        assert entry["scorecard_total"] == pytest.approx(cand.scorecard.total)
        assert entry["scorecard_items"] == pytest.approx(cand.scorecard.item_scores())
        assert entry["scorecard"]["total"] == pytest.approx(cand.scorecard.total)
    assert {"encode_s", "sample_s", "decode_s", "scorecard_s", "dvh_s", "total_s"} <= set(d["timings"])


def test_without_template_there_is_no_scorecard_but_a_dvh(predictor, synthetic_case):
    pred = predictor.predict_dose(synthetic_case, steps=1, template=None)
    d = pred.to_dict()
    assert pred.scorecard is None and d["scorecard"] is None and d["template"] is None
    assert d["candidates"][0]["scorecard_total"] is None and d["candidates"][0]["scorecard_items"] == {}
    assert np.isnan(pred.chosen.total_score)
    assert set(d["dvh"]) == {n for n, s in synthetic_case.structures.items() if s.mask.any()}


def test_default_steps_are_the_named_constant(predictor, synthetic_case, monkeypatch):
    seen = {}
    real = predictor._sample

    def spy(conditions, target, seeds, steps, on_step=None):
        seen["steps"] = steps
        return real(conditions, target, seeds, 1, on_step)

    monkeypatch.setattr(predictor, "_sample", spy)
    assert predictor.predict_dose(synthetic_case, template=None).steps == DEFAULT_STEPS == seen["steps"]
