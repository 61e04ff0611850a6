"""`diffkt3d impute --target ct --ct-backbone prdit`: the PRDiT CT path of the CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from diffkt3d.cli.main import main


def test_prdit_backbone_writes_ct_on_the_case_grid(tmp_path, synthetic_case_dir, tiny_prdit_checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["impute", str(synthetic_case_dir), "--target", "ct", "--out", str(out), "--steps", "2",
               "--ct-backbone", "prdit", "--prdit-model", str(tiny_prdit_checkpoint), "--prdit-k", "1.5"])
    assert rc == 0, capsys.readouterr().err
    case_out = next(out.iterdir())
    ct = nib.load(str(case_out / "ct.nii.gz"))
    ref = nib.load(str(synthetic_case_dir / "ct.nii.gz"))
    assert ct.shape == ref.shape and np.allclose(ct.affine, ref.affine)
    report = json.loads((case_out / "impute_ct.json").read_text())
    assert report["model_version"].startswith("prdit:tiny-prdit@") and report["steps"] == 2
    # no benchmark recorded with the tiny model: the gate calls the CT experimental, on stderr too
    assert report["quality"]["status"] == "experimental"
    assert report["warnings"] == [f"ct imputation is experimental: {report['quality']['reason']}"]
    assert "WARNING: ct imputation is experimental" in capsys.readouterr().err


def test_oar_imputation_reports_empty_masks(tmp_path, synthetic_case_dir, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    rc = main(["impute", str(synthetic_case_dir), "--target", "oar", "--out", str(out), "--steps", "1",
               "--model", str(tiny_checkpoint)])
    assert rc == 0, capsys.readouterr().err
    case_out = next(out.iterdir())
    report = json.loads((case_out / "impute_oar.json").read_text())
    empty = sorted(f.name.split(".")[0] for f in case_out.glob("*.nii.gz")
                   if not np.asarray(nib.load(str(f)).dataobj).any())
    assert sorted(w.split(":")[0] for w in report["warnings"][1:]) == empty
    err = capsys.readouterr().err
    assert err.count("WARNING:") == len(report["warnings"])


def test_prdit_backbone_errors_are_one_line_exit_2(tmp_path, synthetic_case_dir, tiny_prdit_checkpoint, capsys):
    base = ["impute", str(synthetic_case_dir), "--out", str(tmp_path / "o"), "--ct-backbone", "prdit"]
    assert main([*base, "--target", "ct"]) == 2
    assert "needs a PRDiT checkpoint" in capsys.readouterr().err
    assert main([*base, "--target", "ct", "--prdit-model", str(tmp_path / "missing.pt")]) == 2
    assert "PRDiT checkpoint not found" in capsys.readouterr().err
    assert main([*base, "--target", "oar", "--prdit-model", str(tiny_prdit_checkpoint)]) == 2
    assert "imputes CT only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
