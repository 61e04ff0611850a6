"""The README's command-line reference, run as a user would: the `diffkt3d` console script in a
subprocess, from the repository root, on the shipped model and `sample-data/`.

Each test names the README line it guards (tests/test_readme.py maps every README command to a
test). Long jobs use the documented smoke options (`--max-steps`, `--max-cases`) so the exact recipe
files (`configs/*.yaml`) run end to end in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample-data"
SAMPLE_CASES = ["sample-data/pt_201", "sample-data/pt_202", "sample-data/pt_205"]


def diffkt3d(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run `diffkt3d ARGS` (the installed console script) from the repository root."""
    exe = Path(sys.executable).parent / "diffkt3d"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([str(exe), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"diffkt3d {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def predicted_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """README: `diffkt3d predict CASE... --out ROOT [--preview] [--seed S]` on the three sample cases."""
    out = tmp_path_factory.mktemp("predict")
    proc = diffkt3d("predict", *SAMPLE_CASES, "--out", str(out), "--preview", "--seed", "3")
    assert proc.stdout.count("Scorecard") == 3, proc.stdout
    return out


@pytest.mark.slow
def test_predict_preview_writes_dose_and_scorecard_per_case(predicted_root: Path) -> None:
    for case in SAMPLE_CASES:
        name = Path(case).name
        dose = nib.load(str(predicted_root / name / "dose.nii.gz"))
        ref = nib.load(str(SAMPLE / name / "possible_dose_mask.nii.gz"))
        assert dose.shape == ref.shape and np.allclose(dose.affine, ref.affine)
        dose_gy = np.asarray(dose.dataobj)
        assert np.isfinite(dose_gy).all() and dose_gy.min() >= 0 and 10 < dose_gy.max() < 150
        report = json.loads((predicted_root / name / "scorecard.json").read_text())
        assert report["steps"] == 1 and report["seed"] == 3 and report["model_version"].startswith("cpu-default@")
        assert report["scorecard"]["template"]["name"] == "openkbp_hn"


@pytest.mark.slow
def test_predict_model_steps_candidates_aggregate(tmp_path: Path) -> None:
    """README: `diffkt3d predict CASE --out ROOT --model PATH --steps N --candidates N --aggregate best`."""
    diffkt3d("predict", "sample-data/pt_201", "--out", str(tmp_path), "--model", "diffkt3d/weights/cpu-default.pt",
             "--steps", "2", "--candidates", "2", "--aggregate", "best", "--seed", "5")
    report = json.loads((tmp_path / "pt_201" / "scorecard.json").read_text())
    assert report["steps"] == 2 and report["aggregate"] == "best" and len(report["candidates"]) == 2
    best = max(report["candidates"], key=lambda c: c["scorecard_total"])
    assert report["chosen_id"] == best["id"] and [c["seed"] for c in report["candidates"]] == [5, 6]
    assert report["scorecard"]["total"] == best["scorecard_total"] and report["dvh"]["PTV70"]["volume_cc"] > 0


@pytest.mark.slow
def test_evaluate_predictions_against_sample_data(predicted_root: Path, tmp_path: Path) -> None:
    """README: `diffkt3d evaluate --pred ROOT --ref ROOT --json FILE --template openkbp_hn`."""
    out = tmp_path / "eval.json"
    proc = diffkt3d("evaluate", "--pred", str(predicted_root), "--ref", "sample-data", "--json", str(out),
                    "--template", "openkbp_hn")
    blob = json.loads(out.read_text())
    assert blob["n_cases"] == 3 and {c["case_id"] for c in blob["cases"]} == {"pt_201", "pt_202", "pt_205"}
    assert 0 < blob["means"]["dose_score"] < 40
    assert f"{blob['means']['dose_score']:.3f}" in proc.stdout


@pytest.mark.slow
def test_impute_ptv_writes_masks_on_the_case_grid(tmp_path: Path) -> None:
    """README: `diffkt3d impute --target ct|ptv|oar CASE... --out ROOT --steps N --seed S`."""
    diffkt3d("impute", "--target", "ptv", "sample-data/pt_201", "--out", str(tmp_path), "--steps", "2", "--seed", "1")
    report = json.loads((tmp_path / "pt_201" / "impute_ptv.json").read_text())
    assert report["steps"] == 2 and report["files"], report
    ref = nib.load(str(SAMPLE / "pt_201" / "PTV70.nii.gz"))
    for name in report["files"]:
        mask = nib.load(str(tmp_path / "pt_201" / name))
        assert mask.shape == ref.shape and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


@pytest.mark.slow
def test_export_then_import_dicom_round_trip(tmp_path: Path) -> None:
    """README: `diffkt3d export dicom CASE... --out ROOT` and `diffkt3d import dicom SRC... --out ROOT`."""
    diffkt3d("export", "dicom", "sample-data/pt_201", "--out", str(tmp_path / "dicom"))
    series = next((tmp_path / "dicom").iterdir())
    diffkt3d("import", "dicom", str(series), "--out", str(tmp_path / "cases"))
    case = next((tmp_path / "cases").iterdir())
    ref = nib.load(str(SAMPLE / "pt_201" / "dose.nii.gz"))
    dose = nib.load(str(case / "dose.nii.gz"))
    assert dose.shape == ref.shape
    assert np.abs(np.asarray(dose.dataobj) - np.asarray(ref.dataobj)).max() < 0.05  # RTDOSE quantisation
    assert (case / "PTV70.nii.gz").exists() and (case / "ct.nii.gz").exists()


@pytest.mark.slow
def test_train_cpu_default_recipe_smoke_run(tmp_path: Path, openkbp_root: Path) -> None:
    """README: `diffkt3d train --config configs/cpu-default.yaml --data-root DIR`, capped by the
    documented smoke options; the real recipe file, data folders and encoded-case cache are used unchanged."""
    out = tmp_path / "run"
    proc = diffkt3d("train", "--config", "configs/cpu-default.yaml", "--data-root", str(openkbp_root.parent),
                    "--set", "seed=1", "--max-steps", "2", "--max-cases", "2", "--out-dir", str(out))
    assert json.loads((out / "progress.json").read_text())["stage"] == "dose"
    meta = torch.load(out / "final.pt", map_location="cpu", weights_only=False)["meta"]
    assert meta["global_step"] == 4 and meta["stage"] == "done"
    assert [s["steps"] for s in meta["train_config"]["stages"]] == [2, 2]
    assert meta["train_config"]["seed"] == 1  # --set
    assert [s["loss_norm"] for s in meta["train_config"]["stages"]] == ["l2", "l1"]  # the rest is the recipe's
    assert len(meta["train_config"]["train_roots"]) == 2  # --max-cases: two explicit case folders
    for name in ("best.pt", "last.pt", "stage_any2any.pt", "stage_dose.pt"):
        assert (out / name).exists(), name
    # then the recipe's full-res stages, each under the step before, capped by the same smoke options
    recipe = yaml.safe_load((REPO / "configs" / "cpu-default.yaml").read_text())
    last = out / f"full-res-{len(recipe['full_res_stages']) - 1}" / "final.pt"
    assert f"full-res stage(s)): {last}" in proc.stdout
    stages = torch.load(last, map_location="cpu", weights_only=False)["meta"]["full_res"]
    assert all(rec["step"] == 2 and rec["cases"] <= 2 for rec in stages.values()) and "oar" in stages


@pytest.mark.slow
def test_train_scardnft_recipe_smoke_run(tmp_path: Path, openkbp_root: Path) -> None:
    """README: `diffkt3d train --stage scardnft --config configs/scardnft-cpu.yaml --data-root DIR`, one
    iteration on one case."""
    pytest.importorskip("peft")
    out = tmp_path / "scardnft"
    proc = diffkt3d("train", "--stage", "scardnft", "--config", "configs/scardnft-cpu.yaml", "--data-root",
                    str(openkbp_root.parent), "--max-steps", "1", "--max-cases", "1", "--out-dir", str(out))
    assert "merged checkpoint:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 1
    assert (out / "adapter.pt").exists() and (out / "merged.pt").exists()


def test_smoke_options_refuse_bad_values_in_one_line() -> None:
    exe = Path(sys.executable).parent / "diffkt3d"
    proc = subprocess.run([str(exe), "train", "--config", "configs/cpu-default.yaml", "--max-steps", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--max-steps must be >= 1, found 0" in proc.stderr
    assert "Traceback" not in proc.stderr
