"""Model checkpoints: weights + architecture + preprocessing constants in one file.

Loading rebuilds everything from the file alone: the DiT config, the encoding (working grid, OAR
channel order, HU window, dose scale) and the flow shift. Files are read with
`torch.load(weights_only=True)`, so a checkpoint cannot execute code.

Full-resolution cascade stages (``models.full_res``) live inside the base checkpoint, in a
``full_res`` section {target: {"config", "state_dict"}}: one served file is one model version, so
the registry and its promotion rules need nothing new. A checkpoint without the section loads as
before, with no stages.

Checkpoints written by earlier versions load through :func:`migrate_model_state` at load time (the
files themselves are never rewritten, so their digests, which name model versions, stay valid).
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

# State-dict key prefixes renamed since the format was introduced: old -> new.
RENAMED_PREFIXES: dict[str, str] = {
    "dose_refiner.": "target_heads.dose.refiner.",  # the refiner moved into the dose head module
}


@dataclass
class ModelBundle:
    """A ready model with everything needed to use it."""

    model: Any2AnyDiT
    encoding: EncodingConfig
    flow_shift: float
    meta: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    # target -> FullResStage (eval mode); empty for a checkpoint without a full-res section.
    full_res: dict[str, torch.nn.Module] = field(default_factory=dict)


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


def migrate_model_state(config: dict[str, Any], state: dict[str, Any]) -> tuple[DiTConfig, dict[str, Any]]:
    """Config and state dict of any earlier checkpoint, in today's layout.

    Two changes so far: the dose head's config was eight flat ``dose_*`` fields of the DiT config
    (lifted into ``dose_head`` by ``DiTConfig.from_dict``), and the refiner's weights were stored
    under ``dose_refiner.*`` (renamed by :data:`RENAMED_PREFIXES`). Current checkpoints pass
    through unchanged.
    """
    cfg = DiTConfig.from_dict(config)
    migrated = {}
    for key, value in state.items():
        for old, new in RENAMED_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        migrated[key] = value
    return cfg, migrated


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (format checked, not migrated: see :func:`load_checkpoint`)."""
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


def update_meta(path: str | Path, updates: dict[str, Any]) -> Path:
    """Rewrite the checkpoint at ``path`` with ``meta`` updated by ``updates``; tensors untouched.

    For records made after training (the quality gate's benchmark figures). The file is replaced
    atomically, so a server reading it sees the old or the new file, never half of one. Its
    digest, and so its model version string, changes.
    """
    path = Path(path)
    blob = read_checkpoint(path)
    blob["meta"] = {**dict(blob.get("meta") or {}), **updates}
    tmp = path.with_name(path.name + ".part")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def write_full_res_stages(base_path: str | Path, out_path: str | Path, stages: dict[str, tuple[Any, dict]],
                          meta_updates: dict[str, Any] | None = None,
                          train_state: dict[str, Any] | None = None) -> Path:
    """Write ``out_path``: the checkpoint at ``base_path`` with full-resolution stages added.

    Args:
        stages: target -> (FullResConfig, state dict); replaces a stage of the same target the
            base may already hold, keeps the others.
        meta_updates: merged into the base's meta (e.g. the stage's training record).
        train_state: resumption state of the stage's trainer (omit for a model to serve).

    The base's own tensors, config and encoding are copied unchanged; ``base_path`` may equal
    ``out_path`` (atomic replace). The digest, and so the model version, changes, and the
    quality-gate record of each staged target is dropped (it measured the output without the stage).
    """
    blob = read_checkpoint(base_path)
    blob.pop("train_state", None)  # the base's resumption state is not this file's
    section = dict(blob.get("full_res") or {})
    for target, (config, state) in stages.items():
        section[target] = {"config": config.to_dict(),
                           "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()}}
    blob["full_res"] = section
    meta = {**dict(blob.get("meta") or {}), **(meta_updates or {})}
    # A quality-gate record (inference.quality) measured the output without this stage: it no longer
    # describes what the file serves, so the target is experimental again until benchmarked.
    quality = {t: q for t, q in dict(meta.get("quality") or {}).items() if t not in stages}
    if "quality" in meta:
        meta["quality"] = quality
    blob["meta"] = meta
    if train_state is not None:
        blob["train_state"] = train_state
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    torch.save(blob, tmp)
    tmp.replace(out_path)
    return out_path


def carry_full_res_stages(source_path: str | Path, out_path: str | Path) -> Path:
    """Give ``out_path``, a checkpoint whose DiT was derived from ``source_path`` (a fine-tune, a
    ScardNFT merge), the full-resolution stages of ``source_path`` and their training records.

    Why: the served model is the DiT with its stages; a training run that rewrites the DiT alone
    would otherwise drop them (OAR auto-contouring, the full-res dose), and a model validated and
    promoted on its dose would silently stop contouring. A stage that reads no coarse prediction
    serves exactly as before, so its quality-gate record is kept; every other record measured
    outputs of the old DiT and is dropped (the target is experimental until benchmarked again).
    Stages ``out_path`` already has are kept. Returns ``out_path`` (unchanged when the source has none).
    """
    source = read_checkpoint(source_path)
    carried = dict(source.get("full_res") or {})
    if not carried:
        return Path(out_path)
    blob = read_checkpoint(out_path)
    own = dict(blob.get("full_res") or {})
    blob["full_res"] = {**carried, **own}
    src_meta, meta = dict(source.get("meta") or {}), dict(blob.get("meta") or {})
    records = {t: r for t, r in dict(src_meta.get("full_res") or {}).items() if t in carried and t not in own}
    meta["full_res"] = {**records, **dict(meta.get("full_res") or {})}
    unchanged = {t for t, entry in carried.items() if t not in own and not entry["config"].get("coarse_input", True)}
    meta["quality"] = {t: q for t, q in dict(src_meta.get("quality") or {}).items() if t in unchanged}
    blob["meta"] = meta
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    torch.save(blob, tmp)
    tmp.replace(out_path)
    return out_path


def load_full_res_stages(blob: dict[str, Any], encoding: EncodingConfig, path: str | Path,
                         device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """The full-res stages of a raw checkpoint dict, built and loaded (eval mode); {} without any."""
    from diffkt3d.models.full_res import FullResConfig, FullResStage

    stages: dict[str, torch.nn.Module] = {}
    for target, entry in (blob.get("full_res") or {}).items():
        if not isinstance(entry, dict) or "config" not in entry or "state_dict" not in entry:
            raise ConfigError(f"checkpoint {path}: full-res stage {target!r} needs 'config' and 'state_dict', "
                              f"found {sorted(entry) if isinstance(entry, dict) else type(entry).__name__}")
        config = FullResConfig.from_dict(dict(entry["config"]))
        if config.target != target:
            raise ConfigError(f"checkpoint {path}: full-res stage stored under {target!r} is for target "
                              f"{config.target!r}")
        stage = FullResStage(config, encoding)
        state = {k: v.float() if v.is_floating_point() else v for k, v in entry["state_dict"].items()}
        missing, unexpected = stage.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"checkpoint {path}: full-res {target} stage does not match its config: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
        stages[target] = stage.to(device).eval()
    return stages


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild model + preprocessing from a checkpoint file (eval mode, float32)."""
    blob = read_checkpoint(path)
    cfg, state = migrate_model_state(blob["model_config"], blob["state_dict"])
    model = Any2AnyDiT(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
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
    encoding = EncodingConfig.from_dict(blob["encoding"])
    return ModelBundle(
        model=model,
        encoding=encoding,
        flow_shift=float(blob["flow_shift"]),
        meta=meta,
        version=version,
        full_res=load_full_res_stages(blob, encoding, path, device),
    )
