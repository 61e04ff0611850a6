"""benchmarks/fit_gap.py: the trainer's validation proxy, run on training and validation cases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffkt3d.models.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "diffkt3d/weights/cpu-default.pt"


@pytest.mark.slow
def test_validation_figure_is_the_one_the_trainer_selected_on(tmp_path: Path, openkbp_root: Path) -> None:
    # The shipped checkpoint records the proxy the trainer computed on the first 8 validation cases
    # when it saved best.pt; the script must reproduce it, which pins it to the trainer's figure.
    recorded = read_checkpoint(SHIPPED)["meta"]["best_val_dose_mae_gy"]
    out = tmp_path / "fit_gap"
    train_root = tmp_path / "train"  # the three NIfTI sample cases stand in for a training split
    train_root.mkdir()
    for case in sorted((REPO / "sample-data").glob("pt_*")):
        (train_root / case.name).symlink_to(case)
    proc = subprocess.run([sys.executable, "benchmarks/fit_gap.py", "--models", str(SHIPPED), "--cases", "8",
                           "--train-roots", str(train_root), "--val-roots", str(openkbp_root / "validation"),
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert row["validation_cases"] == 8
    assert row["validation"] == pytest.approx(recorded, abs=2e-3)
    # sample-data holds 3 OpenKBP validation cases with doses; all are used as the "train" split here.
    assert row["train_cases"] == 3 and 0 < row["train"] < 20
    report = out.with_suffix(".md").read_text()
    assert "Machine:" in report and f"| {row['validation']:.3f} |" in report
