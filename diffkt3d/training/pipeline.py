"""One recipe, one shipped model: the DiT (Stage A + B), then the full-res stages the recipe lists.

Why: the model a user gets is the DiT with its full-resolution stages inside one checkpoint
(docs/full-res.md). Training them by hand, one command per stage with the right base checkpoint
each time, is how a reproduction goes wrong; ``full_res_stages`` in the supervised recipe names
them, and this runs them in order, each under the checkpoint the step before wrote. Every step is
resumable on its own (its ``last.pt``), so an interrupted pipeline goes on where it stopped: a
finished DiT or stage resumes at its end and returns its final checkpoint at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from diffkt3d.training.config import TrainConfig
from diffkt3d.training.full_res_config import FullResTrainConfig

log = logging.getLogger(__name__)


def stage_config(cfg: TrainConfig, index: int, base_model: Path, data_root: str | Path | None = None,
                 max_steps: int | None = None, max_cases: int | None = None) -> FullResTrainConfig:
    """The ``index``-th full-res stage of ``cfg``: its recipe and ``set``, under ``base_model``, in
    ``<cfg.out_dir>/full-res-<index>``; the smoke limits cap its steps and cases as they cap the DiT's."""
    from diffkt3d.training.recipe import load_full_res_recipe

    spec = cfg.full_res_stages[index]
    overrides = {**spec.get("set", {}), "base_model": str(base_model),
                 "out_dir": str(Path(cfg.out_dir) / f"full-res-{index}")}
    stage = load_full_res_recipe(spec["recipe"], overrides, data_root=data_root)
    if max_steps is not None:
        stage = dataclasses.replace(stage, steps=min(stage.steps, max_steps))
    if max_cases is not None:
        stage = dataclasses.replace(stage, max_cases=min(stage.max_cases or max_cases, max_cases))
    return stage


def run_pipeline(cfg: TrainConfig, *, data_root: str | Path | None = None, device: str | None = None,
                 resume: bool = True, max_steps: int | None = None, max_cases: int | None = None,
                 train_dit: Callable[[], Path] | None = None) -> Path:
    """Train the DiT of ``cfg`` then each of its full-res stages; returns the last final checkpoint.

    The first stage is trained under the DiT's ``best.pt`` (the Stage B checkpoint selected on the
    validation cases, the one that ships) when the run wrote one, else under its ``final.pt``.

    Args:
        train_dit: trains the DiT and returns its final.pt (default: ``run_training`` in this
            process; the CLI passes a torchrun launch for ``--nproc``).
    """
    from diffkt3d.training.full_res_trainer import run_full_res_training
    from diffkt3d.training.trainer import run_training

    final = train_dit() if train_dit is not None else run_training(cfg, device=device, resume=resume)
    best = final.parent / "best.pt"  # the DiT selected on the validation cases is the one that ships
    final = best if best.exists() else final
    for index in range(len(cfg.full_res_stages)):
        stage = stage_config(cfg, index, final, data_root, max_steps, max_cases)
        log.info("pipeline: full-res %s stage %d of %d (%s) under %s", stage.stage.target, index + 1,
                 len(cfg.full_res_stages), cfg.full_res_stages[index]["recipe"], final)
        final = run_full_res_training(stage, device=device, resume=resume)
    return final


__all__ = ["run_pipeline", "stage_config"]
