"""Two-stage PRDiT training (PRDiT paper, section 3.2 and A.9.2; docs/method.md).

Stage 1 ("local") trains the local MLP denoiser alone. Stage 2 ("global") freezes it and trains the
global residual DiT on the refined predictions. An optional stage ("highres") trains the
high-resolution refiner of :class:`~diffkt3d.models.prdit.multires.PRDiTHighRes` with the
low-resolution model frozen. Paper settings are the defaults: AdamW (0.9, 0.999), weight decay 0,
gradient clipping at 1.0, learning rate 1e-4 for stage 1 and 9e-5 / 6e-5 / 4e-5 for DiT depth
4 / 8 / 12 in stage 2 (6e-5 for the high-resolution refiner, A.8.1).

Data for CT imputation comes from case folders through ``diffkt3d.data.encoding`` (the same
encoding inference uses): the CT in [-1, 1] is the target, the conditions (default ptv, oar, body)
are stacked in the model's condition order. Cases without a CT are skipped (logged).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffkt3d.data.encoding import EncodingConfig, encode_modality
from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.models.prdit.checkpoint import save_checkpoint
from diffkt3d.models.prdit.config import CT_IMPUTATION_CONDITIONS, PRDiTConfig
from diffkt3d.models.prdit.model import PRDiT
from diffkt3d.models.prdit.multires import PRDiTHighRes

__all__ = [
    "StageSettings",
    "StageReport",
    "VolumeSet",
    "paper_stage2_lr",
    "train_stage",
    "train_two_stage",
    "load_ct_imputation_data",
    "config_for_ct_imputation",
    "train_ct_imputation",
]

log = logging.getLogger(__name__)

STAGES = ("local", "global", "highres")


def paper_stage2_lr(depth: int) -> float:
    """Stage-2 learning rate of A.9.2 for DiT depth 4 / 8 / 12 (nearest depth for others)."""
    table = {4: 9e-5, 8: 6e-5, 12: 4e-5}
    return table[min(table, key=lambda d: abs(d - depth))]


@dataclass
class StageSettings:
    """Optimisation settings of one stage.

    Args:
        steps: optimiser steps (upper bound when ``max_cpu_seconds`` is set).
        lr: AdamW learning rate (paper: 1e-4 stage 1, see :func:`paper_stage2_lr` for stage 2).
        batch_size: volumes per step.
        grad_clip: max gradient norm (paper 1.0).
        weight_decay: AdamW weight decay (paper 0).
        lf_weight: weight of the low-frequency consistency term (highres stage only).
        max_cpu_seconds: stop after this much process CPU time (all threads), None = no limit.
        max_wall_seconds: stop after this much wall time (a shared machine may give a low-priority
            job a fraction of a core), None = no limit.
        log_every: steps between progress lines.
    """

    steps: int
    lr: float = 1e-4
    batch_size: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    lf_weight: float = 1.0
    max_cpu_seconds: float | None = None
    max_wall_seconds: float | None = None
    log_every: int = 50


@dataclass
class StageReport:
    """What a stage did: steps, per-step losses, process CPU seconds and wall seconds."""

    stage: str
    steps: int
    losses: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def mean_loss(self, last: int = 50) -> float:
        tail = self.losses[-last:]
        return float(sum(tail) / max(1, len(tail)))

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "steps": self.steps, "cpu_seconds": round(self.cpu_seconds, 1),
                "wall_seconds": round(self.wall_seconds, 1), "first_loss": self.losses[0] if self.losses else None,
                "last50_mean_loss": self.mean_loss()}


class VolumeSet:
    """Training volumes in memory.

    Args:
        targets: (N, C, D, H, W) clean volumes in [-1, 1].
        conditions: (N, C_c, D, H, W) stacked conditions, or None (unconditional).
        case_ids: names for messages.
        skipped: case id -> reason for cases a loader left out (e.g. "no body mask"), so reports
            can say exactly which cases were used.
    """

    def __init__(self, targets: Tensor, conditions: Tensor | None = None, case_ids: list[str] | None = None,
                 skipped: Mapping[str, str] | None = None):
        if targets.ndim != 5:
            raise ValueError(f"targets must be (N, C, D, H, W), found shape {tuple(targets.shape)}")
        if conditions is not None and (conditions.shape[0] != targets.shape[0] or conditions.shape[2:] != targets.shape[2:]):
            raise ValueError(f"conditions {tuple(conditions.shape)} do not match targets {tuple(targets.shape)}")
        self.targets = targets.float()
        self.conditions = conditions.float() if conditions is not None else None
        self.case_ids = case_ids or [str(i) for i in range(targets.shape[0])]
        self.skipped: dict[str, str] = dict(skipped or {})

    def __len__(self) -> int:
        return self.targets.shape[0]

    def batch(self, index: Tensor | list[int]) -> tuple[Tensor, Tensor | None]:
        """(x0 (B, C, D, H, W), cond (B, C_c, D, H, W) or None) for the given rows."""
        index = torch.as_tensor(index, dtype=torch.long)
        cond = self.conditions[index] if self.conditions is not None else None
        return self.targets[index], cond

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """A random batch (with replacement)."""
        return self.batch(torch.randint(0, len(self), (batch_size,), generator=generator))


def _trainable(model: PRDiT | PRDiTHighRes, stage: str) -> list[torch.nn.Parameter]:
    """Freeze everything but the stage's module and return its parameters."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, found {stage!r}")
    if stage == "highres":
        if not isinstance(model, PRDiTHighRes):
            raise ValueError("the highres stage needs a PRDiTHighRes model")
        module = model.refiner
    else:
        if not isinstance(model, PRDiT):
            raise ValueError(f"the {stage} stage needs a PRDiT model")
        if stage == "global" and model.global_dit is None:
            raise ValueError("stage 'global' needs a model with global_depth >= 1")
        module = model.local if stage == "local" else model.global_dit
    model.requires_grad_(False)
    module.requires_grad_(True)
    return list(module.parameters())


def train_stage(model: PRDiT | PRDiTHighRes, data: VolumeSet, stage: str, settings: StageSettings,
                generator: torch.Generator | None = None) -> StageReport:
    """Train one stage in place.

    Args:
        model: PRDiT for "local" / "global", PRDiTHighRes for "highres".
        data: training volumes at the model's resolution (high resolution for "highres").
        stage: "local", "global" or "highres".
        settings: steps, learning rate, batch size, clipping, CPU budget.
        generator: seeds batches, timesteps and noise.

    Returns:
        StageReport with per-step losses and CPU / wall seconds.
    """
    params = _trainable(model, stage)
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
    model.train()
    report = StageReport(stage=stage, steps=0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(1, settings.steps + 1):
        x0, cond = data.sample(settings.batch_size, generator)
        if stage == "highres":
            loss = model.training_loss(x0, cond, lf_weight=settings.lf_weight, generator=generator)
        else:
            loss = model.training_loss(x0, cond, stage, generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        report.losses.append(float(loss.detach()))
        report.steps = step
        cpu = time.process_time() - cpu0
        if step % settings.log_every == 0 or step == settings.steps:
            wall = time.perf_counter() - wall0
            eta = wall / step * (settings.steps - step)
            log.info("prdit %s step %d/%d loss %.4f (mean50 %.4f) %.2f steps/s cpu %.0fs eta %.0fs", stage, step,
                     settings.steps, report.losses[-1], report.mean_loss(), step / max(wall, 1e-9), cpu, eta)
        if settings.max_cpu_seconds is not None and cpu >= settings.max_cpu_seconds:
            log.info("prdit %s: CPU budget %.0fs reached after %d steps", stage, settings.max_cpu_seconds, step)
            break
        if settings.max_wall_seconds is not None and time.perf_counter() - wall0 >= settings.max_wall_seconds:
            log.info("prdit %s: wall budget %.0fs reached after %d steps", stage, settings.max_wall_seconds, step)
            break
    report.cpu_seconds = time.process_time() - cpu0
    report.wall_seconds = time.perf_counter() - wall0
    model.eval()
    return report


def train_two_stage(model: PRDiT, data: VolumeSet, local: StageSettings, global_: StageSettings | None,
                    generator: torch.Generator | None = None) -> list[StageReport]:
    """Stage 1 (local denoiser), then stage 2 (global DiT, local frozen) when the model has one."""
    reports = [train_stage(model, data, "local", local, generator)]
    if model.global_dit is not None and global_ is not None and global_.steps > 0:
        reports.append(train_stage(model, data, "global", global_, generator))
    return reports


def load_ct_imputation_data(case_dirs: Iterable[str | Path], grid: tuple[int, int, int],
                            conditions: Mapping[str, int] = CT_IMPUTATION_CONDITIONS) -> VolumeSet:
    """Encode case folders into (CT target, stacked conditions) on the working ``grid``.

    Uses ``diffkt3d.data.encoding`` (CT window -> [-1, 1], ptv prescription map, OAR channels, body
    mask; area resampling). Cases without a CT (or without a body mask when ``body`` is a condition)
    are skipped with a log line and listed in the result's ``skipped`` (case id -> reason); an empty
    result is an error.

    Raises:
        CaseError: no usable case, or a condition whose channel count differs from ``conditions``.
    """
    enc = EncodingConfig(grid=tuple(grid))
    targets, conds, ids = [], [], []
    skipped: dict[str, str] = {}
    for case_dir in case_dirs:
        case = load_case_folder(case_dir, with_dose=False)
        if case.ct_hu is None or ("body" in conditions and case.body is None):
            skipped[case.case_id] = "no CT" if case.ct_hu is None else "no body mask"
            log.info("skipping %s: %s", case.case_id, skipped[case.case_id])
            continue
        parts = []
        for name, channels in conditions.items():
            v = encode_modality(case, name, enc)  # (C, D, H, W)
            if v.shape[0] != channels:
                raise CaseError(f"condition {name!r} has {v.shape[0]} channels, the model expects {channels}",
                                case=case.case_id)
            parts.append(v)
        targets.append(encode_modality(case, "ct", enc))
        conds.append(torch.cat(parts) if parts else None)
        ids.append(case.case_id)
    if not targets:
        raise CaseError("no case with a CT among the given folders")
    stacked = torch.stack(conds) if conds[0] is not None else None
    return VolumeSet(torch.stack(targets), stacked, ids, skipped)


def config_for_ct_imputation(preset_config: PRDiTConfig) -> PRDiTConfig:
    """The preset with the CT-imputation conditions (ptv, oar, body) and one output channel."""
    data = preset_config.to_dict()
    data.update(in_channels=1, conditions=dict(CT_IMPUTATION_CONDITIONS))
    return PRDiTConfig.from_dict(data)


def train_ct_imputation(train_dirs: Iterable[str | Path], out: str | Path, config: PRDiTConfig,
                        grid: tuple[int, int, int], local: StageSettings, global_: StageSettings | None,
                        seed: int = 0, meta: dict[str, Any] | None = None) -> Path:
    """Encode the training cases, run both stages and write a self-contained checkpoint.

    Args:
        train_dirs: case folders (never the test split).
        out: checkpoint path.
        config: architecture (its conditions are replaced by the CT-imputation ones).
        grid: working grid (D, H, W), multiples of the stride.
        local, global_: stage settings (``global_`` None or 0 steps skips stage 2).
        seed: seeds initialisation, batches, timesteps and noise.
        meta: extra metadata stored in the checkpoint (e.g. the command line).

    Returns:
        The checkpoint path; it stores the encoding so :class:`PRDiTImputer` can map cases.
    """
    data = load_ct_imputation_data(list(train_dirs), grid)
    torch.manual_seed(seed)
    model = PRDiT(config_for_ct_imputation(config))
    reports = train_two_stage(model, data, local, global_, torch.Generator().manual_seed(seed))
    info = {"cases": data.case_ids, "stages": [r.to_dict() for r in reports], "seed": seed, **(meta or {})}
    return save_checkpoint(model, out, encoding=EncodingConfig(grid=tuple(grid)).to_dict(), meta=info)
