"""Trainer on a tiny config: both stages run, checkpoints rebuild the model, resume continues."""

from __future__ import annotations

import dataclasses
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


@pytest.mark.parametrize("loss_space", ["x0", "v"])
def test_loss_norm_is_the_absolute_or_squared_error_of_the_same_prediction(tmp_path, data_root, loss_space):
    """Both norms see the same x_t, t and network output; only the reduction differs."""
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root)
    cfg.loss_space = loss_space
    trainer = Trainer(cfg, device="cpu")
    trainer.load_data()
    batch = trainer.next_batch(cfg.stages[1])
    seen = {}

    def record(module, args, output):
        seen["x_t"], seen["t"], seen["v_hat"] = args[0][batch.target].detach(), args[2].detach(), output.detach()

    trainer.model.register_forward_hook(record)
    x0 = batch.volumes["dose"]
    losses = {}
    for norm in ("l1", "l2"):
        trainer.generator.manual_seed(7)  # same noise and t for both
        losses[norm] = trainer.loss(trainer.model, batch, norm).item()
        t = seen["t"].view(-1, 1, 1, 1, 1)
        # Independent of the trainer's helpers: x_t = (1 - t) x0 + t eps, v = eps - x0.
        eps = (seen["x_t"] - (1 - t) * x0) / t
        error = (seen["x_t"] - t * seen["v_hat"]) - x0 if loss_space == "x0" else seen["v_hat"] - (eps - x0)
        expected = error.abs().mean() if norm == "l1" else (error**2).mean()
        assert losses[norm] == pytest.approx(float(expected), rel=1e-4)
    assert losses["l1"] != pytest.approx(losses["l2"])


def test_each_stage_trains_with_its_own_loss_norm(tmp_path, data_root, monkeypatch):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root, steps_a=2, steps_b=2)
    cfg.stages[1].loss_norm = "l1"
    norms = []
    original = Trainer.loss

    def spy(self, model, batch, norm="l2", region="all", dvh_weight=0.0):
        norms.append((batch.target, norm))
        return original(self, model, batch, norm, region, dvh_weight)

    monkeypatch.setattr(Trainer, "loss", spy)
    run_training(cfg, device="cpu")
    assert [n for _, n in norms] == ["l2", "l2", "l1", "l1"]
    assert all(target == "dose" for target, n in norms if n == "l1")
    recorded = TrainConfig.from_dict(read_checkpoint(tmp_path / "run" / "final.pt")["meta"]["train_config"])
    assert [s.loss_norm for s in recorded.stages] == ["l2", "l1"]


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_body_loss_region_averages_only_voxels_that_touch_the_body(tmp_path, data_root, norm):
    """Same x_t, t and output as the whole-grid loss; only voxels with body > -1 are averaged."""
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root)
    cfg.loss_space = "x0"
    trainer = Trainer(cfg, device="cpu")
    trainer.load_data()
    batch = trainer.next_batch(cfg.stages[1])
    assert "body" in batch.conditions
    body = batch.volumes["body"] > -1
    assert 0 < int(body.sum()) < body.numel()  # the fixture has air around the body
    seen = {}

    def record(module, args, output):
        seen["x_t"], seen["t"], seen["v_hat"] = args[0][batch.target].detach(), args[2].detach(), output.detach()

    trainer.model.register_forward_hook(record)
    x0 = batch.volumes["dose"]
    losses = {}
    for region in ("all", "body"):
        trainer.generator.manual_seed(11)
        losses[region] = trainer.loss(trainer.model, batch, norm, region).item()
    t = seen["t"].view(-1, 1, 1, 1, 1)
    error = (seen["x_t"] - t * seen["v_hat"]) - x0
    per_voxel = error.abs() if norm == "l1" else error**2
    assert losses["body"] == pytest.approx(float(per_voxel[body].mean()), rel=1e-4)
    assert losses["all"] == pytest.approx(float(per_voxel.mean()), rel=1e-4)
    assert losses["body"] != pytest.approx(losses["all"])


def test_body_loss_region_falls_back_to_every_voxel_when_the_body_is_not_a_condition(tmp_path, data_root):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root)
    trainer = Trainer(cfg, device="cpu")
    trainer.load_data()
    batch = trainer.next_batch(cfg.stages[1])
    without = dataclasses.replace(batch, conditions=[c for c in batch.conditions if c != "body"])
    losses = {}
    for region in ("all", "body"):
        trainer.generator.manual_seed(3)
        losses[region] = trainer.loss(trainer.model, without, "l1", region).item()
    assert losses["body"] == pytest.approx(losses["all"], rel=1e-6)


def test_each_stage_trains_with_its_own_loss_region(tmp_path, data_root, monkeypatch):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root, steps_a=2, steps_b=2)
    cfg.stages[1].loss_region = "body"
    regions = []
    original = Trainer.loss

    def spy(self, model, batch, norm="l2", region="all", dvh_weight=0.0):
        regions.append(region)
        return original(self, model, batch, norm, region, dvh_weight)

    monkeypatch.setattr(Trainer, "loss", spy)
    run_training(cfg, device="cpu")
    assert regions == ["all", "all", "body", "body"]
    recorded = TrainConfig.from_dict(read_checkpoint(tmp_path / "run" / "final.pt")["meta"]["train_config"])
    assert [s.loss_region for s in recorded.stages] == ["all", "body"]


def test_dvh_weight_adds_the_moment_loss_of_the_x0_estimate(tmp_path, data_root):
    from diffkt3d.training.dvh_loss import moment_loss

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root)
    trainer = Trainer(cfg, device="cpu")
    trainer.load_data()
    batch = trainer.next_batch(cfg.stages[1])
    seen = {}

    def record(module, args, output):
        seen["x_t"], seen["t"], seen["v_hat"] = args[0][batch.target].detach(), args[2].detach(), output.detach()

    trainer.model.register_forward_hook(record)
    losses = {}
    for weight in (0.0, 0.5):
        trainer.generator.manual_seed(7)
        losses[weight] = trainer.loss(trainer.model, batch, "l1", "body", weight).item()
    t = seen["t"].view(-1, 1, 1, 1, 1)
    x0_hat = seen["x_t"] - t * seen["v_hat"]
    conditions = {m: batch.volumes[m] for m in batch.conditions}
    moments = float(moment_loss(x0_hat, batch.volumes["dose"], conditions, trainer.encoding.dose_scale_gy))
    assert moments > 0
    assert losses[0.5] == pytest.approx(losses[0.0] + 0.5 * moments, rel=1e-4)


def test_stage_augmentation_changes_the_batch_but_not_its_shapes(tmp_path, data_root):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root)
    plain = Trainer(cfg, device="cpu")
    plain.load_data()
    cfg_aug = tiny_config(tmp_path, data_root)
    cfg_aug.stages[1] = dataclasses.replace(cfg_aug.stages[1], augment_flip_lr=1.0, augment_rotate_deg=15.0)
    augmented = Trainer(cfg_aug, device="cpu")
    augmented.train_set = plain.train_set
    a, b = plain.next_batch(cfg.stages[1]), augmented.next_batch(cfg_aug.stages[1])
    assert a.conditions == b.conditions
    for m in a.volumes:
        assert a.volumes[m].shape == b.volumes[m].shape
    assert not torch.equal(a.volumes["dose"], b.volumes["dose"])
    # the stored cases are not modified in place
    again = Trainer(cfg, device="cpu")
    again.train_set = plain.train_set
    assert torch.equal(again.next_batch(cfg.stages[1]).volumes["dose"], a.volumes["dose"])


def test_each_run_is_recorded_as_a_piece_with_its_machine_and_cost(tmp_path, data_root):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, data_root, steps_a=2, steps_b=2)
    first = Trainer(cfg, device="cpu")
    first.load_data()
    first._run_stage(cfg.stages[0])  # a run stopped after Stage A (as a budgeted session would)
    first.save("last.pt", with_state=True)
    run_training(cfg, device="cpu")  # resumes: a second piece
    meta = read_checkpoint(tmp_path / "run" / "final.pt")["meta"]
    # the first trainer never went through run(): its steps are not a recorded piece
    assert len(meta["pieces"]) == 1
    piece = meta["pieces"][0]
    assert piece["from_step"] == 2 and piece["to_step"] == 4 and piece["cpu_minutes"] > 0
    assert "cores" in piece["machine"] and piece["started"].endswith("+00:00")
    assert meta["total_cpu_minutes"] == pytest.approx(piece["cpu_minutes"], abs=0.01)
    # a third invocation adds a piece with no steps; the record keeps both
    Trainer(cfg, device="cpu").run()
    meta = read_checkpoint(tmp_path / "run" / "final.pt")["meta"]
    assert [p["from_step"] for p in meta["pieces"]] == [2, 4] and meta["pieces"][1]["to_step"] == 4


def test_init_from_fine_tunes_the_checkpoint_with_its_own_architecture(tmp_path, data_root, tiny_checkpoint):
    """A fine-tune starts from the checkpoint's weights (not random ones) and keeps its architecture
    and encoding, whatever the recipe's model fields say."""
    torch.set_num_threads(1)
    cfg = dataclasses.replace(tiny_config(tmp_path, data_root, steps_a=1, steps_b=1), model_preset="cpu-default",
                              grid=(32, 32, 32), init_from=str(tiny_checkpoint), val_roots=[], eval_every=0)
    trainer = Trainer(cfg, device="cpu")
    base = read_checkpoint(tiny_checkpoint)
    assert trainer.model_config.to_dict() == base["model_config"] and list(trainer.encoding.grid) == [16, 16, 16]
    start = trainer.model.state_dict()
    assert all(torch.equal(start[k], v) for k, v in base["state_dict"].items())
    final = read_checkpoint(trainer.run(resume=False))
    assert final["model_config"] == base["model_config"] and final["encoding"] == base["encoding"]
    moved = [k for k, v in base["state_dict"].items() if not torch.equal(final["state_dict"][k], v)]
    assert moved  # it trained ...
    scratch = Trainer(dataclasses.replace(cfg, init_from=None, model_preset="tiny", grid=(16, 16, 16),
                                          out_dir=str(tmp_path / "scratch")), device="cpu")
    differ = sum(float((scratch.model.state_dict()[k] - v).abs().sum()) for k, v in base["state_dict"].items())
    close = sum(float((final["state_dict"][k] - v).abs().sum()) for k, v in base["state_dict"].items())
    assert close < differ / 3  # ... from the checkpoint's weights, not from a new random model


def test_a_fine_tune_keeps_the_models_full_res_stages(tmp_path, data_root, tiny_checkpoint):
    """The served model is the DiT with its stages: fine-tuning the DiT must not drop them (the OAR
    stage reads no coarse prediction and keeps its quality record; the dose stage's is stale)."""
    from diffkt3d.models.checkpoint import load_checkpoint, write_full_res_stages
    from diffkt3d.models.full_res import FullResConfig, FullResStage

    torch.set_num_threads(1)
    enc = load_checkpoint(tiny_checkpoint).encoding
    stages = {}
    for target, coarse in (("oar", False), ("dose", True)):
        config = FullResConfig(target=target, features=(4, 4, 8, 8, 16, 4), crop=(32, 32, 32),
                               coarse_input=coarse).resolved(enc.modalities)
        stages[target] = (config, FullResStage(config, enc).state_dict())
    quality = {t: {"passes": False, "figures": {}} for t in ("oar", "ct")}
    staged = write_full_res_stages(tiny_checkpoint, tmp_path / "staged.pt", stages,
                                   meta_updates={"full_res": {"oar": {"step": 7}}})
    blob = read_checkpoint(staged)
    blob["meta"]["quality"] = quality  # as a benchmark of the staged model records it
    torch.save(blob, staged)
    cfg = dataclasses.replace(tiny_config(tmp_path, data_root, steps_a=1, steps_b=1), init_from=str(staged),
                              val_roots=[], eval_every=0)
    final = read_checkpoint(Trainer(cfg, device="cpu").run(resume=False))
    source = read_checkpoint(staged)
    assert sorted(final["full_res"]) == ["dose", "oar"]
    for target in ("dose", "oar"):
        for k, v in source["full_res"][target]["state_dict"].items():
            assert torch.equal(final["full_res"][target]["state_dict"][k], v)
    assert final["meta"]["full_res"]["oar"] == {"step": 7}
    assert sorted(final["meta"]["quality"]) == ["oar"]  # the DiT changed: ct's record no longer holds
    assert "full_res" not in read_checkpoint(tmp_path / "run" / "last.pt")  # resumption state: the DiT only
    # and from scratch there is nothing to carry
    scratch = dataclasses.replace(cfg, init_from=None, out_dir=str(tmp_path / "scratch"))
    assert "full_res" not in read_checkpoint(Trainer(scratch, device="cpu").run(resume=False))
