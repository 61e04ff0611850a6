"""ScardNFT end to end on a tiny model and the synthetic case: CLI, outputs, preferences, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from diffkt3d.cli.main import main
from diffkt3d.models.checkpoint import file_digest, load_checkpoint
from diffkt3d.preferences import PreferenceStore
from diffkt3d.preferences.learner import SimulatedRater, simulate_records
from diffkt3d.scorecard import load_template
from diffkt3d.training.scardnft import ScardNFTConfig, run_scardnft

torch.set_num_threads(1)
pytest.importorskip("peft")

TINY = dict(group_size=2, sample_steps=2, iterations=2, inner_steps=1, lora_rank=4, lora_alpha=4, threads=1)


def test_cli_stage_scardnft_runs_and_writes_loadable_outputs(tiny_checkpoint, synthetic_case_dir, tmp_path):
    digest = file_digest(tiny_checkpoint)
    cfg = {**TINY, "base_model": str(tiny_checkpoint), "case_dirs": [str(synthetic_case_dir)],
           "reward": {"w_score": 1.0, "w_hinge": 2.0, "w_mae": 0.5}}
    path = tmp_path / "scardnft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["train", "--stage", "scardnft", "--config", str(path), "--out-dir", str(out)]) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    h = history[0]
    assert len(h["reward"]) == 2 and len(h["r"]) == 2 and len(h["mae_gy"]) == 2
    for k in range(2):  # each logged reward is its logged terms with the configured weights
        assert h["reward"][k] == pytest.approx(h["scorecard_pct"][k] - 2.0 * h["penalty"][k] - 0.5 * h["mae_gy"][k])
    merged = load_checkpoint(out / "merged.pt")
    assert merged.meta["scardnft"]["base_digest"] == digest
    assert (out / "adapter.pt").stat().st_size < (out / "merged.pt").stat().st_size
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["config"]["reward"]["w_hinge"] == 2.0
    assert file_digest(tiny_checkpoint) == digest  # the base file is never rewritten


def test_run_with_preference_store_uses_learned_weights(tiny_checkpoint, synthetic_case_dir, tmp_path):
    tpl = load_template("openkbp_hn")
    hidden = {it.id: 1.0 for it in tpl.items} | {"cord_d01cc": 5.0}
    store = PreferenceStore(tmp_path / "prefs")
    for rec in simulate_records(SimulatedRater(hidden), tpl, n=30, seed=0):
        store.append(rec)
    progress = []
    res = run_scardnft(ScardNFTConfig(**TINY, base_model=str(tiny_checkpoint)),
                       case_dirs=[synthetic_case_dir], preferences=tmp_path / "prefs", out_dir=tmp_path / "o",
                       request={"iterations": 1, "unrelated_monailabel_key": 1}, progress=progress.append)
    assert res.iterations == 1 and len(progress) == 1
    assert res.item_weights is not None and res.weight_fit["n_pairs"] == 30
    assert max(res.item_weights, key=res.item_weights.get) == "cord_d01cc"


def test_monailabel_style_call_signature(tiny_checkpoint, synthetic_case_dir, tmp_path, monkeypatch):
    """train_tasks/scardnft.py calls entry(case_dirs=, preferences=[records], out_dir=, request=)."""
    import diffkt3d.training as training

    monkeypatch.setenv("DIFFKT3D_MODEL", str(tiny_checkpoint))
    request = {**TINY, "iterations": 1}
    res = training.run_scardnft(case_dirs=[str(synthetic_case_dir)], preferences=[], out_dir=str(tmp_path / "m"),
                                request=request)
    assert res.merged_path.is_file() and res.item_weights is None


def test_config_errors_are_one_line(tmp_path):
    from diffkt3d.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown ScardNFT config keys"):
        ScardNFTConfig.from_dict({"lora_rnak": 4})
    with pytest.raises(ConfigError, match="group_size"):
        ScardNFTConfig(group_size=1)
    with pytest.raises(ConfigError, match="unknown reward keys"):
        ScardNFTConfig(reward={"w_scorecard": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: [1, 2\n")
    assert main(["train", "--stage", "scardnft", "--config", str(bad)]) == 2


def test_the_merged_model_keeps_the_base_models_full_res_stages(tiny_checkpoint, synthetic_case_dir, tmp_path):
    """ScardNFT changes the DiT only; the served model's stages (e.g. OAR auto-contouring) stay in merged.pt."""
    from diffkt3d.models.checkpoint import read_checkpoint, write_full_res_stages
    from diffkt3d.models.full_res import FullResConfig, FullResStage

    enc = load_checkpoint(tiny_checkpoint).encoding
    config = FullResConfig(target="oar", features=(4, 4, 8, 8, 16, 4), crop=(32, 32, 32),
                           coarse_input=False).resolved(enc.modalities)
    staged = write_full_res_stages(tiny_checkpoint, tmp_path / "staged.pt",
                                   {"oar": (config, FullResStage(config, enc).state_dict())})
    res = run_scardnft(ScardNFTConfig(**{**TINY, "iterations": 1}, base_model=str(staged)),
                       case_dirs=[synthetic_case_dir], out_dir=tmp_path / "o")
    merged, base = read_checkpoint(res.merged_path), read_checkpoint(staged)
    assert sorted(merged["full_res"]) == ["oar"]
    for k, v in base["full_res"]["oar"]["state_dict"].items():
        assert torch.equal(merged["full_res"]["oar"]["state_dict"][k], v)
    assert sorted(load_checkpoint(res.merged_path).full_res) == ["oar"]
