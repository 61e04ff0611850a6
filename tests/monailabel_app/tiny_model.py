"""Write a randomly initialised `tiny` checkpoint (tests only: no shipped weights are needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import save_checkpoint
from diffkt3d.models.config import get_config


def write_tiny_checkpoint(path: Path, grid: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    encoding = EncodingConfig(grid=(grid, grid, grid))
    config = get_config("tiny", in_channels=encoding.channels(), modalities=list(encoding.modalities))
    model = Any2AnyDiT(config).eval()
    return save_checkpoint(path, model, config, encoding, flow_shift=3.0, meta={"note": "random tiny, tests"})
