"""`diffkt3d train RECIPE --stage full-res`: the recipe, --set and the smoke limits reach the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from diffkt3d.cli.main import main
from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from diffkt3d.models.config import get_config

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


def tiny_base(path):
    torch.manual_seed(0)
    enc = EncodingConfig(grid=(16, 16, 16), modalities=("ct", "ptv", "oar", "body", "dose"))
    cfg = get_config("tiny", in_channels=enc.channels(), modalities=list(enc.modalities))
    return save_checkpoint(path, Any2AnyDiT(cfg), cfg, enc, flow_shift=3.0, meta={"name": "tiny-base"})


@pytest.mark.parametrize("recipe, peer", [("full-res-dose.yaml", False), ("full-res-oar.yaml", True)])
def test_full_res_recipe_smoke_run(tmp_path, openkbp_root, capsys, recipe, peer):
    """The shipped recipes (docs/full-res.md) with a tiny base model, tiny U-Net and crop, 1 step, 1 case."""
    base = tiny_base(tmp_path / "base.pt")
    out = tmp_path / "run"
    sets = [f"base_model={base}", "stage.features=[4, 4, 8, 8, 16, 4]", "stage.crop=[32, 32, 32]",
            f"cache_dir={tmp_path / 'cache'}", "coarse_steps=1", "warmup_steps=1"]
    sets += ["stage.coarse_input=false"] if peer else []
    code = main(["train", str(REPO / "configs" / recipe), "--stage", "full-res", "--data-root",
                 str(openkbp_root.parent), *[a for s in sets for a in ("--set", s)],
                 "--max-steps", "1", "--max-cases", "1", "--out-dir", str(out)])
    assert code == 0 and str(out / "final.pt") in capsys.readouterr().out
    target = "oar" if "oar" in recipe else "dose"
    record = read_checkpoint(out / "final.pt")["meta"]["full_res"][target]
    assert record["step"] == 1 and record["cases"] == 1
    budget = yaml.safe_load((REPO / "configs" / recipe).read_text())["max_cpu_minutes"]
    assert record["train_config"]["max_cpu_minutes"] == budget  # the recipe's budget, untouched by the smoke limits
    assert load_checkpoint(out / "final.pt").full_res[target].config.coarse_input is not peer


def test_full_res_refuses_nproc_and_names_a_bad_override(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_model: m.pt\n")
    assert main(["train", str(recipe), "--stage", "full-res", "--nproc", "2"]) == 2
    assert "--nproc is not supported with --stage full-res" in capsys.readouterr().err
    assert main(["train", str(recipe), "--stage", "full-res", "--set", "stage.target=body"]) == 2
    assert "full-res stage target must be one of" in capsys.readouterr().err
