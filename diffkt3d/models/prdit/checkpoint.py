"""PRDiT checkpoints that rebuild the model from the file alone.

A checkpoint is a ``torch.save`` dict of plain types and tensors (loadable with
``weights_only=True``): format tag and version, kind ("prdit" or "prdit-highres"), the
architecture config(s) as dicts, the state dict(s), the preprocessing constants (CT window and,
when the model was trained through ``diffkt3d.data.encoding``, that encoding config) and free-form
metadata (training command, CPU minutes, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from diffkt3d.constants import CT_WINDOW_HU
from diffkt3d.errors import ConfigError
from diffkt3d.models.prdit.config import PRDiTConfig
from diffkt3d.models.prdit.model import PRDiT
from diffkt3d.models.prdit.multires import PRDiTHighRes

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "FORMAT", "VERSION"]

log = logging.getLogger(__name__)

FORMAT = "diffkt3d-prdit"
VERSION = 1


def save_checkpoint(model: PRDiT | PRDiTHighRes, path: str | Path, *, encoding: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with everything needed to rebuild it.

    Args:
        model: a PRDiT or a low -> high resolution PRDiT.
        path: output file (parent folders are created).
        encoding: ``EncodingConfig.to_dict()`` of the data the model was trained on, if any.
        meta: JSON-like extras (training commands, timings, validation figures).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "preprocessing": {"ct_window_hu": list(CT_WINDOW_HU), "encoding": encoding},
        "meta": dict(meta or {}),
    }
    if isinstance(model, PRDiTHighRes):
        blob.update(kind="prdit-highres", scale=model.scale,
                    low={"config": model.low.config.to_dict(), "state_dict": model.low.state_dict()},
                    refiner={"config": model.refiner.config.to_dict(), "state_dict": model.refiner.state_dict()})
    elif isinstance(model, PRDiT):
        blob.update(kind="prdit", config=model.config.to_dict(), state_dict=model.state_dict())
    else:
        raise TypeError(f"expected PRDiT or PRDiTHighRes, found {type(model).__name__}")
    tmp = path.with_suffix(path.suffix + ".part")
    torch.save(blob, tmp)
    tmp.replace(path)
    log.info("saved %s checkpoint to %s", blob["kind"], path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked for format and version.

    Raises:
        ConfigError: missing file, not a PRDiT checkpoint, or a newer version (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"PRDiT checkpoint {path}: file does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / foreign pickle: one clear line, not a traceback
        raise ConfigError(f"PRDiT checkpoint {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"PRDiT checkpoint {path}: not a {FORMAT} file (format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__})")
    if int(blob.get("version", 0)) > VERSION:
        raise ConfigError(f"PRDiT checkpoint {path}: version {blob['version']} is newer than supported {VERSION}")
    return blob


def load_checkpoint(path: str | Path) -> PRDiT | PRDiTHighRes:
    """Rebuild the model of a checkpoint (eval mode, CPU). Metadata: :func:`read_checkpoint`."""
    blob = read_checkpoint(path)
    if blob["kind"] == "prdit":
        model = PRDiT(PRDiTConfig.from_dict(blob["config"]))
        model.load_state_dict(blob["state_dict"])
    elif blob["kind"] == "prdit-highres":
        low = PRDiT(PRDiTConfig.from_dict(blob["low"]["config"]))
        low.load_state_dict(blob["low"]["state_dict"])
        model = PRDiTHighRes(low, PRDiTConfig.from_dict(blob["refiner"]["config"]), scale=int(blob["scale"]))
        model.refiner.load_state_dict(blob["refiner"]["state_dict"])
    else:
        raise ConfigError(f"PRDiT checkpoint {path}: unknown kind {blob['kind']!r}")
    return model.eval()
