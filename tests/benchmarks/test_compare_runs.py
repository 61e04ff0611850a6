"""benchmarks/compare_runs.py: paired comparison of variants from different results files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import compare_runs  # noqa: E402


def _results(path: Path, variant: str, dose: list[float], dvh: list[list[float]], scorecard: list[float]) -> None:
    rows = [{"case": f"pt_{i}", "dose_score": d, "dvh_errors": e, "scorecard": s}
            for i, (d, e, s) in enumerate(zip(dose, dvh, scorecard, strict=True))]
    path.write_text(json.dumps({"results": {variant: {"rows": rows}}}))


def _run(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", *args])
    compare_runs.main()


def _error(monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """The message the script stops with (SystemExit text, not a traceback)."""
    with pytest.raises(SystemExit) as stop:
        _run(monkeypatch, *args)
    assert isinstance(stop.value.code, str)
    return stop.value.code


def test_paired_figures_match_an_independent_computation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_dose, run_dose = [4.0, 5.0, 6.0, 3.0, 4.5, 5.5], [3.5, 5.2, 5.0, 2.9, 4.0, 5.4]
    base_sc, run_sc = [60.0, 70.0, 65.0, 80.0, 75.0, 50.0], [61.0, 69.0, 70.0, 85.0, 76.0, 52.0]
    base_dvh = [[1.0, -3.0], [2.0, 2.0], [-4.0, 0.0], [1.0, 1.0], [0.5, -0.5], [3.0, 1.0]]
    run_dvh = [[0.5, -1.0], [2.5, 2.0], [-1.0, 1.0], [0.5, 0.5], [0.5, 0.5], [1.0, 1.0]]
    _results(tmp_path / "a.json", "peer", base_dose, base_dvh, base_sc)
    # The second file lists its cases in another order and has one case the baseline lacks.
    _results(tmp_path / "b.json", "dit10", run_dose[::-1] + [9.0], run_dvh[::-1] + [[9.0]], run_sc[::-1] + [1.0])
    blob = json.loads((tmp_path / "b.json").read_text())
    for i, row in enumerate(blob["results"]["dit10"]["rows"]):
        row["case"] = f"pt_{5 - i}" if i < 6 else "pt_extra"
    (tmp_path / "b.json").write_text(json.dumps(blob))
    _run(monkeypatch, f"{tmp_path / 'a.json'}:peer", f"{tmp_path / 'b.json'}:dit10", "--out", str(tmp_path / "cmp"))
    table = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]]
             for line in (tmp_path / "cmp.md").read_text().splitlines() if "vs" in line}
    d = np.array(run_dose) - np.array(base_dose)
    assert table["dose score (Gy)"] == ["6", f"{np.mean(run_dose):.3f}", f"{np.mean(base_dose):.3f}",
                                        f"{d.mean():+.3f}", str(int((d < 0).sum())), f"{wilcoxon(d).pvalue:.2g}"]
    dvh = np.array([np.mean(np.abs(r)) for r in run_dvh]) - np.array([np.mean(np.abs(b)) for b in base_dvh])
    assert table["mean DVH error per case (Gy)"][3:5] == [f"{dvh.mean():+.3f}", str(int((dvh < 0).sum()))]
    sc = np.array(run_sc) - np.array(base_sc)  # higher is better: "better" counts the increases
    assert table["Scorecard"][3:5] == [f"{sc.mean():+.3f}", str(int((sc > 0).sum()))]


def test_bad_specs_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _results(tmp_path / "a.json", "peer", [1.0, 2.0], [[1.0], [2.0]], [1.0, 2.0])
    a, out = f"{tmp_path / 'a.json'}:peer", str(tmp_path / "cmp")
    assert "no variant 'dit10'" in _error(monkeypatch, a, f"{tmp_path / 'a.json'}:dit10", "--out", out)
    assert "missing.json" in _error(monkeypatch, a, f"{tmp_path / 'missing.json'}:peer", "--out", out)
    assert "RESULTS.json" in _error(monkeypatch, a, str(tmp_path / "a.json"), "--out", out)
    assert "invalid object name" in _error(monkeypatch, a, f"{tmp_path / 'a.json'}@no-such-rev:peer", "--out", out)
    assert not (tmp_path / "cmp.md").exists()
