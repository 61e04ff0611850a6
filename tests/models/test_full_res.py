"""Full-resolution stage: config checks, a fresh residual stage returns the coarse input, channels."""

from __future__ import annotations

import pytest
import torch

from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.errors import ConfigError
from diffkt3d.models.full_res import FullResConfig, FullResStage

torch.set_num_threads(1)

ENC = EncodingConfig(grid=(16, 16, 16))
TINY = (4, 4, 8, 8, 16, 4)
CROP = (32, 32, 32)


def stage(target: str = "dose", **kw) -> FullResStage:
    cfg = FullResConfig(target=target, features=TINY, crop=CROP, **kw).resolved(ENC.modalities)
    return FullResStage(cfg, ENC)


def inputs(s: FullResStage, shape=CROP) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cond = torch.rand((1, s.condition_channels, *shape), generator=g) * 2 - 1
    coarse = torch.rand((1, ENC.channels()[s.config.target], *shape), generator=g) * 2 - 1
    return cond, coarse


@pytest.mark.parametrize("kw, words", [
    ({"target": "body"}, "target must be one of"),
    ({"features": (4, 4, 8)}, "six positive ints"),
    ({"conditions": ("ct", "xray")}, "not modalities"),
    ({"target": "oar", "conditions": ("ct", "oar")}, "its own target"),
    ({"conditions": ("ct", "ct")}, "repeat"),
    ({"crop": (16, 32, 32)}, "crop must be three ints >= 32"),
    ({"target": "ptv", "ptv_levels_gy": ()}, "prescription levels"),
])
def test_bad_configs_say_what_is_wrong(kw, words):
    with pytest.raises(ConfigError, match=words):
        FullResConfig(**kw)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = FullResConfig(target="oar", features=TINY, conditions=("ct", "body"), coarse_input=False, crop=CROP)
    assert FullResConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown full-res stage config keys \\['width'\\]"):
        FullResConfig.from_dict({**cfg.to_dict(), "width": 3})


def test_default_conditions_are_the_base_models_minus_the_target():
    cfg = FullResConfig(target="oar").resolved(("ct", "ptv", "oar", "body", "dose"))
    assert cfg.conditions == ("ct", "ptv", "body", "dose")
    with pytest.raises(ConfigError, match="not modalities of the base model"):
        FullResConfig(target="dose", conditions=("beam",)).resolved(("ct", "dose"))
    with pytest.raises(ConfigError, match="reads nothing"):
        FullResStage(FullResConfig(target="dose", conditions=(), coarse_input=False, crop=CROP), ENC)


@pytest.mark.parametrize("target", ["dose", "ct"])
def test_fresh_residual_stage_returns_the_coarse_prediction_exactly(target):
    s = stage(target).eval()
    cond, coarse = inputs(s)
    with torch.no_grad():
        out = s(cond, coarse)
    assert out.shape == coarse.shape and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(s.combine(coarse, out), coarse)


@pytest.mark.parametrize("target, channels", [("oar", len(ENC.oar_channels)), ("ptv", 3)])
def test_mask_stage_gives_one_logit_channel_per_structure(target, channels):
    s = stage(target).eval()
    cond, coarse = inputs(s)
    with torch.no_grad():
        out = s(cond, coarse)
    assert out.shape == (1, channels, *CROP) and not s.residual
    assert out.abs().sum() > 0  # logits, not a zero-initialised residual


def test_without_coarse_input_the_coarse_prediction_is_ignored():
    s = stage("dose", coarse_input=False).eval()
    assert not s.residual and s.net.conv_0.conv_0.conv.in_channels == s.condition_channels
    cond, coarse = inputs(s)
    with torch.no_grad():
        a = s(cond, coarse)
        b = s(cond, -coarse)
        c = s(cond, None)
    assert torch.equal(a, b) and torch.equal(a, c) and a.abs().sum() > 0


def test_wrong_inputs_are_named():
    s = stage("dose")
    cond, coarse = inputs(s)
    with pytest.raises(ConfigError, match="expects 12 condition channels"):
        s(cond[:, :3], coarse)
    with pytest.raises(ConfigError, match="coarse prediction with 1 channels, found None"):
        s(cond, None)


def test_a_fresh_mask_stage_starts_at_the_organ_prior():
    """Logits start at the logit of a 1 % prior, not at p = 0.5 (the bias would take hundreds of steps)."""
    import math

    from diffkt3d.data.encoding import EncodingConfig
    from diffkt3d.models.full_res import MASK_PRIOR, FullResConfig, FullResStage

    enc = EncodingConfig(grid=(16, 16, 16), modalities=("ct", "oar", "body", "dose"))
    config = FullResConfig(target="oar", features=(4, 4, 8, 8, 16, 4), crop=(32, 32, 32), conditions=("ct", "body"))
    torch.manual_seed(0)
    stage = FullResStage(config, enc)
    with torch.no_grad():
        p = torch.sigmoid(stage(torch.zeros(1, 2, 32, 32, 32), torch.zeros(1, 7, 32, 32, 32)))
    assert abs(math.log(MASK_PRIOR / (1 - MASK_PRIOR)) - stage.net.final_conv.bias.mean().item()) < 1e-6
    assert float(p.mean()) < 0.1
