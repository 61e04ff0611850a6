"""Recipe files as the one source of training settings: overrides, data root, the shipped recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from diffkt3d.errors import ConfigError
from diffkt3d.training.config import StageConfig, TrainConfig
from diffkt3d.training.recipe import (
    DATA_ROOT_ENV,
    flat_fields,
    load_recipe,
    load_scardnft_recipe,
    parse_assignments,
    read_recipe,
)

REPO = Path(__file__).resolve().parents[2]
CPU_DEFAULT = REPO / "configs" / "cpu-default.yaml"
SCARDNFT = REPO / "configs" / "scardnft-cpu.yaml"
WAN = REPO / "configs" / "wan-1.3b-gpu.yaml"


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty stand-in for the dataset folder (the recipes only need its split folders to exist)."""
    root = tmp_path / "datasets"
    for split in ("train", "validation"):
        (root / "openkbp" / split).mkdir(parents=True)
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    return root


def test_shipped_recipe_writes_every_field_and_is_the_checkpoints_own(data_root: Path) -> None:
    """The YAML is complete (no dataclass fallback decides the shipped run) and equals the train
    config stored in diffkt3d/weights/cpu-default.pt, data roots included (relative in both)."""
    raw = read_recipe(CPU_DEFAULT)
    assert sorted(raw) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    for stage in raw["stages"]:
        assert sorted(stage) == sorted(f.name for f in dataclasses.fields(StageConfig)), stage["name"]
    from diffkt3d.models.checkpoint import read_checkpoint

    recorded = read_checkpoint(REPO / "diffkt3d/weights/cpu-default.pt")["meta"]["train_config"]
    assert recorded["train_roots"] == raw["train_roots"] == ["openkbp/train"]
    assert recorded["val_roots"] == raw["val_roots"] == ["openkbp/validation"]
    cfg = load_recipe(CPU_DEFAULT, data_root=data_root)
    assert cfg.train_roots == [str(data_root / "openkbp/train")]
    # the DiT's own recipe; its full-res stages record theirs with them
    relative = dataclasses.replace(cfg, train_roots=raw["train_roots"], val_roots=raw["val_roots"], full_res_stages=[])
    assert relative == TrainConfig.from_dict(recorded)
    from diffkt3d.training.pipeline import stage_config

    stages = read_checkpoint(REPO / "diffkt3d/weights/cpu-default.pt")["meta"]["full_res"]
    where = ("base_model", "out_dir", "cache_dir", "train_roots")  # where a run was, not what it was
    for i in range(len(cfg.full_res_stages)):
        listed = stage_config(cfg, i, Path("base.pt"), data_root=data_root).to_dict()
        shipped = stages[listed["stage"]["target"]]["train_config"]
        assert {k: v for k, v in listed.items() if k not in where} == \
            {k: v for k, v in shipped.items() if k not in where}, listed["stage"]["target"]


def test_stage_override_keeps_the_rest_of_the_stage(data_root: Path) -> None:
    base = load_recipe(CPU_DEFAULT, data_root=data_root)
    for key in ("stages.dose.steps", "stages.B.steps"):
        cfg = load_recipe(CPU_DEFAULT, {key: 7}, data_root=data_root)
        assert cfg.stages[1] == dataclasses.replace(base.stages[1], steps=7)
        assert cfg.stages[0] == base.stages[0]
    nested = load_recipe(CPU_DEFAULT, {"stages": {"dose": {"steps": 7}}}, data_root=data_root)
    assert nested == load_recipe(CPU_DEFAULT, {"stages.dose.steps": 7}, data_root=data_root)
    dose = nested.stages[1]
    assert (dose.loss_norm, dose.loss_region, dose.decay_fraction, dose.max_cpu_minutes) == ("l1", "body", 0.4, 67)
    # a key inside a mapping field changes that key only
    cfg = load_recipe(CPU_DEFAULT, {"model_overrides.depth": 2}, data_root=data_root)
    assert cfg.model_overrides == {**base.model_overrides, "depth": 2}


def test_a_stage_with_zero_steps_is_left_out(data_root: Path) -> None:
    cfg = load_recipe(CPU_DEFAULT, {"stages.any2any.steps": 0}, data_root=data_root)
    assert [s.name for s in cfg.stages] == ["dose"]
    with pytest.raises(ConfigError, match="nothing to train"):
        load_recipe(CPU_DEFAULT, {"stages.A.steps": 0, "stages.B.steps": 0}, data_root=data_root)


@pytest.mark.parametrize("overrides,words", [
    ({"stagez": 1}, ["unknown override 'stagez'", "known keys", "'model_preset'"]),
    ({"stages.dose.stepz": 1}, ["unknown override 'stages.dose.stepz'", "known stage keys", "'loss_norm'"]),
    ({"stages.C.steps": 1}, ["no stage 'C'", "['any2any', 'dose']"]),
    ({"stages.dose.steps": "many"}, ["stages.dose.steps", "expected int", "'many'"]),
])
def test_bad_overrides_are_refused_naming_the_key(data_root: Path, overrides: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe(CPU_DEFAULT, overrides, data_root=data_root)
    assert str(CPU_DEFAULT) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_data_root_from_option_or_environment(data_root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe(CPU_DEFAULT)
    assert "--data-root" in str(err.value) and DATA_ROOT_ENV in str(err.value) and "openkbp/train" in str(err.value)
    monkeypatch.setenv(DATA_ROOT_ENV, str(data_root))
    assert load_recipe(CPU_DEFAULT).val_roots == [str(data_root / "openkbp/validation")]
    # the option wins over the environment; a root without the split names the folder it looked for
    with pytest.raises(ConfigError) as err:
        load_recipe(CPU_DEFAULT, data_root=tmp_path)
    assert str(tmp_path / "openkbp/train") in str(err.value) and "--data-root" in str(err.value)
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(DATA_ROOT_ENV, str(missing))
    with pytest.raises(ConfigError) as err:
        load_recipe(CPU_DEFAULT)
    assert f"{DATA_ROOT_ENV}={missing}" in str(err.value) and "is not a folder" in str(err.value)


def test_absolute_data_folders_stay_absolute(data_root: Path) -> None:
    train = str(data_root / "openkbp" / "train")
    cfg = load_recipe(CPU_DEFAULT, {"train_roots": [train], "val_roots": []})  # no data root needed
    assert cfg.train_roots == [train] and cfg.val_roots == []


def test_scardnft_and_wan_recipes_use_the_data_root(data_root: Path) -> None:
    cfg = load_scardnft_recipe(SCARDNFT, {"reward.w_mae": 2.0, "iterations": 3}, data_root=data_root)
    assert cfg.train_roots == [str(data_root / "openkbp/train")]
    assert cfg.reward.w_mae == 2.0 and cfg.reward.template == "openkbp_hn" and cfg.iterations == 3
    with pytest.raises(ConfigError, match="unknown override 'iteratons'"):
        load_scardnft_recipe(SCARDNFT, {"iteratons": 3}, data_root=data_root)
    from diffkt3d.training.distributed import load_config

    wan_cfg, wan = load_config(WAN, data_root=data_root)
    assert wan_cfg.val_roots == [str(data_root / "openkbp/validation")] and wan.crop == (97, 128, 160)
    for path in (CPU_DEFAULT, SCARDNFT, WAN):
        assert "shared/" not in path.read_text()  # no path into one machine's dataset folder


def test_command_line_assignments_and_flat_fields() -> None:
    assert parse_assignments(["stages.dose.steps=5", "grid=[32, 32, 32]", "stages.B.loss_norm=l2", "lr=3e-4"]) == {
        "stages.dose.steps": 5, "grid": [32, 32, 32], "stages.B.loss_norm": "l2", "lr": 3e-4}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignments(["steps"])
    flat = flat_fields(read_recipe(CPU_DEFAULT))
    assert flat["stages.dose.loss_region"] == "body" and flat["model_overrides.dim"] == 128


def test_dvh_and_augmentation_settings_are_stage_overrides(tmp_path):
    from diffkt3d.training.recipe import build_train_config

    cfg = build_train_config({"stages": [{"name": "any2any"}, {"name": "dose"}]},
                             {"stages.dose.dvh_loss_weight": 0.5, "stages.dose.augment_flip_lr": 0.5,
                              "stages.dose.augment_rotate_deg": 10, "stages.dose.augment_shift_voxels": 2})
    dose = cfg.stages[1]
    assert dose.dvh_loss_weight == 0.5 and dose.augmentation.active
    assert (dose.augmentation.flip_lr, dose.augmentation.rotate_deg, dose.augmentation.shift_voxels) == (0.5, 10, 2)
    assert not cfg.stages[0].augmentation.active and cfg.stages[0].dvh_loss_weight == 0.0
