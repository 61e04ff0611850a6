"""torchrun + gloo with 2 CPU processes on a tiny config: ranks stay in sync, the
loss decreases, rank 0 alone writes the checkpoints; plus the launcher command and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from diffkt3d.data.synthetic import make_synthetic_case
from diffkt3d.errors import ConfigError
from diffkt3d.io.case_folder import save_case_folder
from diffkt3d.models.checkpoint import load_checkpoint, read_checkpoint
from diffkt3d.training.distributed import (
    DistEnv,
    DistributedTrainer,
    load_config,
    torchrun_command,
)


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "cases"
    for i in range(4):
        save_case_folder(make_synthetic_case(shape=(16, 16, 16), case_id=f"c{i}", seed=i), root / f"c{i}")
    return root


def _write_config(tmp_path, data_root, steps: int = 40) -> tuple:
    cfg = {
        "model_preset": "tiny", "grid": [16, 16, 16], "with_plates": False,
        "train_roots": [str(data_root)], "val_roots": [], "val_cases": 0,
        "out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
        "flow_shift": 1.0, "grad_clip": 1.0, "ema_decay": 0.9, "eval_every": 0,
        "checkpoint_every": 1000, "log_every": 1, "seed": 0, "threads": 1,
        # Stage A first: ranks draw different targets/conditions, so some patch embeddings and heads
        # get gradients on one rank only (DDP find_unused_parameters must still keep them in sync).
        "stages": [{"name": "any2any", "steps": 15, "batch_size": 1, "lr": 3e-3, "warmup_steps": 1},
                   {"name": "dose", "steps": steps, "batch_size": 1, "lr": 3e-3, "warmup_steps": 1}],
    }
    path = tmp_path / "dist.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


@pytest.mark.slow
def test_torchrun_gloo_two_ranks(tmp_path, data_root):
    config, cfg = _write_config(tmp_path, data_root)
    cmd = torchrun_command(config, 2, extra_args=["--no-resume"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"

    # Ranks in sync: identical weight checksums after training, on different data shards.
    sync = json.loads((out / "dist_sync.json").read_text())
    assert sync["world_size"] == 2 and sync["in_sync"]
    ranks = sorted(sync["ranks"], key=lambda r: r["rank"])
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["cases"] == ["c0", "c2"] and ranks[1]["cases"] == ["c1", "c3"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 40

    # Exactly one set of checkpoints, written by rank 0 (rank 0 logs each write; no rank-1 log lines).
    assert sorted(p.name for p in out.glob("*.pt")) == ["final.pt", "last.pt", "stage_any2any.pt", "stage_dose.pt"]
    log_text = proc.stderr + proc.stdout
    assert log_text.count("rank 0 wrote") == 5  # last + stage_any2any, last + stage_dose, final
    assert "ranks diverged" not in log_text  # checked after Stage A too (the run would have failed)
    assert "[rank 1]" not in log_text
    blob = read_checkpoint(out / "last.pt")
    assert blob["meta"]["world_size"] == 2

    # Loss decreases: mean of the last 10 logged losses well below the first 10 (rank 0's shard).
    history = json.loads(blob["train_state"]["history"])
    assert {r["target"] for r in history if r.get("stage") == "any2any"} - {"dose"}  # other targets too
    losses = [r["loss"] for r in history if "loss" in r and r["stage"] == "dose"]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)

    # The checkpoint rebuilds a plain (non-DDP) model from the file alone.
    bundle = load_checkpoint(out / "final.pt")
    assert not any(k.startswith("module.") for k in bundle.model.state_dict())


def test_torchrun_command_shapes():
    cmd = torchrun_command("configs/wan-1.3b-gpu.yaml", 8)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=8" in cmd and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "diffkt3d.training.distributed", "--config", "configs/wan-1.3b-gpu.yaml"]
    multi = torchrun_command("x.yaml", 8, nnodes=2, rdzv_endpoint="node0:29500", node_rank=1)
    assert "--nnodes=2" in multi and "--rdzv_endpoint=node0:29500" in multi and "--standalone" not in multi
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command("x.yaml", 8, nnodes=2)


def test_single_process_fallback_and_config_errors(tmp_path, data_root):
    """Without torchrun env the trainer runs as world size 1; time budgets and bad sections fail clearly."""
    torch.set_num_threads(1)
    config, cfg = _write_config(tmp_path, data_root, steps=2)
    train_cfg, wan = load_config(config)
    assert wan.checkpoint is None and wan.crop == (97, 128, 160)
    trainer = DistributedTrainer(train_cfg, DistEnv())
    final = trainer.run(resume=False)
    assert final.exists() and json.loads((final.parent / "dist_sync.json").read_text())["in_sync"]

    data = yaml.safe_load(config.read_text())
    data["stages"][0]["max_minutes"] = 5
    with pytest.raises(ConfigError, match="time budgets"):
        DistributedTrainer(load_config(_dump(tmp_path, data))[0], DistEnv())
    data["stages"][0].pop("max_minutes")
    data["wan"] = {"vae": "x"}
    with pytest.raises(ConfigError, match=r"unknown keys \['vae'\] in the 'wan' section"):
        load_config(_dump(tmp_path, data))


def _dump(tmp_path, data) -> str:
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_latent_path_with_wan_transfer(tmp_path):
    """Single process: Wan DiT weights transferred, frozen VAE latents cached, Stage B on latents,
    validation decodes the dose with the VAE (the recipe of configs/wan-1.3b-gpu.yaml in miniature)."""
    diffusers = pytest.importorskip("diffusers")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    z = 4
    vae_dir, wan_dir = tmp_path / "vae", tmp_path / "wan"
    diffusers.AutoencoderKLWan(base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.0] * z,
                               latents_std=[1.0] * z).save_pretrained(vae_dir)
    diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                    in_channels=z, out_channels=z, text_dim=16, freq_dim=32, ffn_dim=32,
                                    num_layers=2).save_pretrained(wan_dir)
    root = tmp_path / "cases"
    for i in range(2):
        save_case_folder(make_synthetic_case(case_id=f"c{i}", seed=i), root / f"c{i}")
    data = {
        "model_preset": "tiny", "grid": [32, 32, 32], "with_plates": False,
        "model_overrides": {"patch": [1, 2, 2], "dim": 24, "depth": 2, "heads": 2, "ffn_dim": 32, "freq_dim": 32,
                            "rope_slot_stride": 4, "zero_init_modulation": False},
        "train_roots": [str(root)], "val_roots": [str(root)], "val_cases": 1, "out_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"), "eval_every": 2, "checkpoint_every": 100, "log_every": 1,
        "stages": [{"name": "dose", "steps": 2, "batch_size": 1, "lr": 1e-4, "warmup_steps": 1}],
        "wan": {"checkpoint": str(wan_dir), "vae_dir": str(vae_dir), "crop": [9, 16, 16],
                "latent_cache_dir": str(tmp_path / "latents")},
    }
    cfg, wan = load_config(_dump(tmp_path, data))
    trainer = DistributedTrainer(cfg, DistEnv(), wan)
    assert trainer.model_config.in_channels["oar"] == 7 * z and trainer.model_config.in_channels["dose"] == z
    assert "blocks.1.self_attn.q.weight" in trainer.transfer_report.transferred
    final = trainer.run(resume=False)
    blob = read_checkpoint(final)
    assert blob["meta"]["latent"]["crop"] == [9, 16, 16] and blob["meta"]["wan_transfer"] == str(wan_dir)
    assert trainer.best_val is not None and 0 <= trainer.best_val < 80  # decoded dose MAE in Gy
    cached = list((tmp_path / "latents").glob("*/*.pt"))
    assert len(cached) == 2 and torch.load(cached[0], weights_only=True)["tensors"]["dose"].shape == (z, 3, 2, 2)
    assert (final.parent / "wan_transfer.json").exists()
