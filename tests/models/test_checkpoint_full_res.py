"""Full-res stages stored inside the base checkpoint: round trip, old files unchanged, clear errors."""

from __future__ import annotations

import pytest
import torch

from diffkt3d.errors import ConfigError
from diffkt3d.models.checkpoint import (
    file_digest,
    load_checkpoint,
    read_checkpoint,
    write_full_res_stages,
)
from diffkt3d.models.full_res import FullResConfig, FullResStage

torch.set_num_threads(1)
TINY = (4, 4, 8, 8, 16, 4)


def make_stage(bundle, target: str, seed: int = 0) -> FullResStage:
    torch.manual_seed(seed)
    cfg = FullResConfig(target=target, features=TINY, crop=(32, 32, 32)).resolved(bundle.encoding.modalities)
    stage = FullResStage(cfg, bundle.encoding)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(0.01)  # not the zero init, so the round trip is tested on real values
    return stage


def test_checkpoint_without_stages_loads_unchanged(tiny_checkpoint):
    bundle = load_checkpoint(tiny_checkpoint)
    assert bundle.full_res == {} and "full_res" not in read_checkpoint(tiny_checkpoint)


def test_stages_round_trip_inside_the_base_file(tiny_checkpoint, tmp_path):
    base = load_checkpoint(tiny_checkpoint)
    before = file_digest(tiny_checkpoint)
    dose, oar = make_stage(base, "dose", 1), make_stage(base, "oar", 2)
    out = write_full_res_stages(tiny_checkpoint, tmp_path / "with-stage.pt",
                                {"dose": (dose.config, dose.state_dict()), "oar": (oar.config, oar.state_dict())},
                                meta_updates={"full_res": {"dose": {"steps": 3}}})
    assert file_digest(tiny_checkpoint) == before  # the base file is not touched
    loaded = load_checkpoint(out)
    assert sorted(loaded.full_res) == ["dose", "oar"]
    for target, stage in (("dose", dose), ("oar", oar)):
        got = loaded.full_res[target]
        assert got.config == stage.config and not got.training
        for k, v in stage.state_dict().items():
            torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0)
    # the base model is the same model, the version is new
    for k, v in base.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    assert loaded.meta["name"] == base.meta["name"] and loaded.meta["full_res"] == {"dose": {"steps": 3}}
    assert loaded.version != base.version
    # adding a second write replaces one target and keeps the other
    new_dose = make_stage(base, "dose", 3)
    again = write_full_res_stages(out, out, {"dose": (new_dose.config, new_dose.state_dict())})
    assert sorted(load_checkpoint(again).full_res) == ["dose", "oar"]


def test_a_staged_target_loses_its_quality_record(tiny_checkpoint, tmp_path):
    from diffkt3d.models.checkpoint import update_meta

    base = tmp_path / "base.pt"
    base.write_bytes(tiny_checkpoint.read_bytes())
    update_meta(base, {"quality": {"oar": {"cases": 40}, "ct": {"cases": 40}}})
    stage = make_stage(load_checkpoint(base), "oar")
    out = write_full_res_stages(base, tmp_path / "m.pt", {"oar": (stage.config, stage.state_dict())})
    assert load_checkpoint(out).meta["quality"] == {"ct": {"cases": 40}}  # measured without the stage


def test_a_stage_that_does_not_match_its_config_is_refused(tiny_checkpoint, tmp_path):
    base = load_checkpoint(tiny_checkpoint)
    stage = make_stage(base, "dose")
    state = stage.state_dict()
    state.pop(next(iter(state)))
    out = write_full_res_stages(tiny_checkpoint, tmp_path / "bad.pt", {"dose": (stage.config, state)})
    with pytest.raises(ConfigError, match="full-res dose stage does not match its config: missing"):
        load_checkpoint(out)
    blob = read_checkpoint(out)
    blob["full_res"] = {"oar": blob["full_res"]["dose"]}
    torch.save(blob, tmp_path / "misfiled.pt")
    with pytest.raises(ConfigError, match="stored under 'oar' is for target 'dose'"):
        load_checkpoint(tmp_path / "misfiled.pt")
