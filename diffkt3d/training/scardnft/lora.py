"""LoRA on the DiT through peft: which layers, what trains, and folding the adapter back in."""

from __future__ import annotations

import copy
import logging
import re

from torch import Tensor, nn

from diffkt3d.errors import ConfigError

__all__ = ["LORA_TARGETS", "add_lora", "trainable_state", "merge_lora", "strip_peft_prefix"]

log = logging.getLogger(__name__)

# All self-attention (q, k, v, o) and FFN (ffn.0, ffn.2) Linears of every block (regex, full match).
LORA_TARGETS = r".*blocks\.\d+\.(self_attn\.(q|k|v|o)|ffn\.(0|2))"
# Modulation MLP (time_projection) and the per-block / head modulation tables: trained in full.
_MODULATION_RE = re.compile(r"(^|\.)time_projection\.\d+\.(weight|bias)$|(^|\.)modulation$")
_PEFT_PREFIX = "base_model.model."


def _peft():
    """The peft module, imported lazily (it pulls in transformers: a slow import)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("ScardNFT needs the 'peft' package (LoRA): pip install 'diffkt3d[transfer]'") from None
    return peft


def _lora_config(rank: int, alpha: float):
    return _peft().LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, bias="none",
                      target_modules=LORA_TARGETS)


def add_lora(model: nn.Module, rank: int = 64, alpha: float = 64.0, train_modulation: bool = True) -> nn.Module:
    """Wrap the DiT with peft LoRA on every self-attention and FFN Linear; freeze the base.

    Trainable afterwards: the LoRA A/B matrices (B zero-initialised, so the wrapped model starts
    identical to the base) and, with ``train_modulation``, ``time_projection`` and every
    ``modulation`` table. Everything else keeps ``requires_grad=False`` and is never touched, so
    base weights stay bit-identical.

    Note: ``model`` is modified in place (peft injects its layers) — pass a copy to keep the base.
    """
    peft_model = _peft().get_peft_model(model, _lora_config(rank, alpha))
    if train_modulation:
        for name, p in peft_model.named_parameters():
            if _MODULATION_RE.search(name):
                p.requires_grad_(True)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA rank %d on %s: %s trainable of %s parameters", rank, LORA_TARGETS, f"{n_train:,}", f"{n_all:,}")
    return peft_model


def strip_peft_prefix(name: str) -> str:
    """A parameter name without peft's wrapper prefix (the name in the plain model)."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def trainable_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors (LoRA + modulation) by name without peft's wrapper prefix, CPU copies."""
    return {strip_peft_prefix(n): p.detach().cpu().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """A plain Any2AnyDiT with W + (alpha/r)·B·A folded into every adapted Linear (copy; input kept)."""
    return copy.deepcopy(peft_model).merge_and_unload().eval()
