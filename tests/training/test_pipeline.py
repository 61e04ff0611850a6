"""`full_res_stages` in a supervised recipe: `diffkt3d train RECIPE` makes the DiT, then each stage under
the checkpoint the step before wrote, and the last final.pt holds them all."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from diffkt3d.cli.main import main
from diffkt3d.errors import ConfigError
from diffkt3d.models.checkpoint import load_checkpoint, read_checkpoint
from diffkt3d.training.recipe import load_recipe

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
TINY_STAGE = {"stage.features": [4, 4, 8, 8, 16, 4], "stage.crop": [32, 32, 32], "coarse_steps": 1,
              "warmup_steps": 1}


def tiny_recipe(tmp_path: Path, stages: list[dict]) -> Path:
    recipe = {"model_preset": "tiny", "grid": [16, 16, 16], "train_roots": ["openkbp/train"],
              "val_roots": ["openkbp/validation"], "val_cases": 1, "out_dir": str(tmp_path / "run"),
              "cache_dir": str(tmp_path / "cache"), "eval_every": 0, "log_every": 1, "threads": 1,
              "stages": [{"name": "any2any", "steps": 1, "batch_size": 1, "warmup_steps": 1},
                         {"name": "dose", "steps": 1, "batch_size": 1, "warmup_steps": 1}],
              "full_res_stages": stages}
    path = tmp_path / "recipes" / "tiny.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_dit_then_each_stage_into_one_checkpoint(tmp_path, openkbp_root, capsys):
    # one stage recipe next to the recipe (a relative name), one by absolute path
    (tmp_path / "recipes").mkdir()
    shutil.copy(REPO / "configs" / "full-res-oar.yaml", tmp_path / "recipes")
    cache = {"cache_dir": str(tmp_path / "cache-fr")}
    path = tiny_recipe(tmp_path, [
        {"recipe": str(REPO / "configs" / "full-res-dose.yaml"), "set": {**TINY_STAGE, **cache}},
        {"recipe": "full-res-oar.yaml", "set": {**TINY_STAGE, **cache, "stage.coarse_input": False}}])
    code = main(["train", str(path), "--data-root", str(openkbp_root.parent), "--max-steps", "1",
                 "--max-cases", "1", "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    final = tmp_path / "run" / "full-res-1" / "final.pt"
    assert code == 0 and f"(the DiT + 2 full-res stage(s)): {final}" in out
    model = load_checkpoint(final)
    assert sorted(model.full_res) == ["dose", "oar"]
    assert model.full_res["dose"].config.coarse_input and not model.full_res["oar"].config.coarse_input
    # the DiT inside is the one the recipe trained and selected, untouched by the stages
    dit = read_checkpoint(tmp_path / "run" / "best.pt")["state_dict"]
    for key, value in read_checkpoint(final)["state_dict"].items():
        assert torch.equal(value, dit[key])
    meta = read_checkpoint(final)["meta"]["full_res"]
    assert meta["dose"]["step"] == 1 and meta["oar"]["step"] == 1
    assert meta["dose"]["base_model"] == "best.pt"  # under the DiT selected on validation
    assert meta["oar"]["base_model"] == "final.pt"  # the oar stage was trained under the dose stage's output
    # run again: every step is finished and resumes at its end, returning the same final checkpoint
    before = final.stat().st_mtime_ns
    assert main(["train", str(path), "--data-root", str(openkbp_root.parent), "--max-steps", "1",
                 "--max-cases", "1", "--out-dir", str(tmp_path / "run")]) == 0
    assert sorted(load_checkpoint(final).full_res) == ["dose", "oar"] and final.stat().st_mtime_ns >= before


def empty_data_root(tmp_path: Path) -> Path:
    """The split folders a recipe names, empty (loading a recipe needs them to exist, not to hold cases)."""
    for split in ("train", "validation"):
        (tmp_path / "openkbp" / split).mkdir(parents=True, exist_ok=True)
    return tmp_path


def test_stage_recipes_resolve_next_to_the_recipe_and_bad_entries_are_named(tmp_path):
    empty_data_root(tmp_path)
    path = tiny_recipe(tmp_path, [{"recipe": "stage.yaml", "set": {"steps": 3}}])
    cfg = load_recipe(path, data_root=tmp_path)
    assert cfg.full_res_stages == [{"recipe": str(path.parent / "stage.yaml"), "set": {"steps": 3}}]
    for bad in ([{"set": {}}], [{"recipe": "a.yaml", "sett": {}}], ["a.yaml"], [{"recipe": "a.yaml", "set": 3}]):
        with pytest.raises(ConfigError, match=r"full_res_stages\[0\] must be"):
            load_recipe(tiny_recipe(tmp_path, bad), data_root=tmp_path)


def test_the_shipped_recipe_lists_stages_that_load(tmp_path):
    """configs/cpu-default.yaml names the stages of the shipped model; each resolves to a valid recipe."""
    from diffkt3d.training.pipeline import stage_config

    root = empty_data_root(tmp_path)
    cfg = load_recipe(REPO / "configs" / "cpu-default.yaml", data_root=root)
    assert cfg.full_res_stages, "the shipped model has full-res stages; its recipe must list them"
    shipped = load_checkpoint(REPO / "diffkt3d" / "weights" / "cpu-default.pt")
    targets = []
    for i in range(len(cfg.full_res_stages)):
        stage = stage_config(cfg, i, Path("base.pt"), data_root=root)
        assert stage.base_model == "base.pt" and stage.out_dir == str(Path(cfg.out_dir) / f"full-res-{i}")
        targets.append(stage.stage.target)
        shipped_stage = shipped.full_res[stage.stage.target].config
        assert shipped_stage.coarse_input == stage.stage.coarse_input
        assert tuple(shipped_stage.conditions) == tuple(stage.stage.resolved(shipped.encoding.modalities).conditions)
    assert sorted(targets) == sorted(shipped.full_res)
