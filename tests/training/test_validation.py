"""Hold-out validation and the paired promotion rule (diffkt3d.training.validation)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffkt3d.errors import ConfigError
from diffkt3d.models.checkpoint import read_checkpoint, save_checkpoint
from diffkt3d.training.validation import (
    KEEP,
    PROMOTE,
    PromotionRule,
    ValidationConfig,
    decide,
    load_validation_config,
    split_cases,
    validate_candidate,
)

REPO = Path(__file__).resolve().parents[2]


def test_holdout_is_seeded_stable_and_leaves_a_case_to_train_on() -> None:
    ids = [f"pt_{i}" for i in range(1, 11)]
    train, held = split_cases(ids, ValidationConfig(holdout_cases=3))
    assert len(held) == 3 and sorted(train + held) == sorted(ids) and split_cases(ids[::-1], ValidationConfig(
        holdout_cases=3)) == (train, held)
    # one more case moves at most one case between the splits
    assert len(set(held) - set(split_cases([*ids, "pt_11"], ValidationConfig(holdout_cases=3))[1])) <= 1
    assert split_cases(["a", "b"], ValidationConfig(holdout_cases=4)) in ((["a"], ["b"]), (["b"], ["a"]))
    assert split_cases(["a", "b", "c"], ValidationConfig(case_ids=["c"])) == (["a", "b"], ["c"])
    with pytest.raises(ConfigError, match=r"\['zz'\] are not cases with a reference dose"):
        split_cases(["a", "b"], ValidationConfig(case_ids=["zz"]))
    with pytest.raises(ConfigError, match="no case left to train on"):
        split_cases(["a"], ValidationConfig(case_ids=["a"]))


def test_shipped_settings_and_overrides() -> None:
    cfg = load_validation_config(REPO / "configs/validation.yaml", {"rule.min_cases": 5, "steps": 2})
    assert (cfg.rule.min_cases, cfg.steps, cfg.holdout_cases) == (5, 2, 4)
    with pytest.raises(ConfigError, match="unknown validation rule keys"):
        load_validation_config(REPO / "configs/validation.yaml", {"rule.min_case": 1})
    with pytest.raises(ConfigError, match="min_cases must be an integer >= 1"):
        load_validation_config(REPO / "configs/validation.yaml", {"rule.min_cases": 0})


def _rows(values: list[tuple[float, float, float]]) -> list[dict]:
    return [{"case_id": f"c{i}", "dose_score_gy": d, "dvh_score_gy": v, "scorecard_pct": s,
             "preference_scorecard_pct": s} for i, (d, v, s) in enumerate(values)]


def test_paired_rule() -> None:
    served = _rows([(3.0, 2.0, 80.0), (4.0, 3.0, 70.0), (5.0, 2.5, 60.0)])
    rule = PromotionRule(min_cases=3, dose_score_margin_gy=0.05)
    better = decide(_rows([(2.9, 2.0, 81.0), (3.9, 3.0, 70.0), (5.0, 2.4, 61.0)]), served, rule)
    assert better["decision"] == PROMOTE and better["reasons"] == []
    assert better["paired_mean_difference"]["dose_score_gy"] == pytest.approx(-0.2 / 3)
    # worse on average by more than the margin (one case much worse outweighs two slightly better)
    worse = decide(_rows([(2.95, 2.0, 80.0), (3.95, 3.0, 70.0), (5.5, 2.5, 60.0)]), served, rule)
    assert worse["decision"] == KEEP and "dose_score_gy: candidate worse by 0.133" in worse["reasons"][0]
    # the preference-weighted Scorecard counts only when the run learned weights
    pref_worse = _rows([(3.0, 2.0, 80.0), (4.0, 3.0, 70.0), (5.0, 2.5, 60.0)])
    for r in pref_worse:
        r["preference_scorecard_pct"] -= 2.0
    assert decide(pref_worse, served, rule)["decision"] == PROMOTE
    assert "preference_scorecard_pct" in decide(pref_worse, served, rule, weighted=True)["reasons"][0]
    # too few cases, or a figure that is not finite: kept whatever the means say
    assert "min_cases = 3" in decide(_rows([(1.0, 1.0, 99.0)] * 2), served[:2], rule)["reasons"][0]
    nan = _rows([(math.nan, 2.0, 80.0), (4.0, 3.0, 70.0), (5.0, 2.5, 60.0)])
    assert "not finite" in decide(nan, served, rule)["reasons"][0]
    # nothing served: promoted on case count and finiteness alone
    assert decide(served, None, rule)["decision"] == PROMOTE


@pytest.fixture
def ruined_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny model with its weights scaled by 50 (what a learning rate far too high does)."""
    blob = read_checkpoint(tiny_checkpoint)
    from diffkt3d.models.checkpoint import load_checkpoint

    bundle = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.mul_(50.0)
    return save_checkpoint(tmp_path / "ruined.pt", bundle.model, bundle.model.config, bundle.encoding,
                           blob["flow_shift"], meta={"name": "ruined"})


def test_candidate_and_served_model_on_real_cases(openkbp_root: Path, tiny_checkpoint: Path, ruined_checkpoint):
    """Same seed, same cases: the served model against itself is exactly not worse; a ruined copy is kept."""
    cases = [openkbp_root / "validation" / c for c in ("pt_201", "pt_202")]
    cfg = ValidationConfig(steps=1, rule=PromotionRule(min_cases=2))
    same = validate_candidate(tiny_checkpoint, tiny_checkpoint, cases, cfg)
    assert same["decision"] == PROMOTE and same["cases"] == ["pt_201", "pt_202"]
    assert all(v == 0.0 for v in same["paired_mean_difference"].values()), same["paired_mean_difference"]
    assert same["candidate"] == same["reference"] and same["candidate"][0]["dose_score_gy"] > 0
    ruined = validate_candidate(ruined_checkpoint, tiny_checkpoint, cases, cfg)
    assert ruined["decision"] == KEEP and ruined["reasons"], ruined
