"""`diffkt3d evaluate`: figures vs independent numpy computations, JSON == printed table, errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from diffkt3d.cli.main import main
from diffkt3d.data.case import Case, Grid, Structure
from diffkt3d.io.case_folder import load_case_folder, save_case_folder, save_nifti
from diffkt3d.scorecard import score_case

torch.set_num_threads(1)

SHAPE = (16, 16, 16)  # >= the 11-voxel SSIM window
SPACING = (3.0, 3.0, 2.5)
OPENKBP_VALIDATION = (Path(__file__).resolve().parents[2].parent / "shared" / "datasets/openkbp/validation")


def _synthetic_case(case_id: str, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    grid = Grid(SHAPE, np.diag([*SPACING, 1.0]))
    body = np.zeros(SHAPE, dtype=bool)
    body[2:14, 2:14, 2:14] = True
    ptv = np.zeros(SHAPE, dtype=bool)
    ptv[6:10, 6:10, 6:10] = True
    cord = np.zeros(SHAPE, dtype=bool)
    cord[6:10, 12:13, 4:12] = True
    parotid = np.zeros(SHAPE, dtype=bool)
    parotid[3:6, 3:6, 6:10] = True
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    r = np.sqrt((zz - 7.5) ** 2 + (yy - 7.5) ** 2 + (xx - 7.5) ** 2)
    dose = (72.0 * np.exp(-((r / 6.0) ** 2)) + rng.uniform(0, 1, SHAPE)) * body
    return Case(case_id=case_id, grid=grid, ct_hu=np.zeros(SHAPE, np.float32), dose_gy=dose.astype(np.float32),
                body=body, structures={"PTV70": Structure("PTV70", ptv, "target", 70.0),
                                       "SpinalCord": Structure("SpinalCord", cord, "oar"),
                                       "LeftParotid": Structure("LeftParotid", parotid, "oar")})


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Reference root with two cases and a prediction root with perturbed doses."""
    ref_root, pred_root = tmp_path / "ref", tmp_path / "pred"
    preds = {}
    for i, cid in enumerate(("pt_2", "pt_10")):
        case = _synthetic_case(cid, i)
        save_case_folder(case, ref_root / cid, write_plan=False)
        pred = (case.dose_gy * (1.03 + 0.02 * i) + 0.5).astype(np.float32)
        save_nifti(pred, case.grid, pred_root / cid / "dose.nii.gz")
        preds[cid] = pred
    return ref_root, pred_root, preds


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(pt_\d+|mean \(n=\d+\))\s+(.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2).split()
    return rows


def test_evaluate_figures_and_json_match_printed_table(roots, tmp_path: Path, capsys) -> None:
    ref_root, pred_root, preds = roots
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--pred", str(pred_root), "--ref", str(ref_root), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [c["case_id"] for c in data["cases"]] == ["pt_2", "pt_10"]  # natural order

    # independent computations of a few figures
    for entry in data["cases"]:
        ref_case = load_case_folder(ref_root / entry["case_id"])
        ref, pred = ref_case.dose_gy.astype(np.float64), preds[entry["case_id"]].astype(np.float64)
        assert entry["dose_score"] == pytest.approx(np.abs(ref - pred).sum() / ref_case.body.sum(), rel=1e-6)
        mse = np.mean((ref - pred) ** 2)
        assert entry["psnr"] == pytest.approx(20 * np.log10(80.0) - 10 * np.log10(mse), rel=1e-4)
        assert entry["scorecard"] == pytest.approx(score_case(pred, ref_case, "openkbp_hn").total)
        assert entry["scorecard_ref"] == pytest.approx(score_case(ref, ref_case, "openkbp_hn").total)
        assert entry["scorecard_detail"]["total"] == pytest.approx(entry["scorecard"])
        assert 0 <= entry["gamma_pass_rate"] <= 100 and entry["ssim"] < 1

    # JSON holds the same figures the table prints (rounded as printed)
    rows = _table_rows(printed)
    keys = list(data["metrics"])
    formats = {"dose_score": 3, "dvh_score": 3, "gdp_hmm_mae": 3, "psnr": 2, "ssim": 4,
               "gamma_pass_rate": 2, "scorecard": 2, "scorecard_ref": 2, "scorecard_max": 1}
    for entry in data["cases"]:
        for key, text in zip(keys, rows[entry["case_id"]], strict=True):
            assert text == f"{entry[key]:.{formats[key]}f}", (entry["case_id"], key)
    for key, text in zip(keys, rows["mean (n=2)"], strict=True):
        assert text == f"{data['means'][key]:.{formats[key]}f}", key
    assert data["means"]["dose_score"] == pytest.approx(np.mean([c["dose_score"] for c in data["cases"]]))


def test_missing_prediction_is_an_error_naming_the_case(roots, capsys) -> None:
    ref_root, pred_root, _ = roots
    (pred_root / "pt_10" / "dose.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(pred_root), "--ref", str(ref_root), "--no-gamma", "--no-ssim"]) == 2
    err = capsys.readouterr().err
    assert "pt_10" in err and "--allow-missing" in err and len(err.strip().splitlines()) == 1


def test_allow_missing_skips_and_lists(roots, tmp_path: Path, capsys) -> None:
    ref_root, pred_root, _ = roots
    (pred_root / "pt_10" / "dose.nii.gz").unlink()
    out = tmp_path / "e.json"
    assert main(["evaluate", "--pred", str(pred_root), "--ref", str(ref_root), "--allow-missing",
                 "--no-gamma", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped pt_10" in printed and "gamma pass rate not computed" in printed
    data = json.loads(out.read_text())
    assert [c["case_id"] for c in data["cases"]] == ["pt_2"]
    assert "pt_10" in data["skipped"]
    assert data["cases"][0]["gamma_pass_rate"] is None


def test_grid_mismatch_names_both_files(roots, capsys) -> None:
    ref_root, pred_root, preds = roots
    bad = pred_root / "pt_2" / "dose.nii.gz"
    nib.save(nib.Nifti1Image(preds["pt_2"], np.diag([2.0, 2.0, 2.0, 1.0])), str(bad))
    assert main(["evaluate", "--pred", str(pred_root), "--ref", str(ref_root), "--no-gamma", "--no-ssim"]) == 2
    err = capsys.readouterr().err
    assert "grid mismatch" in err and str(bad) in err and str(ref_root / "pt_2" / "dose.nii.gz") in err
    nib.save(nib.Nifti1Image(preds["pt_2"][:-1], np.diag([*SPACING, 1.0])), str(bad))
    assert main(["evaluate", "--pred", str(pred_root), "--ref", str(ref_root), "--no-gamma", "--no-ssim"]) == 2
    assert "(15, 16, 16)" in capsys.readouterr().err


def test_bad_template_and_nan_prediction(roots, capsys) -> None:
    ref_root, pred_root, preds = roots
    assert main(["evaluate", "--pred", str(pred_root), "--ref", str(ref_root), "--template", "nope"]) == 2
    assert "unknown Scorecard template 'nope'" in capsys.readouterr().err
    nan_pred = preds["pt_10"].copy()
    nan_pred[8, 8, 8] = np.nan
    save_nifti(nan_pred, Grid(SHAPE, np.diag([*SPACING, 1.0])), pred_root / "pt_10" / "dose.nii.gz")
    assert main(["evaluate", "--pred", str(pred_root), "--ref", str(ref_root), "--no-gamma", "--no-ssim"]) == 2
    err = capsys.readouterr().err
    assert "pt_10" in err and "NaN" in err


@pytest.mark.slow
@pytest.mark.skipif(not OPENKBP_VALIDATION.is_dir(), reason="OpenKBP validation data not on this machine")
def test_reference_against_itself_on_real_validation_cases(tmp_path: Path, capsys) -> None:
    cases = ["pt_201", "pt_212"]  # pt_212 lacks several OARs: exercises skipped Scorecard items
    out = tmp_path / "self.json"
    root = str(OPENKBP_VALIDATION)
    assert main(["evaluate", "--pred", root, "--ref", root, "--cases", *cases, "--json", str(out)]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    for entry in data["cases"]:
        assert entry["dose_score"] == 0.0 and entry["dvh_score"] == 0.0 and entry["gdp_hmm_mae"] == 0.0
        assert entry["psnr"] is None  # identical doses: infinite PSNR, null in strict JSON
        assert entry["ssim"] == pytest.approx(1.0, abs=1e-6)
        assert entry["gamma_pass_rate"] == 100.0
        case = load_case_folder(OPENKBP_VALIDATION / entry["case_id"])
        reference = score_case(case.dose_gy, case, "openkbp_hn")
        assert entry["scorecard"] == entry["scorecard_ref"] == pytest.approx(reference.total)
        # one item against an independent numpy computation: PTV70 D95 in % of 70 Gy
        d95 = 100.0 * np.percentile(case.dose_gy[case.structures["PTV70"].mask].astype(np.float64), 5) / 70.0
        item = next(i for i in entry["scorecard_detail"]["items"] if i["id"] == "ptv_high_d95")
        assert item["value"] == pytest.approx(d95, rel=1e-9)
    skipped = {s["id"] for s in data["cases"][1]["scorecard_detail"]["skipped"]}
    assert {"mandible_d01cc", "larynx_dmean", "esophagus_dmean", "ptv_lower_d95"} == skipped
    assert math.isclose(data["means"]["dose_score"], 0.0)


def test_required_structure_missing_is_one_line_unknown_structure_error(roots, tmp_path: Path, capsys) -> None:
    ref_root, pred_root, _ = roots
    template = tmp_path / "inst.yaml"
    template.write_text(
        "name: inst\nitems:\n"
        "  - {id: larynx, structure: Larynx, metric: Dmean, points: [[44, 10], [55, 0]], required: true}\n")
    assert main(["evaluate", "--pred", str(pred_root), "--ref", str(ref_root), "--template", str(template),
                 "--no-gamma", "--no-ssim"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "case pt_2" in err and "unknown Scorecard structure 'Larynx'" in err and "PTV70" in err
