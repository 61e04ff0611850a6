"""`diffkt3d train RECIPE --stage full-res`: the recipe, --set and the smoke limits reach the trainer."""

from __future__ import annotations

import torch

from diffkt3d.cli.main import main
from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from diffkt3d.models.config import get_config

torch.set_num_threads(1)


def tiny_base(path):
    torch.manual_seed(0)
    enc = EncodingConfig(grid=(16, 16, 16), modalities=("ct", "ptv", "oar", "body", "dose"))
    cfg = get_config("tiny", in_channels=enc.channels(), modalities=list(enc.modalities))
    return save_checkpoint(path, Any2AnyDiT(cfg), cfg, enc, flow_shift=3.0, meta={"name": "tiny-base"})


def test_full_res_smoke_run_from_the_command_line(tmp_path, openkbp_root, capsys):
    base = tiny_base(tmp_path / "base.pt")
    recipe = tmp_path / "full-res.yaml"
    recipe.write_text(f"base_model: {base}\nstage: {{target: dose, features: [4, 4, 8, 8, 16, 4], crop: [32, 32, 32]}}\n"
                      f"train_roots: [openkbp/train]\ncache_dir: {tmp_path / 'cache'}\ncoarse_steps: 1\n"
                      "warmup_steps: 1\n")
    out = tmp_path / "peer"
    code = main(["train", str(recipe), "--stage", "full-res", "--data-root", str(openkbp_root.parent),
                 "--set", "stage.coarse_input=false", "--max-steps", "1", "--max-cases", "1", "--out-dir", str(out)])
    assert code == 0 and str(out / "final.pt") in capsys.readouterr().out
    record = read_checkpoint(out / "final.pt")["meta"]["full_res"]["dose"]
    assert record["step"] == 1 and record["cases"] == 1
    assert not load_checkpoint(out / "final.pt").full_res["dose"].config.coarse_input


def test_full_res_refuses_nproc_and_names_a_bad_override(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base_model: m.pt\n")
    assert main(["train", str(recipe), "--stage", "full-res", "--nproc", "2"]) == 2
    assert "--nproc is not supported with --stage full-res" in capsys.readouterr().err
    assert main(["train", str(recipe), "--stage", "full-res", "--set", "stage.target=body"]) == 2
    assert "full-res stage target must be one of" in capsys.readouterr().err
