"""LoRA wrapping for ScardNFT: what trains, base weights untouched, adapter save -> load -> merge."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from diffkt3d.models.checkpoint import load_checkpoint, save_checkpoint
from diffkt3d.training.scardnft import ScardNFTConfig, add_lora, load_adapter, merge_lora, save_adapter

torch.set_num_threads(1)
pytest.importorskip("peft")


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vols = {m: torch.randn(1, c, 16, 16, 16, generator=g) for m, c in
            {"dose": 1, "ct": 1, "ptv": 1, "oar": 7, "body": 1}.items()}
    return vols, torch.tensor([0.6])


def _train_a_bit(model, steps: int = 3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    vols, t = _inputs(1)
    for _ in range(steps):
        opt.zero_grad()
        model(vols, "dose", t).pow(2).mean().backward()  # any loss moving the adapter
        opt.step()


def test_lora_targets_and_trainable_set(tiny_checkpoint):
    bundle = load_checkpoint(tiny_checkpoint)
    model = add_lora(bundle.model, rank=8, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if ".lora_" in n]
    # 6 Linears per block (q, k, v, o, ffn.0, ffn.2) x depth, each with A and B
    depth = bundle.model.config.depth
    assert len(lora) == 2 * 6 * depth
    wrapped = {re.sub(r"\.lora_[AB]\..*", "", n).split("blocks.", 1)[1] for n in lora}
    assert wrapped == {f"{b}.{m}" for b in range(depth)
                       for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "ffn.0", "ffn.2")}
    others = sorted(set(trainable) - set(lora))
    assert others == sorted([f"base_model.model.blocks.{b}.modulation" for b in range(depth)]
                            + ["base_model.model.head.modulation", "base_model.model.time_projection.1.weight",
                               "base_model.model.time_projection.1.bias"])
    rank_a = next(p for n, p in model.named_parameters() if n.endswith("self_attn.q.lora_A.default.weight"))
    assert rank_a.shape[0] == 8


def test_default_rank_is_64():
    assert ScardNFTConfig().lora_rank == 64 and ScardNFTConfig().lr == 3e-4


def test_lora_starts_as_identity_and_base_weights_stay_bit_identical(tiny_checkpoint):
    bundle = load_checkpoint(tiny_checkpoint)
    base_state = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    vols, t = _inputs()
    with torch.no_grad():
        y_base = bundle.model(vols, "dose", t)
    model = add_lora(copy.deepcopy(bundle.model), rank=8, alpha=8)
    with torch.no_grad():
        assert torch.equal(model(vols, "dose", t), y_base)  # B = 0 at init
    _train_a_bit(model)
    with torch.no_grad():
        assert not torch.allclose(model(vols, "dose", t), y_base)  # it did learn something
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen, "no frozen parameters?"
    for name, p in frozen.items():
        assert torch.equal(p, base_state[name]), name  # bit-identical
    # the untouched original model object is also unchanged
    for k, v in bundle.model.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_adapter_save_load_merge_reproduces_outputs(tiny_checkpoint, tmp_path):
    bundle = load_checkpoint(tiny_checkpoint)
    model = add_lora(copy.deepcopy(bundle.model), rank=8, alpha=8)
    _train_a_bit(model)
    model.eval()
    vols, t = _inputs(2)
    with torch.no_grad():
        y = model(vols, "dose", t)
    cfg = ScardNFTConfig(lora_rank=8, lora_alpha=8)
    adapter = save_adapter(tmp_path / "adapter.pt", model, cfg, tiny_checkpoint)
    # the adapter file holds only the trainable tensors, not the base
    blob = torch.load(adapter, weights_only=True)
    assert all(".lora_" in k or "modulation" in k or "time_projection" in k for k in blob["state_dict"])
    loaded, _ = load_adapter(adapter, tiny_checkpoint)
    with torch.no_grad():
        assert torch.allclose(loaded(vols, "dose", t), y, atol=1e-6)
    merged = merge_lora(loaded)
    assert type(merged).__name__ == "Any2AnyDiT"
    path = save_checkpoint(tmp_path / "merged.pt", merged, bundle.model.config, bundle.encoding, bundle.flow_shift)
    reloaded = load_checkpoint(path).model
    with torch.no_grad():
        assert torch.allclose(reloaded(vols, "dose", t), y, atol=1e-5)


def test_adapter_refuses_another_base(tiny_checkpoint, tmp_path):
    from diffkt3d.errors import ConfigError

    bundle = load_checkpoint(tiny_checkpoint)
    model = add_lora(copy.deepcopy(bundle.model), rank=4, alpha=4)
    adapter = save_adapter(tmp_path / "adapter.pt", model, ScardNFTConfig(lora_rank=4, lora_alpha=4),
                           tiny_checkpoint)
    other = save_checkpoint(tmp_path / "other.pt", bundle.model, bundle.model.config, bundle.encoding, 2.0)
    with pytest.raises(ConfigError, match="digest"):
        load_adapter(adapter, other)
