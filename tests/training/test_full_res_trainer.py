"""Full-res stage trainer on two real OpenKBP cases at a tiny crop: runs, resumes, writes a servable model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.errors import ConfigError
from diffkt3d.inference import Predictor
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from diffkt3d.models.config import get_config
from diffkt3d.models.full_res import FullResConfig
from diffkt3d.training.full_res_config import FullResTrainConfig
from diffkt3d.training.full_res_trainer import FullResTrainer, run_full_res_training
from diffkt3d.training.recipe import load_full_res_recipe

torch.set_num_threads(1)
TINY = (4, 4, 8, 8, 16, 4)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A random tiny DiT on a 16^3 grid without plate modalities (no rasterising in the test)."""
    torch.manual_seed(0)
    enc = EncodingConfig(grid=(16, 16, 16), modalities=("ct", "ptv", "oar", "body", "dose"))
    cfg = get_config("tiny", in_channels=enc.channels(), modalities=list(enc.modalities))
    path = tmp_path_factory.mktemp("base") / "base.pt"
    return save_checkpoint(path, Any2AnyDiT(cfg), cfg, enc, flow_shift=3.0, meta={"name": "tiny-base"})


def config(tmp_path, base_model, openkbp_root, **kw) -> FullResTrainConfig:
    stage = FullResConfig(**{"target": "oar", "features": TINY, "crop": (32, 32, 32), **kw.pop("stage", {})})
    fields = {"max_cases": 2, "coarse_steps": 1, "steps": 3, "batch_size": 2, "warmup_steps": 1,
              "checkpoint_every": 2, "log_every": 1, **kw}
    return FullResTrainConfig(base_model=str(base_model), train_roots=[str(openkbp_root / "train")], stage=stage,
                              out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), **fields)


def test_trains_three_steps_then_resumes_where_it_stopped(tmp_path, base_model, openkbp_root):
    records = []
    final = run_full_res_training(config(tmp_path, base_model, openkbp_root), progress=records.append)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    blob = read_checkpoint(tmp_path / "run" / "last.pt")
    first = blob["meta"]["full_res"]["oar"]
    assert blob["train_state"]["step"] == 3 and first["coarse_cpu_minutes"] > 0 and first["cases"] == 2
    assert len(first["pieces"]) == 1 and first["pieces"][0]["to_step"] == 3 and "machine" in first["pieces"][0]
    # resume: the step count and the CPU counters continue, the coarse cache is reused
    trainer = FullResTrainer(config(tmp_path, base_model, openkbp_root, steps=5))
    trainer.run()
    second = read_checkpoint(tmp_path / "run" / "final.pt")["meta"]["full_res"]["oar"]
    assert second["step"] == 5 and [p["from_step"] for p in second["pieces"]] == [0, 3]
    assert second["train_cpu_minutes"] > first["train_cpu_minutes"]
    assert second["coarse_cpu_minutes"] == first["coarse_cpu_minutes"]
    assert second["pieces"][1]["cache_cpu_minutes"] < 0.05  # nothing recomputed
    # the output is the base model plus the stage, and the Predictor serves it
    bundle = load_checkpoint(final)
    assert sorted(bundle.full_res) == ["oar"] and bundle.full_res["oar"].config.conditions == ("ct", "ptv", "body", "dose")
    assert bundle.full_res["oar"].config.coarse_steps == 1  # served on the coarse prediction it learned on
    assert "train_state" not in read_checkpoint(final) and bundle.meta["name"] == "run"
    assert Predictor.load(final).full_res["oar"].config.target == "oar"


def test_dose_peer_without_coarse_input_trains_with_dvh_loss_and_flips(tmp_path, base_model, openkbp_root):
    cfg = config(tmp_path, base_model, openkbp_root, stage={"target": "dose", "coarse_input": False}, steps=2,
                 dvh_loss_weight=0.5, flip_lr=1.0, max_cases=1)
    final = run_full_res_training(cfg)
    record = read_checkpoint(final)["meta"]["full_res"]["dose"]
    assert record["step"] == 2 and record["coarse_cpu_minutes"] == 0  # the peer computes no coarse prediction
    assert not load_checkpoint(final).full_res["dose"].config.coarse_input
    assert load_checkpoint(final).full_res["dose"].config.coarse_steps is None


def test_the_cpu_budget_counts_the_coarse_precompute(tmp_path, base_model, openkbp_root):
    trainer = FullResTrainer(config(tmp_path, base_model, openkbp_root, max_cpu_minutes=1e-6, max_cases=1))
    trainer.run()
    assert trainer.step == 0 and trainer.coarse_cpu_seconds > 0  # the precompute alone spent the budget


def test_resuming_with_another_stage_config_is_refused(tmp_path, base_model, openkbp_root):
    run_full_res_training(config(tmp_path, base_model, openkbp_root, steps=1, max_cases=1))
    other = config(tmp_path, base_model, openkbp_root, steps=2, max_cases=1, stage={"features": (4, 4, 8, 8, 8, 4)})
    with pytest.raises(ConfigError, match="holds a oar stage with another config; use a new out_dir"):
        FullResTrainer(other).run()


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="base_model is empty"):
        FullResTrainConfig.from_dict({"stage": {"target": "oar"}})
    with pytest.raises(ConfigError, match="unknown full-res training config keys \\['stpes'\\]"):
        FullResTrainConfig.from_dict({"base_model": "m.pt", "stpes": 3})
    with pytest.raises(ConfigError, match="dvh_loss_weight applies to a dose stage, not 'oar'"):
        FullResTrainConfig(base_model="m.pt", stage={"target": "oar"}, dvh_loss_weight=1.0)
    with pytest.raises(ConfigError, match="foreground_ratio must be in \\[0, 1\\], found 2"):
        FullResTrainConfig(base_model="m.pt", foreground_ratio=2)
    with pytest.raises(ConfigError, match="full-res stage target must be one of"):
        FullResTrainConfig(base_model="m.pt", stage={"target": "beam"})


def test_recipe_overrides_make_the_peer(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_model: m.pt\nstage: {target: dose, crop: [32, 32, 32]}\ntrain_roots: [cases]\n")
    (tmp_path / "cases").mkdir()
    cfg = load_full_res_recipe(recipe, {"stage.coarse_input": False, "max_cpu_minutes": 5}, data_root=tmp_path)
    assert cfg.stage == dataclasses.replace(cfg.stage, coarse_input=False) and not cfg.stage.coarse_input
    assert cfg.max_cpu_minutes == 5 and cfg.train_roots == [str(tmp_path / "cases")]
    with pytest.raises(ConfigError, match="unknown full-res stage config keys \\['width'\\]"):
        load_full_res_recipe(recipe, {"stage.width": 3}, data_root=tmp_path)


def test_mask_loss_teaches_the_background_of_every_channel():
    """Multi-label masks: a p = 0.5 guess everywhere must cost more than the truth; MONAI's DiceCELoss
    (softmax cross-entropy over channels) scores both alike on background voxels, which let a stage
    learn p ~ 0.5 everywhere."""
    from monai.losses import DiceCELoss

    from diffkt3d.training.full_res_trainer import mask_loss

    target = torch.zeros(1, 3, 16, 16, 16)
    target[0, 0, 4:8, 4:8, 4:8] = 1
    target[0, 1, 6:10, 6:10, 6:10] = 1  # overlaps channel 0: multi-label; channel 2 has no foreground
    truth = (target * 2 - 1) * 10.0
    guess = torch.zeros_like(target)
    assert mask_loss(truth, target) < 0.01
    assert mask_loss(guess, target) > 0.69 + 0.5  # BCE log(2) on every voxel, plus a poor Dice
    empty_wrong = truth.clone()
    empty_wrong[0, 2] = 10.0  # organ everywhere in a channel without foreground: only the BCE sees it
    assert mask_loss(empty_wrong, target) > 3.0
    # what went wrong with DiceCELoss: its cross-entropy ignores background voxels
    assert abs(DiceCELoss(sigmoid=True)(guess, target) - DiceCELoss(sigmoid=True, lambda_ce=0)(guess, target)) < 0.2
