"""`diffkt3d predict` / `impute` refuse bad option values and cases the server refuses too, with one
line on stderr and exit code 2, before any model is loaded or any output written."""

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


def test_predict_refuses_a_case_without_ct_like_the_server(tmp_path: Path, synthetic_case_dir: Path,
                                                           tiny_checkpoint: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    (synthetic_case_dir / "ct.nii.gz").unlink()
    out = tmp_path / "out"
    rc = main(["predict", str(synthetic_case_dir), "--out", str(out), "--model", str(tiny_checkpoint),
               "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing ct, which is required here" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
