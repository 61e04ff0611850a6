"""Wan 2.1 transfer: a tiny random diffusers WanTransformer3DModel, saved in both key layouts, loaded
into the Any2Any DiT, must give the same forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

from diffkt3d.models.any2any_dit import Any2AnyDiT  # noqa: E402
from diffkt3d.models.config import DiTConfig  # noqa: E402
from diffkt3d.models.wan_transfer import (  # noqa: E402
    WanCheckpointError,
    diffusers_to_original_key,
    load_wan_into_dit,
    original_to_diffusers_key,
    transfer_wan_state_dict,
)

HEADS, HEAD_DIM, FFN, LAYERS, CH, FREQ, TEXT = 2, 12, 32, 2, 4, 32, 16
DIM = HEADS * HEAD_DIM


@pytest.fixture(scope="module")
def wan() -> WanTransformer3DModel:
    """Tiny Wan 2.1 T2V DiT (same structure as 1.3B), random weights, cross-attention output zeroed."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CH,
        out_channels=CH, text_dim=TEXT, freq_dim=FREQ, ffn_dim=FFN, num_layers=LAYERS,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():  # default init leaves some tensors at 0/1: randomise all
            p.normal_(0.0, 0.2)
        for block in model.blocks:  # DiffKT3D has no cross-attention: make it contribute nothing
            block.attn2.to_out[0].weight.zero_()
            block.attn2.to_out[0].bias.zero_()
    return model


def _original_state(wan: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    sd = wan.state_dict()
    return {_to_original(k): v.clone().contiguous() for k, v in sd.items()}


def _to_original(key: str) -> str:
    # Our map; checked against Wan's names and diffusers' own converter in the first test.
    return diffusers_to_original_key(key)


@pytest.fixture(scope="module")
def checkpoints(wan, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    diff_dir = root / "diffusers_sharded"
    wan.save_pretrained(diff_dir, safe_serialization=True, max_shard_size="20KB")  # -> several shards + index
    orig_file = root / "original" / "diffusion_pytorch_model.safetensors"
    orig_file.parent.mkdir()
    save_file(_original_state(wan), str(orig_file))
    single_diff = root / "diffusers_single.safetensors"
    save_file({k: v.contiguous() for k, v in wan.state_dict().items()}, str(single_diff))
    return {"diffusers_dir": diff_dir, "original_file": orig_file, "diffusers_file": single_diff}


def _dit(stride: int = 8, **overrides) -> Any2AnyDiT:
    fields = dict(modalities=("dose",), in_channels={"dose": CH}, patch=(1, 2, 2), dim=DIM, depth=LAYERS,
                  heads=HEADS, ffn_dim=FFN, freq_dim=FREQ, eps=1e-6, rope_slot_stride=stride,
                  zero_init_modulation=False)
    fields.update(overrides)
    return Any2AnyDiT(DiTConfig(**fields)).eval()


def test_original_names_match_wan_repo_and_diffusers_converter(wan):
    """Our key map agrees with Wan's repo names (written out here) and diffusers' own converter."""
    orig = _original_state(wan)
    expected_block0 = {
        *(f"blocks.0.self_attn.{n}.{p}" for n in "qkvo" for p in ("weight", "bias")),
        *(f"blocks.0.cross_attn.{n}.{p}" for n in "qkvo" for p in ("weight", "bias")),
        "blocks.0.self_attn.norm_q.weight", "blocks.0.self_attn.norm_k.weight",
        "blocks.0.cross_attn.norm_q.weight", "blocks.0.cross_attn.norm_k.weight",
        "blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.0.modulation",
        "blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias", "blocks.0.ffn.2.weight", "blocks.0.ffn.2.bias",
    }
    assert {k for k in orig if k.startswith("blocks.0.")} == expected_block0
    assert {k for k in orig if not k.startswith("blocks.")} == {
        "patch_embedding.weight", "patch_embedding.bias", "time_embedding.0.weight", "time_embedding.0.bias",
        "time_embedding.2.weight", "time_embedding.2.bias", "time_projection.1.weight",
        "time_projection.1.bias", "text_embedding.0.weight", "text_embedding.0.bias",
        "text_embedding.2.weight", "text_embedding.2.bias", "head.head.weight", "head.head.bias",
        "head.modulation",
    }
    # The cross-attention norm is diffusers' norm2 but Wan's norm3 (the swap).
    assert torch.equal(orig["blocks.1.norm3.weight"], wan.blocks[1].norm2.weight)
    back = convert_wan_transformer_to_diffusers(dict(orig))
    ref = wan.state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    assert all(original_to_diffusers_key(k2) == k1 for k1, k2 in zip(ref, map(_to_original, ref), strict=True))


@pytest.mark.parametrize("which", ["diffusers_dir", "original_file", "diffusers_file"])
def test_forward_matches_diffusers_wan(wan, checkpoints, which):
    """One modality in Wan's patching: our forward equals diffusers' (fp32, max abs diff <= 1e-4)."""
    torch.manual_seed(1)
    x = torch.randn(2, CH, 5, 8, 12)  # (B, C, T, H, W) -> 5 x 4 x 6 tokens
    timestep = torch.tensor([637.0, 81.0])
    text = torch.randn(2, 7, TEXT)  # irrelevant: cross-attention output is zero
    with torch.no_grad():
        ref = wan(x, timestep, text, return_dict=False)[0]
        model = _dit()
        report = load_wan_into_dit(model, checkpoints[which])
        ours = model({"dose": x}, "dose", timestep / 1000.0)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff}"
    assert ref.abs().max().item() > 0.1  # a real signal, not two zero maps
    assert report.layout == ("original" if which == "original_file" else "diffusers")
    if which == "diffusers_dir":
        assert len(report.files) > 1  # sharded with an index json
        assert json.loads((checkpoints[which] / "diffusion_pytorch_model.safetensors.index.json").read_text())


def test_report_lists_transferred_dropped_new(wan, checkpoints):
    model = _dit(modalities=("ct", "oar", "dose"), in_channels={"ct": CH, "oar": 3 * CH, "dose": 1})
    report = load_wan_into_dit(model, checkpoints["original_file"])
    assert "blocks.1.self_attn.q.weight" in report.transferred
    assert "time_projection.1.weight" in report.transferred and "head.modulation" in report.transferred
    assert set(report.dropped) == {k for k in _original_state(wan)
                                   if k.startswith("text_embedding.") or ".cross_attn." in k or ".norm3." in k}
    assert set(report.new) >= {"domain_embedding.weight", "role_embedding.weight"}
    assert torch.count_nonzero(model.domain_embedding.weight) == 0
    # Channel adaptation keeps the response to an input with all channels equal.
    w = wan.patch_embedding.weight.detach()
    assert torch.allclose(model.patch_embedding["oar"].weight.sum(1), w.sum(1), atol=1e-6)
    assert torch.allclose(model.patch_embedding["dose"].weight.sum(1), w.sum(1), atol=1e-6)
    assert "patch_embedding.oar.weight" in report.adapted and "head.head.dose.bias" in report.adapted
    assert "dropped" in report.summary()


def test_paper_rope_layout_is_not_wan(wan, checkpoints):
    """Guard that the test above can fail: the paper's slot-channel RoPE split differs from Wan's."""
    x = torch.randn(1, CH, 5, 8, 8)
    t = torch.tensor([500.0])
    with torch.no_grad():
        ref = wan(x, t, torch.zeros(1, 3, TEXT), return_dict=False)[0]
        model = _dit(stride=0)
        load_wan_into_dit(model, checkpoints["original_file"])
        diff = (model({"dose": x}, "dose", t / 1000.0) - ref).abs().max().item()
    assert diff > 1e-3


def test_errors_name_the_key(wan, tmp_path):
    orig = _original_state(wan)
    bad = dict(orig, **{"blocks.0.self_attn.extra.weight": torch.zeros(2)})
    save_file(bad, str(tmp_path / "unexpected.safetensors"))
    with pytest.raises(WanCheckpointError, match="blocks.0.self_attn.extra.weight"):
        load_wan_into_dit(_dit(), tmp_path / "unexpected.safetensors")

    short = {k: v for k, v in orig.items() if k != "blocks.1.ffn.2.bias"}
    save_file(short, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WanCheckpointError, match="blocks.1.ffn.2.bias"):
        load_wan_into_dit(_dit(), tmp_path / "missing.safetensors")

    with pytest.raises(WanCheckpointError, match=r"blocks.0.ffn.0.weight.*\(64, 24\).*\(32, 24\)"):
        transfer_wan_state_dict(_dit(ffn_dim=64), dict(orig))

    with pytest.raises(WanCheckpointError, match="depth 3"):
        transfer_wan_state_dict(_dit(depth=3), dict(orig))

    save_file({"foo.weight": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(WanCheckpointError, match="key layout"):
        load_wan_into_dit(_dit(), tmp_path / "foreign.safetensors")
    with pytest.raises(WanCheckpointError, match="not found"):
        load_wan_into_dit(_dit(), tmp_path / "nope")


def test_full_size_wan_1_3b_keys_and_shapes_fit_the_preset():
    """Wan2.1-T2V-1.3B's published config (diffusers), on the meta device (no memory, no weights):
    every key maps and every shape fits our ``wan-1.3b`` preset in the latent path."""
    from diffkt3d.models.config import get_config

    with torch.device("meta"):
        wan = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6,
        )
        channels = {"ct": 16, "ptv": 16, "oar": 7 * 16, "body": 16, "beam": 16, "angle": 16, "dose": 16}
        model = Any2AnyDiT(get_config("wan-1.3b", in_channels=channels, rope_slot_stride=32))
    state = {diffusers_to_original_key(k): v for k, v in wan.state_dict().items()}
    report = transfer_wan_state_dict(model, state)
    # Per block: q,k,v,o (w+b) 8, norm_q/k 2, ffn (w+b) 4, modulation 1; + time emb 4, time proj 2, head mod 1.
    assert len(report.transferred) == 30 * 15 + 7
    # Per block: cross-attn q,k,v,o (w+b) 8, norm_q/k 2, norm3 (w+b) 2; + text embedding 4.
    assert len(report.dropped) == 30 * 12 + 4
    assert model.rope_dims == (44, 42, 42)
