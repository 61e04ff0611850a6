"""ScardNFT adapter files: the trained LoRA + modulation tensors alone, tied to their base model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffkt3d.errors import ConfigError
from diffkt3d.models.checkpoint import ModelBundle, file_digest, load_checkpoint
from diffkt3d.training.scardnft.config import ScardNFTConfig
from diffkt3d.training.scardnft.lora import LORA_TARGETS, add_lora, strip_peft_prefix, trainable_state

__all__ = ["ADAPTER_FORMAT", "save_adapter", "load_adapter"]

ADAPTER_FORMAT = "diffkt3d-scardnft-adapter/1"


def save_adapter(path: str | Path, peft_model: nn.Module, cfg: ScardNFTConfig, base_model_path: str | Path,
                 meta: dict | None = None) -> Path:
    """Write the adapter alone (LoRA + modulation tensors, ~a few MB) with what is needed to re-apply it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": ADAPTER_FORMAT,
        "lora": {"rank": int(cfg.lora_rank), "alpha": float(cfg.lora_alpha), "targets": LORA_TARGETS,
                 "train_modulation": bool(cfg.train_modulation)},
        "base_model": {"path": str(base_model_path), "digest": file_digest(base_model_path)},
        "meta": meta or {},
        "state_dict": trainable_state(peft_model),
    }
    tmp = path.with_name(path.name + ".part")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def load_adapter(adapter_path: str | Path, base_model: str | Path | None = None,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, ModelBundle]:
    """Rebuild base + adapter: (peft-wrapped model, base bundle).

    Args:
        base_model: the base checkpoint (default: the path stored in the adapter). A base whose
            digest differs from the one the adapter was trained on is refused.

    Raises:
        ConfigError: not an adapter file, wrong base, or tensors that do not match.
    """
    adapter_path = Path(adapter_path)
    try:
        blob = torch.load(adapter_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read ScardNFT adapter {adapter_path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise ConfigError(f"{adapter_path} is not a ScardNFT adapter (expected format {ADAPTER_FORMAT})")
    base_path = Path(base_model) if base_model is not None else Path(blob["base_model"]["path"])
    digest = file_digest(base_path) if base_path.is_file() else None
    if digest != blob["base_model"]["digest"]:
        raise ConfigError(f"adapter {adapter_path} was trained on base digest {blob['base_model']['digest']}, "
                          f"but {base_path} has digest {digest}")
    bundle = load_checkpoint(base_path, device=device)
    lora = blob["lora"]
    model = add_lora(bundle.model, lora["rank"], lora["alpha"], lora["train_modulation"])
    params = {strip_peft_prefix(n): p for n, p in model.named_parameters() if p.requires_grad}
    state = blob["state_dict"]
    if set(params) != set(state):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ConfigError(f"adapter {adapter_path} does not fit the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))
    return model.eval(), bundle
