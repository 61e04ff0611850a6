"""README "Benchmarks": `python benchmarks/dose_benchmark.py`, run as written with its own options that
keep it cheap (`--limit 1 --variants dit1 prior grid`, output in a temporary folder): the script, its child
process, the metrics and the report writer all run; the figures themselves come from the full run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dose_benchmark_one_case_preview(tmp_path: Path, openkbp_root: Path) -> None:
    out = tmp_path / "dose_benchmark"
    proc = subprocess.run([sys.executable, "benchmarks/dose_benchmark.py", "--limit", "1", "--variants", "dit1", "prior", "grid",
                           "--threads", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.with_suffix(".md").read_text()
    assert "| DiffKT3D cpu-default, 1-step preview | 1 |" in report and "Machine:" in report
    blob = json.loads(out.with_suffix(".json").read_text())
    summary = blob["results"]["dit1"]["summary"]
    assert summary["n"] == 1 and 0 < summary["dose_score"] < 40 and blob["results"]["dit1"]["peak_rss_mb"] > 0
    prior = blob["results"]["prior"]["summary"]
    assert prior["n"] == 1 and 0 < prior["dose_score"] < 40
    # The paired row is the per-case difference of the two variants' own figures.
    paired = blob["results"]["paired"]
    assert paired["dit1-prior:dose_score"]["mean_diff"] == pytest.approx(summary["dose_score"] - prior["dose_score"])
    # DVH is paired on each case's mean DVH error (one case: the pooled score), Scorecard on its total.
    assert paired["dit1-prior:dvh_case"]["mean_diff"] == pytest.approx(summary["dvh_score"] - prior["dvh_score"])
    assert paired["dit1-prior:scorecard"]["mean_diff"] == pytest.approx(summary["scorecard"] - prior["scorecard"])
    assert paired["dit1-prior:scorecard"]["a_better"] == int(summary["scorecard"] > prior["scorecard"])
    assert "| dit1 vs prior | dose score, Gy | 1 |" in report and "| dit1 vs prior | DVH score, Gy | 1 |" in report
    # The DiT's own version and training record are named.
    assert "DiT: model version cpu-default@" in report
    # Per-item table: item ids are the template's own.
    assert "## Scorecard by item" in report and "| ptv_high_d95 |" in report
    from diffkt3d.scorecard import load_template

    item_ids = {it.id for it in load_template("openkbp_hn").items}
    row = blob["results"]["dit1"]["rows"][0]
    assert set(row["scorecard_items"]) <= item_ids and row["scorecard"] > 0
    # The working-grid round trip of the reference is far closer to it than any prediction.
    grid = blob["results"]["grid"]["summary"]
    assert grid["n"] == 1 and 0 < grid["dose_score"] < 2.0 and grid["dose_score"] < summary["dose_score"] / 2


@pytest.mark.slow
def test_a_compared_checkpoint_is_paired_with_the_model(tmp_path: Path, openkbp_root: Path) -> None:
    """--compare NAME=CKPT: the same checkpoint compared with itself differs by nothing, case by case."""
    out = tmp_path / "dose_benchmark"
    shipped = REPO / "diffkt3d" / "weights" / "cpu-default.pt"
    proc = subprocess.run([sys.executable, "benchmarks/dose_benchmark.py", "--limit", "1", "--variants", "dit10",
                           "--compare", f"again={shipped}", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    blob = json.loads(out.with_suffix(".json").read_text())
    a, b = blob["results"]["dit10"], blob["results"]["again"]
    assert a["summary"]["n"] == b["summary"]["n"] == 1
    assert blob["results"]["paired"]["dit10-again:dose_score"]["mean_diff"] == pytest.approx(0.0, abs=1e-6)
    report = out.with_suffix(".md").read_text()
    assert "| again (cpu-default.pt), 10 steps | 1 |" in report and "| dit10 vs again | dose score, Gy | 1 |" in report
    assert "\nagain: model version cpu-default@" in report


def test_bad_compare_and_missing_data_are_one_line_errors(tmp_path: Path) -> None:
    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        import os

        return subprocess.run([sys.executable, "benchmarks/dose_benchmark.py", *args, "--out", str(tmp_path / "x")],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})

    proc = run("--cases", str(REPO / "sample-data"), "--compare", "nothing-here")
    assert proc.returncode == 2 and "--compare takes NAME=CKPT, found 'nothing-here'" in proc.stderr
    proc = run("--cases", str(REPO / "sample-data"), "--compare", f"peer={tmp_path / 'none.pt'}")
    assert proc.returncode == 2 and "'peer' is already a variant" in proc.stderr
    proc = run("--cases", str(tmp_path / "no-such-folder"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no-such-folder" in proc.stderr and "data root does not exist" in proc.stderr
