"""Write randomly initialised `tiny` checkpoints (tests only: no shipped weights are needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import save_checkpoint
from diffkt3d.models.config import get_config
from diffkt3d.models.prdit import PRDiT
from diffkt3d.models.prdit import get_config as get_prdit_config
from diffkt3d.models.prdit import save_checkpoint as save_prdit_checkpoint
from diffkt3d.training.prdit_trainer import config_for_ct_imputation


def write_tiny_checkpoint(path: Path, grid: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    encoding = EncodingConfig(grid=(grid, grid, grid))
    config = get_config("tiny", in_channels=encoding.channels(), modalities=list(encoding.modalities))
    model = Any2AnyDiT(config).eval()
    return save_checkpoint(path, model, config, encoding, flow_shift=3.0, meta={"note": "random tiny, tests"})


def write_tiny_prdit_checkpoint(path: Path, grid: int = 16, seed: int = 0) -> Path:
    """A `tiny` PRDiT CT-imputation checkpoint (ptv, oar, body conditions) on a `grid`^3 working grid.

    The zero-initialised heads and gates get small random weights, so the output depends on the
    conditions (an untrained PRDiT predicts x0 = eps = 0 and its samples ignore the conditions).
    """
    torch.manual_seed(seed)
    model = PRDiT(config_for_ct_imputation(get_prdit_config("tiny"))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return save_prdit_checkpoint(model, path, encoding=EncodingConfig(grid=(grid,) * 3).to_dict(),
                                 meta={"note": "random tiny PRDiT, tests"})
