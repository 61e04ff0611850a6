"""DiTConfig presets, validation and dict round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from diffkt3d.constants import MODALITIES, OPENKBP_OARS
from diffkt3d.errors import ConfigError
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.config import PRESETS, DiTConfig, get_config


def test_presets_listed_and_unknown_preset_names_them():
    assert {"tiny", "cpu-default", "wan-1.3b"} <= set(PRESETS)
    with pytest.raises(ValueError) as err:
        get_config("huge")
    for name in PRESETS:
        assert name in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI turns it into one line


def test_defaults_follow_constants():
    cfg = get_config("tiny")
    assert cfg.modalities == MODALITIES
    assert cfg.in_channels["oar"] == len(OPENKBP_OARS) == 7
    assert all(cfg.in_channels[m] == 1 for m in MODALITIES if m != "oar")


def test_wan_preset_has_wan_1_3b_dimensions():
    cfg = get_config("wan-1.3b")
    assert (cfg.dim, cfg.ffn_dim, cfg.heads, cfg.depth, cfg.patch, cfg.freq_dim) == (
        1536,
        8960,
        12,
        30,
        (1, 2, 2),
        256,
    )
    assert cfg.head_dim == 128


def test_overrides_and_unknown_override():
    cfg = get_config("tiny", depth=3, patch=[2, 4, 4])
    assert cfg.depth == 3 and cfg.patch == (2, 4, 4)
    with pytest.raises(ValueError, match="depthh"):
        get_config("tiny", depthh=3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip_through_json(name):
    cfg = get_config(name, in_channels={**get_config(name).in_channels, "ct": 2})
    again = DiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.patch, tuple) and isinstance(again.modalities, tuple)


@pytest.mark.parametrize(
    "overrides, word",
    [
        (dict(dim=50, heads=4), "divisible"),
        (dict(dim=36, heads=6), "even"),  # head dim 6 < 8
        (dict(patch=(4, 4)), "patch"),
        (dict(modalities=("ct", "ct")), "duplicates"),
        (dict(modalities=("ct", "mri")), "mri"),
    ],
)
def test_invalid_configs_raise_value_error(overrides, word):
    with pytest.raises(ValueError, match=word):
        get_config("tiny", **overrides)


def test_from_dict_rejects_unknown_keys():
    data = get_config("tiny").to_dict()
    data["dropout"] = 0.1
    with pytest.raises(ValueError, match="dropout"):
        DiTConfig.from_dict(data)


def test_wan_block_parameter_count_on_meta_device():
    """Each block has exactly Wan 1.3B's self-attention + FFN + norms + modulation parameters."""
    cfg = get_config("wan-1.3b")
    with torch.device("meta"):
        model = Any2AnyDiT(cfg)
    d, f = 1536, 8960
    # q, k, v, o (weight + bias), norm_q/norm_k gains, ffn.0 and ffn.2, modulation (6, dim)
    per_block = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 6 * d
    n_blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
    assert n_blocks == 30 * per_block
    # Wan keys for the timestep path and the head
    names = dict(model.named_parameters())
    assert names["time_embedding.0.weight"].shape == (d, 256)
    assert names["time_projection.1.weight"].shape == (6 * d, d)
    assert names["head.modulation"].shape == (1, 2, d)
    assert names["blocks.0.modulation"].shape == (1, 6, d)
