"""Quality gate: a target is validated only by a recorded benchmark that meets its acceptance."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from diffkt3d.inference import Predictor
from diffkt3d.inference.quality import (
    EXPERIMENTAL,
    MIN_CASES,
    VALIDATED,
    empty_mask_warnings,
    meets_acceptance,
    quality_record,
    target_quality,
)
from diffkt3d.models.checkpoint import read_checkpoint, update_meta

GOOD_OAR = {"mean_dice": 0.8, "dice": {"Brainstem": 0.85, "SpinalCord": 0.75, "Larynx": 0.7}}


@pytest.mark.parametrize("target,figures,ok", [
    ("oar", GOOD_OAR, True),
    ("oar", {"mean_dice": 0.8, "dice": {"Brainstem": 0.95, "SpinalCord": 0.45}}, False),  # one OAR < 0.5
    ("oar", {"mean_dice": 0.74, "dice": {"Brainstem": 0.74}}, False),
    ("oar", {"mean_dice": 0.9, "dice": {}}, False),  # no per-OAR figures
    ("ct", {"mae_hu": 150.0}, True),
    ("ct", {"mae_hu": 238.0}, False),
    ("ct", {}, False),
    ("ptv", {"dice_high": 0.5}, True),
    ("ptv", {"dice_high": 0.0}, False),
    ("ptv", {"dice_high": "n/a"}, False),
])
def test_acceptance_rules(target, figures, ok):
    assert meets_acceptance(target, figures) is ok


def test_no_record_is_experimental():
    verdict = target_quality({"name": "m"}, "oar")
    assert verdict.status == EXPERIMENTAL and "no benchmark" in verdict.reason


def test_record_decides_and_names_its_figures():
    meta = {"quality": {"oar": quality_record("oar", GOOD_OAR, 40, "benchmarks/results/x.md", "2026-12-05"),
                        "ct": quality_record("ct", {"mae_hu": 238.4}, 40, "x.md", "2026-12-05"),
                        "ptv": quality_record("ptv", {"dice_high": 0.9}, MIN_CASES - 1, "x.md", "2026-12-05")}}
    assert target_quality(meta, "oar").status == VALIDATED
    ct = target_quality(meta, "ct")
    assert ct.status == EXPERIMENTAL and "238.4 HU" in ct.reason and ct.cases == 40
    ptv = target_quality(meta, "ptv")
    assert ptv.status == EXPERIMENTAL and f"{MIN_CASES - 1} cases" in ptv.reason


def test_empty_masks_are_named():
    masks = {"Brainstem": np.zeros((4, 4, 4), bool), "Larynx": np.ones((4, 4, 4), bool)}
    assert empty_mask_warnings(masks) == ["Brainstem: the imputed mask is empty"]


def test_predictor_attaches_the_verdict_and_warnings(tiny_checkpoint, synthetic_case, tmp_path):
    res = Predictor.load(tiny_checkpoint, device="cpu").impute(synthetic_case, "oar", steps=1)
    assert res.quality is not None and res.quality.status == EXPERIMENTAL
    assert res.warnings[0].startswith("oar imputation is experimental")
    empty = [n for n, m in res.masks.items() if not m.any()]
    assert sum(w.endswith("mask is empty") for w in res.warnings) == len(empty)
    # The same weights with a passing OAR record: validated, no experimental warning.
    path = shutil.copy(tiny_checkpoint, tmp_path / "validated.pt")
    update_meta(path, {"quality": {"oar": quality_record("oar", GOOD_OAR, 40, "x.md", "2026-12-05")}})
    before, after = read_checkpoint(tiny_checkpoint), read_checkpoint(path)
    assert all((before["state_dict"][k] == after["state_dict"][k]).all() for k in before["state_dict"])
    assert after["meta"]["name"] == "tiny-test"  # other metadata kept
    predictor = Predictor.load(path, device="cpu")
    res2 = predictor.impute(synthetic_case, "oar", steps=1)
    assert res2.quality.status == VALIDATED
    assert not any("experimental" in w for w in res2.warnings)
    assert np.array_equal(np.stack(list(res2.masks.values())), np.stack(list(res.masks.values())))
    assert predictor.quality()["oar"]["status"] == VALIDATED
    assert predictor.quality()["ct"]["status"] == EXPERIMENTAL
