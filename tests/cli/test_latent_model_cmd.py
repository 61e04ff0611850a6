"""`diffkt3d predict` / `impute` with a latent-space checkpoint: `--vae-dir` names its VAE, the
checkpoint picks the path; without the VAE (or with another one) one line on stderr, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from diffkt3d.cli.main import main
from diffkt3d.data.synthetic import make_synthetic_case
from diffkt3d.io.case_folder import save_case_folder

pytest.importorskip("diffusers")


@pytest.fixture
def case_dir(tmp_path: Path) -> Path:
    return save_case_folder(make_synthetic_case(shape=(32, 24, 20), case_id="lat"), tmp_path / "lat")


def test_predict_and_impute_with_a_latent_model(tmp_path, case_dir, tiny_latent_checkpoint, tiny_vae_dir, capsys):
    out = tmp_path / "out"
    rc = main(["predict", str(case_dir), "--out", str(out), "--model", str(tiny_latent_checkpoint),
               "--vae-dir", str(tiny_vae_dir), "--steps", "2", "--device", "cpu",
               "--latent-cache-dir", str(tmp_path / "lat-cache")])
    assert rc == 0, capsys.readouterr().err
    dose = nib.load(str(out / "lat" / "dose.nii.gz"))
    ct = nib.load(str(case_dir / "ct.nii.gz"))
    assert dose.shape == ct.shape and np.allclose(dose.affine, ct.affine)
    values = np.asarray(dose.dataobj)
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() > 0  # Gy
    result = json.loads((out / "lat" / "scorecard.json").read_text())
    assert result["latent"]["crop"] == [9, 16, 16] and result["scorecard"] is not None and result["dvh"]
    assert len(list((tmp_path / "lat-cache").glob("*.pt"))) == len(result["latent"]["conditions_encoded"])

    rc = main(["impute", str(case_dir), "--target", "oar", "--out", str(out), "--model", str(tiny_latent_checkpoint),
               "--vae-dir", str(tiny_vae_dir), "--steps", "1", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "lat" / "impute_oar.json").read_text())
    assert meta["latent"]["latent_grid"] == [3, 2, 2] and meta["files"]


def test_latent_model_without_its_vae_is_one_line_exit_2(tmp_path, case_dir, tiny_latent_checkpoint, capsys):
    capsys.readouterr()
    rc = main(["predict", str(case_dir), "--out", str(tmp_path / "o"), "--model", str(tiny_latent_checkpoint),
               "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--vae-dir" in err and "latent space" in err
    assert not (tmp_path / "o").exists()
