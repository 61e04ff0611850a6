"""Settings of a full-resolution stage's training run (``training.full_res_trainer``).

One dataclass, read from a YAML recipe by ``training.recipe.load_full_res_recipe`` (the same
override and data-root rules as the supervised recipe), stored in the output checkpoint's meta.
The stage's own architecture is the nested ``stage`` (``models.full_res.FullResConfig``); a peer
is the same recipe with ``stage.coarse_input: false``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from diffkt3d.errors import ConfigError, reject_unknown_fields
from diffkt3d.models.full_res import FullResConfig


@dataclass
class FullResTrainConfig:
    """A full-res stage's training run.

    Args:
        base_model: the frozen base checkpoint (its DiT makes the coarse predictions; the output
            model is this file plus the stage).
        stage: the stage's architecture and inputs (``FullResConfig``; empty conditions = the
            base model's modalities minus the target).
        train_roots: folders of case folders (or case folders); relative ones are under the data root.
        max_cases: use only the first N training cases (None: all).
        out_dir: last.pt (resumable), final.pt (the model to serve), progress.json.
        cache_dir: per-case cache of the full-res inputs and the coarse predictions.
        coarse_steps: Euler steps of the base model's coarse prediction (the Predictor's path).
        coarse_seed: its seed: one fixed candidate per case, as a single prediction at inference.
        steps: optimiser steps at most (the CPU budget usually ends the run first).
        max_cpu_minutes: process CPU-time budget including the coarse precompute, so that a peer
            without coarse input gets the same compute in total (None: no limit).
        batch_size: crops per step.
        lr: AdamW peak learning rate, reached after ``warmup_steps``.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up from 0.
        decay_fraction: final share of the budget (CPU minutes, or steps, whichever is nearer)
            over which the lr falls linearly to ``final_lr_ratio`` x lr.
        final_lr_ratio: lr multiplier at the end.
        foreground_ratio: masks: share of crops centred on a structure (the structure drawn
            uniformly among those the case has, so small OARs are seen as often as big ones);
            the rest are centred anywhere in the body. Dose and CT crops are centred in the body.
        dvh_loss_weight: dose: weight of the DVH moment loss (``training.dvh_loss``) on the crop,
            over the OAR channels and PTV levels among the conditions (0 = off).
        flip_lr: probability of a left-right mirror of a crop (Left/Right OAR channels swapped).
        grad_clip: global grad-norm clip (0 = none).
        checkpoint_every: steps between writes of last.pt.
        log_every: steps between progress records.
        seed: seed of the crops, the augmentation and the stage's initialisation.
        threads: torch CPU threads (None: torch's default).
    """

    base_model: str = ""
    stage: FullResConfig = field(default_factory=FullResConfig)
    train_roots: list[str] = field(default_factory=lambda: ["openkbp/train"])
    max_cases: int | None = None
    out_dir: str = "runs/full-res"
    cache_dir: str = "runs/cache/full-res"
    coarse_steps: int = 10
    coarse_seed: int = 0
    steps: int = 100_000
    max_cpu_minutes: float | None = None
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    final_lr_ratio: float = 0.05
    foreground_ratio: float = 0.67
    dvh_loss_weight: float = 0.0
    flip_lr: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 25
    log_every: int = 10
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stage, dict):
            self.stage = FullResConfig.from_dict(self.stage)
        if isinstance(self.train_roots, str):
            self.train_roots = [self.train_roots]
        problems = []
        for name in ("coarse_steps", "steps", "batch_size", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, found {getattr(self, name)}")
        for name in ("foreground_ratio", "flip_lr", "decay_fraction", "final_lr_ratio"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                problems.append(f"{name} must be in [0, 1], found {getattr(self, name)}")
        for name in ("lr", "weight_decay", "dvh_loss_weight", "grad_clip", "warmup_steps"):
            if float(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0, found {getattr(self, name)}")
        if self.max_cpu_minutes is not None and self.max_cpu_minutes <= 0:
            problems.append(f"max_cpu_minutes must be > 0 or null, found {self.max_cpu_minutes}")
        if self.max_cases is not None and self.max_cases < 1:
            problems.append(f"max_cases must be >= 1 or null, found {self.max_cases}")
        if self.dvh_loss_weight > 0 and self.stage.target != "dose":
            problems.append(f"dvh_loss_weight applies to a dose stage, not {self.stage.target!r}")
        if problems:
            raise ConfigError("full-res training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stage"] = self.stage.to_dict()
        out["train_roots"] = [str(r) for r in self.train_roots]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FullResTrainConfig:
        reject_unknown_fields(data, cls, "full-res training config")
        if not data.get("base_model"):  # checked here, not in __post_init__: a default config must exist
            raise ConfigError("full-res training config: base_model is empty; name the base checkpoint the "
                              "stage refines (e.g. --set base_model=diffkt3d/weights/cpu-default.pt)")
        return cls(**data)


__all__ = ["FullResTrainConfig"]
