"""Learning-rate schedule of a stage: warm-up, constant, final linear decay by budget."""

from pathlib import Path

import pytest

from diffkt3d.errors import ConfigError
from diffkt3d.training.config import StageConfig, TrainConfig
from diffkt3d.training.recipe import read_recipe


def test_constant_after_warmup_without_decay():
    s = StageConfig("dose", steps=100, lr=1e-3, warmup_steps=10)
    assert s.lr_at(0) == pytest.approx(1e-4)
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(99) == pytest.approx(1e-3)


def test_decay_follows_the_nearest_budget():
    # 40 % decay to 0.1 x lr; the CPU budget (10 min) ends the stage long before 10^6 steps.
    s = StageConfig("dose", steps=10**6, max_cpu_minutes=10, lr=1.0, warmup_steps=1,
                    decay_fraction=0.4, final_lr_ratio=0.1)
    assert s.lr_at(50, cpu_seconds=0.5 * 600) == pytest.approx(1.0)       # before the decay
    assert s.lr_at(50, cpu_seconds=0.8 * 600) == pytest.approx(1.0 - 0.9 * 0.5)  # half-way
    assert s.lr_at(50, cpu_seconds=600) == pytest.approx(0.1)             # end
    # Steps end this one: same schedule on the step axis.
    t = StageConfig("dose", steps=100, lr=1.0, warmup_steps=1, decay_fraction=0.5, final_lr_ratio=0.0)
    assert [round(t.lr_at(k), 3) for k in (40, 50, 75, 100)] == [1.0, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("field,value", [("decay_fraction", 1.5), ("final_lr_ratio", -0.1)])
def test_bad_schedule_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig.from_dict({"stages": [{"name": "dose", field: value}]})


def test_shipped_recipe_parses():
    # (data folders are left relative: this test is about the recipe's settings, not the data)
    cfg = TrainConfig.from_dict(read_recipe(Path(__file__).resolve().parents[2] / "configs/cpu-default.yaml"))
    assert [s.name for s in cfg.stages] == ["any2any", "dose"]
    # The recipe is the shipped weights' own: the checkpoint stores the train config it was made with.
    from diffkt3d.models.checkpoint import load_checkpoint

    shipped = load_checkpoint(Path(__file__).resolve().parents[2] / "diffkt3d/weights/cpu-default.pt")
    recorded = TrainConfig.from_dict(shipped.meta["train_config"])
    assert [s.max_cpu_minutes for s in cfg.stages] == [s.max_cpu_minutes for s in recorded.stages] == [13, 67]
    # The shipped model saw max-pooled prescription maps; a silent fallback to "area" would not.
    assert shipped.encoding.ptv_resampling == recorded.ptv_resampling == cfg.ptv_resampling == "max"
    assert [s.loss_norm for s in cfg.stages] == [s.loss_norm for s in recorded.stages] == ["l2", "l1"]
    assert [s.loss_region for s in cfg.stages] == [s.loss_region for s in recorded.stages] == ["all", "body"]
    assert cfg.model_overrides == recorded.model_overrides
    assert shipped.model.config.dose_head.prior_falloffs == tuple(cfg.model_overrides["dose_prior_falloffs"])


def test_unknown_ptv_resampling_is_a_config_error():
    with pytest.raises(ConfigError, match="ptv_resampling.*'mean'"):
        TrainConfig.from_dict({"ptv_resampling": "mean"})


def test_trainer_encodes_with_the_configured_ptv_resampling(tmp_path):
    from diffkt3d.training.trainer import Trainer

    cfg = TrainConfig(model_preset="tiny", grid=(16, 16, 16), ptv_resampling="area", out_dir=str(tmp_path))
    assert Trainer(cfg).encoding.ptv_resampling == "area"


def test_unknown_loss_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="loss_norm.*'huber'"):
        TrainConfig.from_dict({"stages": [{"name": "dose", "loss_norm": "huber"}]})
    assert StageConfig("dose").loss_norm == "l2"  # the paper's squared error unless a stage asks


def test_unknown_loss_region_is_a_config_error():
    with pytest.raises(ConfigError, match="loss_region.*'ptv'"):
        TrainConfig.from_dict({"stages": [{"name": "dose", "loss_region": "ptv"}]})
    assert StageConfig("dose").loss_region == "all"  # the paper's whole-grid loss unless a stage asks
