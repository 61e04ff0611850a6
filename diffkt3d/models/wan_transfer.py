"""Wan 2.1 knowledge transfer: load a local Wan 2.1 T2V DiT checkpoint into the Any2Any DiT.

DiffKT3D initialises its DiT from Wan 2.1 (paper: MAE 2.58 -> 2.07 Gy with the prior). Users point
us at a checkpoint they downloaded; nothing is fetched here. Both key layouts are read:

- original Wan repo names (``Wan-AI/Wan2.1-T2V-1.3B``: ``diffusion_pytorch_model.safetensors``):
  ``blocks.N.self_attn.q``, ``blocks.N.norm3`` (cross-attention norm), ``time_embedding.0`` ...;
- diffusers names (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, folder ``transformer/``):
  ``blocks.N.attn1.to_q``, ``blocks.N.norm2`` (cross-attention norm: swapped vs original),
  ``condition_embedder.time_embedder.linear_1`` ...

as one safetensors file, a folder, or a sharded checkpoint with its ``*.safetensors.index.json``.
Diffusers names are first mapped to original names (:func:`diffusers_to_original_key`), so the
transfer itself is written once, against Wan's original layout, which our parameter names mirror.

What happens to each Wan tensor (:class:`TransferReport` lists every one):

- transferred unchanged: ``blocks.N.self_attn.{q,k,v,o,norm_q,norm_k}``, ``blocks.N.ffn.{0,2}``,
  ``blocks.N.modulation``, ``time_embedding.{0,2}``, ``time_projection.1``, ``head.modulation``;
- adapted (one Wan tensor initialises one tensor per modality): ``patch_embedding`` ->
  ``patch_embedding.<m>`` and ``head.head`` -> ``head.head.<m>`` (see :func:`adapt_patch_embedding`
  and :func:`adapt_head`);
- dropped: ``text_embedding.*``, ``blocks.N.cross_attn.*`` and its norm ``blocks.N.norm3`` (DiffKT3D
  has no text and no cross-attention; conditions are tokens in the self-attention);
- new (no Wan counterpart): ``domain_embedding`` and ``role_embedding`` are zeroed, so the loaded
  model with one modality is exactly Wan without cross-attention; the 4D RoPE has no weights (use
  ``DiTConfig.rope_slot_stride > 0`` to keep Wan's t/h/w channel split, see ``config.py``).

Any key the map does not know, any missing key and any shape mismatch raises
:class:`WanCheckpointError` naming the key (expected vs found): a silently half-loaded prior would
cost the paper's main result without anyone noticing.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from diffkt3d.errors import ConfigError
from diffkt3d.models.any2any_dit import Any2AnyDiT

__all__ = [
    "WanCheckpointError",
    "TransferReport",
    "diffusers_to_original_key",
    "original_to_diffusers_key",
    "detect_layout",
    "read_safetensors_checkpoint",
    "read_wan_checkpoint",
    "adapt_patch_embedding",
    "adapt_head",
    "transfer_wan_state_dict",
    "load_wan_into_dit",
]

log = logging.getLogger(__name__)


class WanCheckpointError(ConfigError, ValueError):
    """A Wan checkpoint that cannot be transferred (unknown/missing key, shape mismatch, bad file)."""


# --- key layouts --------------------------------------------------------------------------------
# (diffusers pattern, original replacement); applied with re.fullmatch, first match wins.
_ATTN = r"(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)"
_ATTN_D2O = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "norm_q": "norm_q", "norm_k": "norm_k"}
_ATTN_O2D = {v: k for k, v in _ATTN_D2O.items()}
_SIMPLE_D2O = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
}
_SIMPLE_O2D = {v: k for k, v in _SIMPLE_D2O.items()}
_BLOCK_D2O = {"norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
_BLOCK_O2D = {v: k for k, v in _BLOCK_D2O.items()}
# Prefixes some exporters put in front of the original names (ComfyUI / LDM-style files).
_STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.")


def diffusers_to_original_key(key: str) -> str:
    """Map one diffusers ``WanTransformer3DModel`` key to Wan's original name.

    Raises:
        WanCheckpointError: keys of other Wan variants (I2V image embedder, ``add_k_proj`` ...).
    """
    if key == "scale_shift_table":
        return "head.modulation"
    m = re.fullmatch(r"(.+)\.(weight|bias)", key)
    if m and m.group(1) in _SIMPLE_D2O:
        return f"{_SIMPLE_D2O[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        n, rest = m.groups()
        if rest == "scale_shift_table":
            return f"blocks.{n}.modulation"
        a = re.fullmatch(rf"attn([12])\.{_ATTN}\.(weight|bias)", rest)
        if a:
            kind = "self_attn" if a.group(1) == "1" else "cross_attn"
            return f"blocks.{n}.{kind}.{_ATTN_D2O[a.group(2)]}.{a.group(3)}"
        b = re.fullmatch(r"(.+)\.(weight|bias)", rest)
        if b and b.group(1) in _BLOCK_D2O:
            return f"blocks.{n}.{_BLOCK_D2O[b.group(1)]}.{b.group(2)}"
    raise WanCheckpointError(
        f"unexpected key {key!r} in a diffusers-layout Wan checkpoint: not part of Wan 2.1 T2V "
        "(image-to-video / VACE / Wan 2.2 variants are not supported)"
    )


def original_to_diffusers_key(key: str) -> str:
    """Inverse of :func:`diffusers_to_original_key` (used to write test checkpoints, tools)."""
    if key == "head.modulation":
        return "scale_shift_table"
    m = re.fullmatch(r"(.+)\.(weight|bias)", key)
    if m and m.group(1) in _SIMPLE_O2D:
        return f"{_SIMPLE_O2D[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        n, rest = m.groups()
        if rest == "modulation":
            return f"blocks.{n}.scale_shift_table"
        a = re.fullmatch(r"(self_attn|cross_attn)\.(q|k|v|o|norm_q|norm_k)\.(weight|bias)", rest)
        if a:
            kind = "attn1" if a.group(1) == "self_attn" else "attn2"
            return f"blocks.{n}.{kind}.{_ATTN_O2D[a.group(2)]}.{a.group(3)}"
        b = re.fullmatch(r"(.+)\.(weight|bias)", rest)
        if b and b.group(1) in _BLOCK_O2D:
            return f"blocks.{n}.{_BLOCK_O2D[b.group(1)]}.{b.group(2)}"
    raise WanCheckpointError(f"unexpected key {key!r} in an original-layout Wan checkpoint")


def detect_layout(keys: list[str] | set[str]) -> str:
    """``"original"`` or ``"diffusers"`` from the key names; error if neither fits."""
    keys = set(keys)
    is_diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)
    is_original = any(k.startswith("time_embedding.") or ".self_attn." in k for k in keys)
    if is_diffusers == is_original:
        sample = sorted(keys)[:5]
        raise WanCheckpointError(
            "cannot tell the Wan key layout: expected original names (time_embedding.0, "
            "blocks.0.self_attn.q ...) or diffusers names (condition_embedder..., blocks.0.attn1.to_q ...); "
            f"found {sample}"
        )
    return "diffusers" if is_diffusers else "original"


# --- reading files ------------------------------------------------------------------------------
def _checkpoint_files(path: Path) -> list[Path]:
    """Safetensors files of a checkpoint given as a file, an index json or a folder."""
    if path.is_file():
        if path.name.endswith(".json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise WanCheckpointError(f"{path}: not a safetensors index (no 'weight_map'): {exc}") from None
            files = [path.parent / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise WanCheckpointError(f"{path}: shards listed in the index are missing: {missing}")
            return files
        if path.suffix != ".safetensors":
            raise WanCheckpointError(
                f"{path}: expected a .safetensors file, an index .json or a folder (found suffix {path.suffix!r}; "
                "convert .pth checkpoints to safetensors first)"
            )
        return [path]
    if path.is_dir():
        if not any(path.glob("*.safetensors*")) and (path / "transformer").is_dir():
            path = path / "transformer"  # a diffusers pipeline folder
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return _checkpoint_files(indexes[0])
        if len(indexes) > 1:
            raise WanCheckpointError(f"{path}: several index files {[p.name for p in indexes]}; pass one")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WanCheckpointError(f"{path}: no .safetensors files (and no transformer/ sub-folder)")
        return files
    raise WanCheckpointError(f"Wan checkpoint not found: {path}")


def read_safetensors_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], list[Path]]:
    """All tensors of a (possibly sharded) safetensors checkpoint on CPU; also returns the files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = _checkpoint_files(Path(path))
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise WanCheckpointError(f"cannot read {f}: {exc}") from None
        dup = sorted(set(part) & set(state))
        if dup:
            raise WanCheckpointError(f"{f}: keys {dup[:3]} also appear in another shard")
        state.update(part)
    return state, files


def read_wan_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], str, list[Path]]:
    """Read a Wan DiT checkpoint and return ``(state_in_original_names, source_layout, files)``."""
    raw, files = read_safetensors_checkpoint(path)
    for prefix in _STRIP_PREFIXES:
        if raw and all(k.startswith(prefix) for k in raw):
            raw = {k[len(prefix):]: v for k, v in raw.items()}
    layout = detect_layout(list(raw))
    if layout == "original":
        return raw, layout, files
    return {diffusers_to_original_key(k): v for k, v in raw.items()}, layout, files


# --- adapting the per-modality parts ------------------------------------------------------------
def adapt_patch_embedding(weight: Tensor, channels: int) -> Tensor:
    """Wan's patch embedding (dim, C_w, pt, ph, pw) -> ours for a modality with ``channels`` inputs.

    Rule: an input whose channels all hold the same value x gives exactly Wan's response to an
    all-x input (sum over input channels preserved). ``channels == C_w``: copied; a multiple
    k * C_w (e.g. the 16 latent channels of each of k VAE-encoded OAR masks): Wan's kernel tiled k
    times and divided by k; otherwise each channel gets ``sum_c W[:, c] / channels``.
    """
    c_w = weight.shape[1]
    if channels == c_w:
        return weight.clone()
    if channels % c_w == 0:
        k = channels // c_w
        return weight.repeat(1, k, 1, 1, 1) / k
    return weight.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1, 1) / channels


def adapt_head(weight: Tensor, patch_volume: int, channels: int) -> Tensor:
    """Wan's output head rows (or bias) -> ours for a modality with ``channels`` outputs.

    Wan unpatchifies its head output as (pt, ph, pw, C) (row = p * C_w + c); ours as
    (C, pt, ph, pw) (row = c * P + p), so rows are permuted. Channels: copied if equal, tiled for
    a multiple of C_w (each group predicts like Wan), otherwise each channel gets Wan's mean over
    its channels.

    Args:
        weight: (C_w * P, dim) weight or (C_w * P,) bias.
        patch_volume: P = pt * ph * pw.
        channels: our output channels for the modality.
    """
    tail = weight.shape[1:]
    c_w = weight.shape[0] // patch_volume
    per_channel = weight.reshape(patch_volume, c_w, *tail).transpose(0, 1)  # (C_w, P, ...)
    if channels == c_w:
        out = per_channel
    elif channels % c_w == 0:
        out = per_channel.repeat(channels // c_w, *([1] * (per_channel.ndim - 1)))
    else:
        out = per_channel.mean(dim=0, keepdim=True).expand(channels, *per_channel.shape[1:])
    return out.reshape(channels * patch_volume, *tail).contiguous()


# --- the transfer -------------------------------------------------------------------------------
@dataclass
class TransferReport:
    """What the transfer did with every tensor.

    Attributes:
        source: checkpoint path; layout: "original" or "diffusers"; files: safetensors read.
        transferred: our key -> Wan key (original names), copied unchanged.
        adapted: our key -> (Wan key, how), per-modality patch embeddings and heads.
        dropped: Wan keys not used (text embedding, cross-attention and its norm).
        new: our key -> how it was initialised (no Wan counterpart).
    """

    source: str = ""
    layout: str = ""
    files: list[str] = field(default_factory=list)
    transferred: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, tuple[str, str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    new: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """Multi-line human-readable report (counts, then every dropped/new/adapted key)."""
        lines = [
            f"Wan transfer from {self.source} ({self.layout} layout, {len(self.files)} file(s)):",
            f"  transferred {len(self.transferred)} tensors unchanged",
            f"  adapted {len(self.adapted)}: "
            + ", ".join(f"{k} <- {src} ({how})" for k, (src, how) in self.adapted.items()),
            f"  dropped {len(self.dropped)}: {', '.join(self.dropped)}",
            f"  new {len(self.new)}: " + ", ".join(f"{k} ({how})" for k, how in self.new.items()),
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-safe dict (e.g. to store next to a run's checkpoints)."""
        return {
            "source": self.source, "layout": self.layout, "files": self.files,
            "transferred": self.transferred,
            "adapted": {k: list(v) for k, v in self.adapted.items()},
            "dropped": self.dropped, "new": self.new,
        }


def _is_dropped(key: str) -> bool:
    return key.startswith("text_embedding.") or re.fullmatch(r"blocks\.\d+\.(cross_attn\..+|norm3\.(weight|bias))", key) \
        is not None


def _check_shape(key: str, src_key: str, found: Tensor, expected: torch.Size) -> None:
    if tuple(found.shape) != tuple(expected):
        raise WanCheckpointError(
            f"shape mismatch for {src_key!r} -> {key!r}: model expects {tuple(expected)}, "
            f"checkpoint has {tuple(found.shape)} (check the DiT preset: dim/ffn_dim/depth/patch/freq_dim)"
        )


@torch.no_grad()
def transfer_wan_state_dict(model: Any2AnyDiT, wan_state: dict[str, Tensor]) -> TransferReport:
    """Copy a Wan state dict (original names) into ``model`` in place; returns the report.

    Raises:
        WanCheckpointError: unknown Wan key, Wan key the model needs but the checkpoint lacks,
            a different number of blocks, or a shape mismatch, each naming the key.
    """
    cfg = model.config
    ours = dict(model.named_parameters())
    report = TransferReport()
    used: set[str] = set()

    wan_blocks = {int(m.group(1)) for k in wan_state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if wan_blocks and len(wan_blocks) != cfg.depth:
        raise WanCheckpointError(
            f"checkpoint has {len(wan_blocks)} blocks, the model config has depth {cfg.depth}"
        )

    def take(src_key: str) -> Tensor:
        if src_key not in wan_state:
            raise WanCheckpointError(f"Wan checkpoint lacks {src_key!r} (truncated or not a Wan 2.1 T2V DiT?)")
        used.add(src_key)
        return wan_state[src_key]

    # 1. Unchanged tensors: every parameter whose name exists in Wan's original layout.
    adapted_prefixes = ("patch_embedding.", "head.head.")
    new_keys = {"domain_embedding.weight", "role_embedding.weight"}
    for key, param in ours.items():
        if key.startswith(adapted_prefixes) or key in new_keys:
            continue
        src = take(key)
        _check_shape(key, key, src, param.shape)
        param.copy_(src.to(param.dtype))
        report.transferred[key] = key

    # 2. Per-modality patch embeddings and heads from Wan's single ones.
    w_pe, b_pe = take("patch_embedding.weight"), take("patch_embedding.bias")
    w_head, b_head = take("head.head.weight"), take("head.head.bias")
    pv = cfg.patch_volume
    if tuple(w_pe.shape[2:]) != tuple(cfg.patch) or w_pe.shape[0] != cfg.dim:
        raise WanCheckpointError(
            f"patch_embedding.weight: model expects (dim {cfg.dim}, C, *patch {cfg.patch}), "
            f"checkpoint has {tuple(w_pe.shape)}"
        )
    if w_head.shape[1] != cfg.dim or w_head.shape[0] % pv:
        raise WanCheckpointError(
            f"head.head.weight: model expects (C * {pv}, {cfg.dim}), checkpoint has {tuple(w_head.shape)}"
        )
    c_wan = w_pe.shape[1]
    for m in cfg.modalities:
        c = cfg.in_channels[m]
        how = "copied" if c == c_wan else (f"tiled x{c // c_wan} / {c // c_wan}" if c % c_wan == 0
                                           else f"channel-summed / {c}")
        pe = model.patch_embedding[m]
        pe.weight.copy_(adapt_patch_embedding(w_pe, c).to(pe.weight.dtype))
        pe.bias.copy_(b_pe.to(pe.bias.dtype))
        report.adapted[f"patch_embedding.{m}.weight"] = ("patch_embedding.weight", f"{c_wan}->{c} ch, {how}")
        report.adapted[f"patch_embedding.{m}.bias"] = ("patch_embedding.bias", "copied")
        head = model.head.head[m]
        c_head = cfg.head_channels(m)  # + dose-prior weights when the config has them
        head.weight.copy_(adapt_head(w_head, pv, c_head).to(head.weight.dtype))
        head.bias.copy_(adapt_head(b_head, pv, c_head).to(head.bias.dtype))
        note = "rows (p, c) -> (c, p)" + ("" if c_head == c_wan else f", {c_wan}->{c_head} ch")
        report.adapted[f"head.head.{m}.weight"] = ("head.head.weight", note)
        report.adapted[f"head.head.{m}.bias"] = ("head.head.bias", note)

    # 3. New parts: zero, so a single-modality model is exactly Wan without cross-attention.
    model.domain_embedding.weight.zero_()
    model.role_embedding.weight.zero_()
    report.new["domain_embedding.weight"] = "zeros"
    report.new["role_embedding.weight"] = "zeros"
    report.new["4D RoPE"] = ("no weights; Wan t/h/w split with slot offset along D"
                             if cfg.rope_slot_stride else "no weights; own slot channels (Wan split not kept)")

    # 4. Everything else in the checkpoint must be a known drop.
    for key in sorted(set(wan_state) - used):
        if not _is_dropped(key):
            raise WanCheckpointError(
                f"unexpected key {key!r} in the Wan checkpoint (not used by the Any2Any DiT and not a "
                "known drop: text embedding / cross-attention / its norm)"
            )
        report.dropped.append(key)
    return report


def load_wan_into_dit(model: Any2AnyDiT, path: str | Path) -> TransferReport:
    """Read a local Wan 2.1 checkpoint (either layout, single or sharded) into ``model``.

    Logs a one-line summary; the full lists are in the returned :class:`TransferReport`.
    """
    state, layout, files = read_wan_checkpoint(path)
    report = transfer_wan_state_dict(model, state)
    report.source = str(path)
    report.layout = layout
    report.files = [str(f) for f in files]
    log.info("Wan transfer from %s (%s layout): %d transferred, %d adapted, %d dropped, %d new", path,
             layout, len(report.transferred), len(report.adapted), len(report.dropped), len(report.new))
    return report
