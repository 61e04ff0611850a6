"""Train -> serve, end to end on the CPU, for a latent-space (Wan VAE) model.

1. A tiny Wan-compatible DiT (diffusers ``WanTransformer3DModel``) and a tiny ``AutoencoderKLWan``
   are built here and saved in diffusers layout (nothing is downloaded).
2. ``python -m diffkt3d.training.distributed`` trains a few steps on two processes (torchrun,
   gloo) in the VAE's latent space, with the Wan weights transferred: the paper's GPU recipe in
   miniature.
3. A real MONAI Label server serves the final checkpoint (``--conf model``, ``--conf vae_dir``).
4. The Slicer module's client requests a dose, then a preview of the same case: the dose is on the
   case grid, in Gy (its DVH table agrees with the image), and the preview re-encodes no condition.

Random tiny weights: what is checked is the path, the grids, the units and the cache, not the
quality of the dose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import yaml
from server_process import start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO.parent / "shared" / "datasets/openkbp/validation"
CASE = "pt_201"
Z = 4
CROP = [17, 32, 32]  # clip order (slices, y, x) on the 32^3 working grid -> latents 5 x 4 x 4


def _train_latent_checkpoint(root: Path) -> Path:
    import diffusers

    from diffkt3d.data.synthetic import make_synthetic_case
    from diffkt3d.io.case_folder import save_case_folder
    from diffkt3d.training.distributed import torchrun_command

    vae_dir, wan_dir = root / "vae", root / "wan"
    diffusers.AutoencoderKLWan(base_dim=4, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                               latents_std=[1.5, 0.5, 2.0, 1.0]).save_pretrained(vae_dir)
    diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                    in_channels=Z, out_channels=Z, text_dim=16, freq_dim=32, ffn_dim=32,
                                    num_layers=2).save_pretrained(wan_dir)
    cases = root / "cases"
    for i in range(4):
        save_case_folder(make_synthetic_case(case_id=f"c{i}", seed=i), cases / f"c{i}")
    recipe = {
        "model_preset": "tiny", "grid": [32, 32, 32], "with_plates": True,
        "model_overrides": {"patch": [1, 2, 2], "dim": 24, "depth": 2, "heads": 2, "ffn_dim": 32, "freq_dim": 32,
                            "rope_slot_stride": 8, "zero_init_modulation": False},
        "train_roots": [str(cases)], "val_roots": [], "val_cases": 0, "out_dir": str(root / "run"),
        "cache_dir": str(root / "cache"), "eval_every": 0, "checkpoint_every": 100, "log_every": 1, "seed": 0,
        "threads": 1, "flow_shift": 3.0,
        "stages": [{"name": "dose", "steps": 3, "batch_size": 1, "lr": 1e-4, "warmup_steps": 1}],
        "wan": {"checkpoint": str(wan_dir), "vae_dir": str(vae_dir), "crop": CROP,
                "latent_cache_dir": str(root / "latents")},
    }
    config = root / "latent.yaml"
    config.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(torchrun_command(config, 2, extra_args=["--no-resume"]), env=env, capture_output=True,
                          text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run" / "final.pt"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not (VALIDATION / CASE).is_dir():
        pytest.skip("OpenKBP validation cases not available")
    pytest.importorskip("monailabel", reason="server dependencies not installed (docs/server.md)")
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("server-latent")
    final = _train_latent_checkpoint(root)
    studies = root / "studies"
    shutil.copytree(VALIDATION / CASE, studies / CASE)
    conf = {"model": str(final), "vae_dir": str(root / "vae"), "model_dir": str(root / "model"),
            "state_dir": str(root / "state"), "device": "cpu"}
    try:
        proc, url = start_server(root, studies, conf, timeout_s=300)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield {"url": url, "root": root, "final": final}
    stop_server(proc)


def test_trained_latent_checkpoint_records_its_vae(served):
    from diffkt3d.models.checkpoint import read_checkpoint

    blob = read_checkpoint(served["final"])
    assert blob["meta"]["world_size"] == 2 and blob["meta"]["latent"]["crop"] == CROP
    assert blob["meta"]["latent"]["z_dim"] == Z and blob["model_config"]["in_channels"]["oar"] == 7 * Z


def test_slicer_client_gets_a_latent_dose_in_gy_and_the_preview_reuses_the_conditions(served, tmp_path):
    sys.path.insert(0, str(REPO / "slicer_extension" / "DiffKT3D"))
    from DiffKT3DLib.client import DiffKT3DClient

    client = DiffKT3DClient(served["url"])
    info = client.info()
    assert "dose" in client.available_tasks(info)["dose"]

    first = client.infer("dose", tmp_path / "first", image=CASE, params={"steps": 2, "seed": 1})
    meta = first.params
    ref = nib.load(str(VALIDATION / CASE / "ct.nii.gz"))
    dose_img = nib.load(str(first.image_path))
    dose = np.asarray(dose_img.dataobj)
    # On the case grid (128^3 OpenKBP, not the 32^3 working grid or the 17 x 32 x 32 crop), in Gy.
    assert dose.shape == ref.shape and np.allclose(dose_img.affine, ref.affine)
    assert dose.dtype == np.float32 and dose.min() >= 0 and 0 < dose.max() < 150
    body = np.asarray(nib.load(str(VALIDATION / CASE / "possible_dose_mask.nii.gz")).dataobj) > 0.5
    assert (dose[~body] == 0).all()
    ptv = np.asarray(nib.load(str(VALIDATION / CASE / "PTV70.nii.gz")).dataobj) > 0.5
    assert meta["dvh"]["PTV70"]["Dmean"] == pytest.approx(float(dose[ptv].mean()), abs=1e-3)
    assert meta["scorecard"] is not None and meta["model_version"] == info["diffkt3d"]["model_version"]
    latent = meta["latent"]
    assert latent["crop"] == CROP and latent["latent_grid"] == [5, 4, 4]
    assert latent["conditions_cached"] == [] and {"ct", "ptv", "oar", "body"} <= set(latent["conditions_encoded"])
    assert meta["timings"]["vae_encode_s"] > 0

    # The preview of the same case: every condition latent comes from the server's cache.
    preview = client.infer("dose", tmp_path / "preview", image=CASE, params={"preview": True, "seed": 1})
    assert preview.params["steps"] == 1
    assert preview.params["latent"]["conditions_encoded"] == []
    assert preview.params["latent"]["conditions_cached"] == latent["conditions_encoded"]
    assert preview.params["timings"]["vae_encode_s"] < meta["timings"]["vae_encode_s"]
    assert nib.load(str(preview.image_path)).shape == ref.shape


def test_impute_runs_on_the_latent_model_and_a_wrong_vae_is_refused_clearly(served, tmp_path):
    r = requests.post(f"{served['url']}/infer/impute_oar", params={"image": CASE, "output": "json"},
                      data={"params": '{"steps": 1}'}, timeout=600)
    assert r.status_code == 200, r.text
    latent = r.json()["latent"]  # the OARs are the target; CT, PTV, body latents are the dose requests'
    assert latent["conditions_encoded"] == [] and {"ct", "ptv", "body"} <= set(latent["conditions_cached"])

    import diffusers
    import torch

    other = served["root"] / "other-vae"  # the same config, other weights
    torch.manual_seed(1)
    diffusers.AutoencoderKLWan(base_dim=4, z_dim=Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                               latents_std=[1.5, 0.5, 2.0, 1.0]).save_pretrained(other)
    root = tmp_path / "wrong"
    root.mkdir()
    studies = root / "studies"
    shutil.copytree(VALIDATION / CASE, studies / CASE)
    proc, url = start_server(root, studies, {"model": str(served["final"]), "vae_dir": str(other),
                                             "state_dir": str(root / "state"), "device": "cpu"}, timeout_s=300)
    try:
        r = requests.post(f"{url}/infer/dose", params={"image": CASE, "output": "json"},
                          data={"params": '{"steps": 1}'}, timeout=300)
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert "is not the one checkpoint final.pt was trained with" in detail and "fingerprint" in detail
    finally:
        stop_server(proc)
