"""`diffkt3d predict` / `impute` refuse bad option values with one line on stderr and exit code 2,
before any model is loaded or any output written, and apply the server's required-inputs policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffkt3d.cli.main import main


@pytest.mark.parametrize("option, value, problem", [
    ("--steps", "0", "--steps must be an integer >= 1, found 0"),
    ("--steps", "-3", "--steps must be an integer >= 1, found -3"),
    ("--candidates", "0", "--candidates must be an integer >= 1, found 0"),
    ("--seed", "-1", "--seed must be an integer >= 0, found -1"),
])
def test_predict_refuses_out_of_range_options(tmp_path: Path, synthetic_case_dir: Path, option: str, value: str,
                                              problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    # a missing model file proves the check runs first: loading it would fail differently
    rc = main(["predict", str(synthetic_case_dir), "--out", str(out), "--model", str(tmp_path / "none.pt"),
               option, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"diffkt3d predict: error: {problem}"
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--seed", "-5")])
def test_impute_refuses_out_of_range_options(tmp_path: Path, synthetic_case_dir: Path, option: str, value: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["impute", str(synthetic_case_dir), "--target", "ct", "--out", str(tmp_path / "o"),
               "--model", str(tmp_path / "none.pt"), option, value])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"{option} must be an integer" in err


def test_predict_follows_the_server_policy_on_required_inputs(tmp_path: Path, synthetic_case_dir: Path,
                                                             tiny_checkpoint: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """No CT: predicted (a missing condition, as on the server); no target: refused, as on the server."""
    from diffkt3d.inference.predictor import DOSE_PREDICTION_INPUTS

    assert DOSE_PREDICTION_INPUTS == ("ptv",)
    (synthetic_case_dir / "ct.nii.gz").unlink()
    out = tmp_path / "out"
    base = ["predict", str(synthetic_case_dir), "--out", str(out), "--model", str(tiny_checkpoint), "--steps", "1"]
    assert main(base) == 0, capsys.readouterr().err
    assert (out / synthetic_case_dir.name / "dose.nii.gz").is_file()
    for p in [*synthetic_case_dir.glob("PTV*.nii.gz"), synthetic_case_dir / "plan.json"]:
        p.unlink()
    rc = main([*base, "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing a target (PTV) with a prescription" in err and len(err.strip().splitlines()) == 1
