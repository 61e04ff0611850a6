"""Trainer on a tiny config: both stages run, checkpoints rebuild the model, resume continues."""

from __future__ import annotations

import json

import pytest
import torch

from diffkt3d.data.synthetic import make_synthetic_case
from diffkt3d.errors import ConfigError
from diffkt3d.inference import Predictor
from diffkt3d.io.case_folder import save_case_folder
from diffkt3d.models.checkpoint import read_checkpoint
from diffkt3d.training import StageConfig, TrainConfig, Trainer, run_training


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "cases"
    for i in range(3):
        case = make_synthetic_case(case_id=f"c{i}", seed=i)
        if i == 2:
            case.ct_hu = None  # a case without CT is used, not dropped
        save_case_folder(case, root / case.case_id)
    return root


def tiny_config(tmp_path, data_root, steps_a=4, steps_b=3) -> TrainConfig:
    return TrainConfig(model_preset="tiny", grid=(16, 16, 16), train_roots=[str(data_root)],
                       val_roots=[str(data_root)], val_cases=1, out_dir=str(tmp_path / "run"),
                       cache_dir=str(tmp_path / "cache"), eval_every=2, checkpoint_every=2, log_every=1,
                       stages=[StageConfig("any2any", steps=steps_a, batch_size=2, warmup_steps=1, lr=1e-3),
                               StageConfig("dose", steps=steps_b, batch_size=2, warmup_steps=1, lr=1e-3)])


def test_two_stages_write_usable_checkpoints(tmp_path, data_root):
    torch.set_num_threads(1)
    records = []
    final = run_training(tiny_config(tmp_path, data_root), device="cpu", progress=records.append)
    assert final.exists() and (final.parent / "best.pt").exists() and (final.parent / "stage_any2any.pt").exists()
    stages = {r["stage"] for r in records if "loss" in r}
    assert stages == {"any2any", "dose"}
    assert all(r["target"] == "dose" for r in records if r.get("stage") == "dose" and "loss" in r)
    assert any("val_dose_mae_gy" in r for r in records)
    assert "eta_s" in records[0] and "steps_per_s" in records[0]
    blob = read_checkpoint(final)
    assert "train_state" not in blob and blob["encoding"]["grid"] == [16, 16, 16]
    # the shipped form rebuilds from the file alone and predicts
    pred = Predictor.load(final).predict_dose(make_synthetic_case(), steps=1, template=None)
    assert pred.dose_gy.shape == (32, 32, 32)
    progress = json.loads((final.parent / "progress.json").read_text())
    assert progress["stage"] == "dose"


def test_resume_continues_where_it_stopped(tmp_path, data_root):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root, steps_a=4, steps_b=2)

    def interrupt(record):  # checkpoint_every=2: last.pt holds step 2 when step 3 is logged
        if record.get("global_step") == 3 and "loss" in record:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, device="cpu", progress=interrupt)
    state = read_checkpoint(tmp_path / "run" / "last.pt")["train_state"]
    assert (state["stage_index"], state["stage_step"], state["global_step"]) == (0, 2, 2)
    trainer = Trainer(cfg, device="cpu")
    trainer.run(resume=True)
    assert trainer.global_step == 6  # 2 restored + 2 more of Stage A + 2 of Stage B


def test_unknown_config_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_preset: tiny\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_yaml(bad)
    bad.write_text("stages: [{name: pretrain}]\n")
    with pytest.raises(ConfigError, match="pretrain"):
        TrainConfig.from_yaml(bad)
