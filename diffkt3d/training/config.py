"""Training configuration: one dataclass tree, loaded from YAML, handed to every part of training.

A run's settings come from its recipe file (configs/*.yaml, read by diffkt3d.training.recipe, which
also applies command-line and request overrides); the defaults below only fill fields a recipe
leaves out. They follow the paper's supplement B.7 (Adam 0.9/0.999/1e-8 without weight decay, lr 1e-4
constant after 500 warm-up steps, grad clip 0.1, flow matching with v-prediction, 1000 timesteps,
shift 3.0); the step counts are ours (a CPU budget, not 100 epochs on 8 GPUs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffkt3d.data.encoding import PTV_RESAMPLING
from diffkt3d.errors import ConfigError, reject_unknown_fields
from diffkt3d.training.augment import Augmentation

LOSS_NORMS = ("l2", "l1")
LOSS_REGIONS = ("all", "body")


@dataclass
class StageConfig:
    """One supervised stage.

    Args:
        name: "any2any" (Stage A: random target + random condition subset) or "dose" (Stage B:
            dose-only fine-tune, all other modalities as conditions).
        steps: optimiser steps (the stage also stops at `max_minutes`, whichever comes first).
        max_minutes: wall-clock budget of the stage (None: no limit).
        max_cpu_minutes: process CPU-time budget (all threads; None: no limit). Unlike wall
            time it does not depend on what else the machine runs, so it is what we use to give
            the DiT and the regression peer the same compute.
        batch_size: cases per step.
        lr: peak learning rate (constant after warm-up, then the optional final decay).
        warmup_steps: linear warm-up from 0.
        decay_fraction: share of the stage's budget (CPU minutes, wall minutes or steps, whichever
            limit is nearest) over which the lr falls linearly to `final_lr_ratio` x lr at the end
            (warm-up/stable/decay schedule). 0 keeps the paper's constant lr. A short run that
            stops at a budget rather than converging gains most of its last-mile accuracy here.
        final_lr_ratio: lr multiplier reached at the end of the decay.
        target_weights: Stage A sampling weights of the target modality.
        p_condition: Stage A probability that each other present modality is a condition.
        loss_norm: "l2" = squared error (the paper's), "l1" = absolute error, in the run's
            `loss_space`. In x0 space an L1 loss makes the head estimate the conditional median
            rather than the mean; for the dose stage that is what the OpenKBP dose score (a mean
            absolute error) rewards, and it is the loss of the regression peer.
        loss_region: "all" = every voxel of the working grid (the paper's), "body" = only the
            working voxels that touch the body when the body is a condition (all voxels of a case
            whose body is absent or is the target). Every prediction is zeroed (dose, masks) or set
            to air (CT) outside the body, and the OpenKBP scores count only the possible-dose mask,
            so air voxels are never used; under an absolute error each of them still casts a
            full-size gradient vote for a residual that does not matter.
        dvh_loss_weight: weight of the DVH-aware moment loss (``training.dvh_loss``) added to the
            dose target's loss: per-structure generalised dose moments of the x0 estimate against
            the reference. 0 (default, the paper's) = off.
        augment_flip_lr: probability of a left-right mirror of the case (``training.augment``).
        augment_rotate_deg: rotation about the cranio-caudal axis, uniform in +-this many degrees.
        augment_shift_voxels: shift along each axis, uniform in +-this many working-grid voxels.
            The three augmentation fields default to 0 (none, the paper's).
    """

    name: str = "any2any"
    steps: int = 1000
    max_minutes: float | None = None
    max_cpu_minutes: float | None = None
    batch_size: int = 2
    lr: float = 1e-4
    warmup_steps: int = 500
    decay_fraction: float = 0.0
    final_lr_ratio: float = 0.1
    target_weights: dict[str, float] = field(default_factory=lambda: {
        "dose": 0.4, "ct": 0.2, "ptv": 0.12, "oar": 0.12, "body": 0.06, "beam": 0.05, "angle": 0.05})
    p_condition: float = 0.7
    loss_norm: str = "l2"
    loss_region: str = "all"
    dvh_loss_weight: float = 0.0
    augment_flip_lr: float = 0.0
    augment_rotate_deg: float = 0.0
    augment_shift_voxels: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("any2any", "dose"):
            raise ConfigError(f"unknown stage {self.name!r}; expected 'any2any' or 'dose'")
        if self.loss_norm not in LOSS_NORMS:
            raise ConfigError(f"stage {self.name}: loss_norm must be one of {LOSS_NORMS}, found {self.loss_norm!r}")
        if self.loss_region not in LOSS_REGIONS:
            raise ConfigError(f"stage {self.name}: loss_region must be one of {LOSS_REGIONS}, "
                              f"found {self.loss_region!r}")
        if self.dvh_loss_weight < 0:
            raise ConfigError(f"stage {self.name}: dvh_loss_weight must be >= 0, found {self.dvh_loss_weight}")
        if not 0.0 <= self.augment_flip_lr <= 1.0:
            raise ConfigError(f"stage {self.name}: augment_flip_lr is a probability in [0, 1], "
                              f"found {self.augment_flip_lr}")
        if not 0.0 <= self.augment_rotate_deg <= 180.0 or self.augment_shift_voxels < 0:
            raise ConfigError(f"stage {self.name}: augment_rotate_deg must be in [0, 180] and "
                              f"augment_shift_voxels >= 0, found {self.augment_rotate_deg}, "
                              f"{self.augment_shift_voxels}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"stage {self.name}: decay_fraction must be in [0, 1], found {self.decay_fraction}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ConfigError(f"stage {self.name}: final_lr_ratio must be in [0, 1], found {self.final_lr_ratio}")

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(self.augment_flip_lr, self.augment_rotate_deg, self.augment_shift_voxels)

    def progress(self, step: int, seconds: float, cpu_seconds: float) -> float:
        """How far through its budget the stage is (0..1), by whichever limit ends it first."""
        done = step / max(1, self.steps)
        if self.max_minutes is not None:
            done = max(done, seconds / (self.max_minutes * 60))
        if self.max_cpu_minutes is not None:
            done = max(done, cpu_seconds / (self.max_cpu_minutes * 60))
        return min(done, 1.0)

    def lr_at(self, step: int, seconds: float = 0.0, cpu_seconds: float = 0.0) -> float:
        """Learning rate for the next step: linear warm-up, constant, linear decay at the end."""
        lr = self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.decay_fraction > 0:
            start = 1.0 - self.decay_fraction
            into = (self.progress(step, seconds, cpu_seconds) - start) / self.decay_fraction
            if into > 0:
                lr *= 1.0 - (1.0 - self.final_lr_ratio) * min(into, 1.0)
        return lr


@dataclass
class TrainConfig:
    """Everything a training run needs; stored in each checkpoint.

    Args:
        model_preset: DiT preset name (diffkt3d.models.config.PRESETS).
        model_overrides: fields of the preset to replace.
        grid: working grid (D, H, W).
        ptv_resampling: how the prescription map reaches the grid ("max" or "area";
            diffkt3d.data.encoding explains why max-pooling is the default).
        with_plates: rasterise beam/angle plates for cases without them.
        train_roots: folders of case folders (or case folders) to train on.
        val_roots: folders used only for model selection.
        val_cases: how many validation cases to score at each evaluation.
        out_dir: checkpoints, logs.
        cache_dir: encoded-case cache.
        stages: Stage A then Stage B.
        flow_shift: timestep shift (Wan/SD3), 3.0 in the paper.
        grad_clip: global grad-norm clip (0.1 in the paper).
        ema_decay: EMA of the weights used for evaluation and shipping (0 disables).
        eval_every: steps between validation scores (1-step preview dose score on val cases).
        checkpoint_every: steps between resumable checkpoints.
        log_every: steps between progress lines.
        loss_space: "v" = mean (v_hat - v)^2 (the paper's v-prediction loss); "x0" = mean
            (x0_hat - x0)^2 with x0_hat = x_t - t v_hat, i.e. the v-loss weighted by t^2. With an
            x0-parameterised head the v-loss weights a sample by 1/t^2, so nearly all gradient goes
            to almost-clean inputs and the conditional structure at high noise (what the 1-step
            preview and the first sampling steps need) learns slowly; "x0" weights all t alike.
        seed: makes data order, noise and init reproducible.
        threads: torch CPU threads (None: torch default).
        init_from: checkpoint to fine-tune (None: a new model). Its architecture, encoding and flow
            shift are used, so `model_preset`, `model_overrides`, `grid` and `ptv_resampling` do
            not apply; the stages, losses and budgets are this config's. A clinic adapting its
            served model to its own cases starts here instead of from random weights.
        full_res_stages: full-resolution stages trained after the DiT, in order, each under the
            checkpoint the previous step wrote (``training.pipeline``): ``{"recipe": path of a
            full-res recipe, relative to this recipe's folder, "set": {field: value}}``. The last
            one's final.pt is the model the recipe makes (the DiT with every stage inside).
    """

    model_preset: str = "cpu-default"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    grid: tuple[int, int, int] = (64, 64, 64)
    ptv_resampling: str = "max"
    with_plates: bool = True
    train_roots: list[str] = field(default_factory=list)
    val_roots: list[str] = field(default_factory=list)
    val_cases: int = 8
    out_dir: str = "runs/train"
    cache_dir: str = "runs/cache"
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig("any2any"), StageConfig("dose")])
    flow_shift: float = 3.0
    grad_clip: float = 0.1
    loss_space: str = "v"
    ema_decay: float = 0.999
    eval_every: int = 250
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    init_from: str | None = None
    full_res_stages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, spec in enumerate(self.full_res_stages):
            if not isinstance(spec, dict) or not isinstance(spec.get("recipe"), str) or \
                    set(spec) - {"recipe", "set"} or not isinstance(spec.get("set", {}), dict):
                raise ConfigError(f"full_res_stages[{i}] must be {{recipe: <full-res recipe path>, set: {{field: "
                                  f"value}}}}, found {spec!r}")
        if self.loss_space not in ("v", "x0"):
            raise ConfigError(f"loss_space must be 'v' or 'x0', found {self.loss_space!r}")
        if self.ptv_resampling not in PTV_RESAMPLING:
            raise ConfigError(f"ptv_resampling must be one of {PTV_RESAMPLING}, found {self.ptv_resampling!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        reject_unknown_fields(d, cls, "training config")
        d = dict(d)
        if "stages" in d:
            stages = []
            for s in d["stages"]:
                reject_unknown_fields(s, StageConfig, "stage")
                stages.append(StageConfig(**s))
            d["stages"] = stages
        if "grid" in d:
            grid = d["grid"]
            d["grid"] = (int(grid),) * 3 if isinstance(grid, (int, str)) else tuple(int(v) for v in grid)
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """The recipe at `path` with top-level `overrides` (None values skipped); see recipe.load_recipe."""
        from diffkt3d.training.recipe import load_recipe

        return load_recipe(path, {k: v for k, v in overrides.items() if v is not None})
