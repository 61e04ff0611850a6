"""Model checkpoints: weights + architecture + preprocessing constants in one file.

Loading rebuilds everything from the file alone: the DiT config, the
encoding (working grid, OAR channel order, HU window, dose scale) and the flow shift. Files are
read with `torch.load(weights_only=True)`, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.errors import ConfigError
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.config import DiTConfig

log = logging.getLogger(__name__)

FORMAT = "diffkt3d-checkpoint/1"


@dataclass
class ModelBundle:
    """A ready model with everything needed to use it."""

    model: Any2AnyDiT
    encoding: EncodingConfig
    flow_shift: float
    meta: dict[str, Any] = field(default_factory=dict)
    version: str = ""


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    model_config: DiTConfig,
    encoding: EncodingConfig,
    flow_shift: float,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Atomically write a checkpoint.

    Args:
        dtype: store weights in this dtype (e.g. torch.float16 to halve a shipped model); loading
            always casts back to float32.
        train_state: optimizer, step, EMA ... for resuming (omit for a shipped model).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
    }
    blob = {
        "format": FORMAT,
        "model_config": model_config.to_dict(),
        "encoding": encoding.to_dict(),
        "flow_shift": float(flow_shift),
        "meta": meta or {},
        "state_dict": state,
    }
    if train_state is not None:
        blob["train_state"] = train_state
    tmp = path.with_name(path.name + ".part")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled code
        raise ConfigError(f"cannot read model checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a DiffKT3D checkpoint (expected format {FORMAT})")
    return blob


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild model + preprocessing from a checkpoint file (eval mode, float32)."""
    blob = read_checkpoint(path)
    cfg = DiTConfig.from_dict(blob["model_config"])
    model = Any2AnyDiT(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Non-persistent buffers (RoPE tables) are not in the state dict; anything else is a mismatch.
    if unexpected or missing:
        raise ConfigError(
            f"checkpoint {path} does not match its own config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.to(device).eval()
    meta = dict(blob.get("meta", {}))
    version = f"{meta.get('name', Path(path).stem)}@{file_digest(path)}"
    return ModelBundle(
        model=model,
        encoding=EncodingConfig.from_dict(blob["encoding"]),
        flow_shift=float(blob["flow_shift"]),
        meta=meta,
        version=version,
    )
