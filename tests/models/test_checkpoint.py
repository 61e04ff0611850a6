"""Checkpoints: earlier layouts (flat dose_* config fields, ``dose_refiner.*`` keys) load into today's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.errors import ConfigError
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import (
    FORMAT,
    load_checkpoint,
    migrate_model_state,
    read_checkpoint,
    save_checkpoint,
)
from diffkt3d.models.config import FLAT_DOSE_FIELDS, DiTConfig, DoseHeadConfig, get_config

torch.set_num_threads(1)

SHIPPED = Path(__file__).resolve().parents[2] / "diffkt3d" / "weights" / "cpu-default.pt"
HEAD = DoseHeadConfig(prior_falloffs=(0.75, 0.92), prior_weights=(0.85, 0.15), prior_reach=6,
                      refiner_width=6, refiner_features=3, refiner_kernels=(3, 3))


def _old_style(cfg: DiTConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Config dict and state dict as versions before the dose head module wrote them."""
    config = cfg.to_dict()
    head = config.pop("dose_head") or DoseHeadConfig().to_dict()
    config.update({old: head[new] for old, new in FLAT_DOSE_FIELDS.items()})
    prefix = "target_heads.dose.refiner."
    old_state = {("dose_refiner." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    return config, old_state


def _trained_model() -> Any2AnyDiT:
    """A tiny model with the dose head whose zero-initialised outputs are made non-zero."""
    torch.manual_seed(0)
    model = Any2AnyDiT(get_config("tiny", prediction="x0", dose_head=HEAD)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


def _velocity(model: Any2AnyDiT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    cfg = model.config
    vols = {m: torch.rand(1, cfg.in_channels[m], 8, 8, 8, generator=gen) * 2 - 1 for m in cfg.modalities}
    with torch.no_grad():
        return model(vols, "dose", torch.tensor([0.7]))


def test_old_checkpoint_loads_with_identical_outputs(tmp_path):
    model = _trained_model()
    config, state = _old_style(model.config, model.state_dict())
    assert any(k.startswith("dose_refiner.") for k in state) and "dose_head" not in config
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "model_config": config, "encoding": EncodingConfig().to_dict(),
                "flow_shift": 3.0, "meta": {}, "state_dict": state}, path)
    loaded = load_checkpoint(path).model
    assert loaded.config == model.config
    assert torch.equal(_velocity(loaded), _velocity(model))


def test_new_checkpoint_round_trips_and_migration_leaves_it_alone(tmp_path):
    model = _trained_model()
    path = save_checkpoint(tmp_path / "new.pt", model, model.config, EncodingConfig(), 3.0)
    blob = read_checkpoint(path)
    assert blob["model_config"]["dose_head"]["refiner_width"] == 6
    cfg, state = migrate_model_state(blob["model_config"], blob["state_dict"])
    assert cfg == model.config and state.keys() == blob["state_dict"].keys()
    assert torch.equal(_velocity(load_checkpoint(path).model), _velocity(model))


def test_old_config_without_a_dose_head_gets_none():
    config, _ = _old_style(get_config("tiny"), {})
    assert config["dose_prior_falloffs"] == [] and config["dose_refiner_width"] == 0
    assert DiTConfig.from_dict(config).dose_head is None


def test_recipe_overrides_in_the_flat_spelling_build_the_preset():
    """Recipe YAMLs (``model_overrides``) still spell the dose head as flat fields."""
    flat = {"prediction": "x0", "dose_prior_falloffs": [0.75, 0.92], "dose_prior_weights": [0.85, 0.15],
            "dose_prior_reach": 40, "dose_refiner_width": 24, "dose_refiner_features": 8,
            "dose_refiner_kernels": [3, 3]}
    assert get_config("tiny", **flat).dose_head == get_config("cpu-default").dose_head
    # One flat field overrides the preset's head, the rest of it is kept.
    assert get_config("cpu-default", dose_refiner_width=0).dose_head == DoseHeadConfig(
        prior_falloffs=(0.75, 0.92), prior_weights=(0.85, 0.15), refiner_width=0)


def test_checkpoint_with_unknown_keys_is_refused(tmp_path):
    model = _trained_model()
    state = {**model.state_dict(), "dose_refiner_extra.weight": torch.zeros(1)}
    path = tmp_path / "bad.pt"
    torch.save({"format": FORMAT, "model_config": model.config.to_dict(), "encoding": EncodingConfig().to_dict(),
                "flow_shift": 3.0, "meta": {}, "state_dict": state}, path)
    with pytest.raises(ConfigError, match="unexpected"):
        load_checkpoint(path)


def test_shipped_model_loads_through_the_migration():
    """The shipped file keeps its original (flat) layout; loading must migrate it, not reject it."""
    blob = read_checkpoint(SHIPPED)
    model = load_checkpoint(SHIPPED).model
    assert model.config == get_config("cpu-default")
    expected = {k: v.float() for k, v in migrate_model_state(blob["model_config"], blob["state_dict"])[1].items()}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
