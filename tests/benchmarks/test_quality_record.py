"""`dose_benchmark.py --record-quality`: imputation rows -> the checkpoint's quality-gate record."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from dose_benchmark import quality_figures, record_quality  # noqa: E402

from diffkt3d.inference.quality import EXPERIMENTAL, VALIDATED, target_quality  # noqa: E402
from diffkt3d.models.checkpoint import read_checkpoint  # noqa: E402

ROWS = [{"ct_mae_hu": 100.0, "ptv_dice": {"PTV56": 0.1, "PTV70": 0.6}, "oar_dice": {"Brainstem": 0.8, "Larynx": 0.6}},
        {"ct_mae_hu": 140.0, "ptv_dice": {"PTV63": 0.9}, "oar_dice": {"Brainstem": 0.9}},
        {"ptv_dice": {"PTV70": 0.4, "PTV63": 0.0}, "oar_dice": {"Brainstem": 0.7, "Larynx": 0.8}}]


def test_figures_follow_the_gate_definitions():
    q = quality_figures(ROWS)
    assert q["ct"] == {"figures": {"mae_hu": 120.0}, "cases": 2}
    assert q["ptv"]["figures"]["dice_high"] == pytest.approx((0.6 + 0.9 + 0.4) / 3, abs=1e-4) and q["ptv"]["cases"] == 3
    oar = q["oar"]["figures"]
    assert oar["dice"] == {"Brainstem": pytest.approx(0.8), "Larynx": pytest.approx(0.7)}
    assert oar["mean_dice"] == pytest.approx((0.8 + 0.6 + 0.9 + 0.7 + 0.8) / 5, abs=1e-4) and q["oar"]["cases"] == 3


def test_record_writes_meta_the_predictor_reads(tiny_checkpoint, tmp_path):
    path = str(shutil.copy(tiny_checkpoint, tmp_path / "m.pt"))
    record_quality(path, ROWS * 10, "benchmarks/results/x.md", "2026-12-05")  # 30 rows: enough cases
    meta = read_checkpoint(path)["meta"]
    assert meta["quality"]["ct"]["benchmark"] == "benchmarks/results/x.md"
    assert target_quality(meta, "ct").status == VALIDATED  # 120 HU <= 150
    assert target_quality(meta, "oar").status == VALIDATED  # mean 0.76, lowest 0.7
    assert target_quality(meta, "ptv").status == VALIDATED  # 0.63
    record_quality(path, [{"ct_mae_hu": 300.0}] * 30, "y.md", "2026-12-06")  # a later CT-only run
    meta = read_checkpoint(path)["meta"]
    assert target_quality(meta, "ct").status == EXPERIMENTAL and meta["quality"]["oar"]["benchmark"] == "benchmarks/results/x.md"
