"""Supervised training of the Any2Any DiT: Stage A (Any2Any) then Stage B (dose fine-tune).

One step (flow matching, v-prediction, x_t = (1 - t) x0 + t eps, v = eps - x0):
  1. pick a target modality and the condition set (Stage A: random; Stage B: dose | everything);
  2. noise only the target; conditions enter clean (never noised);
  3. v_hat = model(volumes, target, t); loss = mean (v_hat - v)^2 over the target's voxels.

Runs on CPU, one GPU (bf16 autocast + TF32) or several (torchrun: see diffkt3d.training.distributed).
Resumable: `last.pt` holds weights, EMA, optimiser, stage and step; the run picks up where it
stopped. The EMA weights are what evaluation and shipping use.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffkt3d.data.encoding import EncodingConfig
from diffkt3d.flow.matching import FlowConfig, add_noise, predict_x0, sample_timesteps, velocity_target
from diffkt3d.machine import describe_machine
from diffkt3d.models.any2any_dit import Any2AnyDiT
from diffkt3d.models.checkpoint import (
    carry_full_res_stages,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from diffkt3d.models.config import DiTConfig, get_config
from diffkt3d.training.augment import augment_case
from diffkt3d.training.config import StageConfig, TrainConfig
from diffkt3d.training.dataset import (
    EncodedCase,
    EncodedCaseSet,
    build_cache,
    list_case_dirs,
    modality_counts,
)
from diffkt3d.training.dvh_loss import moment_loss

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]


@dataclass
class Batch:
    target: str
    conditions: list[str]
    volumes: dict[str, torch.Tensor]  # clean volumes (B, C, D, H, W), target included


def build_model_config(cfg: TrainConfig, encoding: EncodingConfig) -> DiTConfig:
    """Preset + overrides, with per-modality channels taken from the encoding (one source of truth)."""
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("in_channels", encoding.channels())
    overrides.setdefault("modalities", list(encoding.modalities))
    return get_config(cfg.model_preset, **overrides)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA (paper: bf16 training); full fp32 on CPU, where bf16 matmuls are slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def select_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    """Owns model, EMA, optimiser, data and the loop. Create, then `run()`."""

    def __init__(self, cfg: TrainConfig, *, device: str | None = None, progress: ProgressFn | None = None):
        self.cfg = cfg
        self.device = select_device(device)
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        base = load_checkpoint(cfg.init_from) if cfg.init_from else None
        if base is not None:  # fine-tuning: the checkpoint decides architecture and preprocessing
            self.encoding, self.model_config = base.encoding, base.model.config
            self.flow = FlowConfig(shift=base.flow_shift)
            log.info("fine-tuning %s (its architecture, grid %s and encoding; the recipe's model fields unused)",
                     base.version, list(base.encoding.grid))
        else:
            self.encoding = EncodingConfig(grid=tuple(cfg.grid), ptv_resampling=cfg.ptv_resampling)
            self.model_config = build_model_config(cfg, self.encoding)
            self.flow = FlowConfig(shift=cfg.flow_shift)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.model = Any2AnyDiT(self.model_config).to(self.device)
        if base is not None:
            self.model.load_state_dict(base.model.state_dict())
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.stages[0].lr, betas=(0.9, 0.999),
                                          eps=1e-8, weight_decay=0.0)
        self.stage_index = 0
        self.stage_step = 0
        self.global_step = 0
        self.stage_seconds = 0.0
        self.stage_cpu_seconds = 0.0
        self.best_val: float | None = None
        self.history: list[dict] = []
        # One record per invocation of run(): a budgeted recipe may be trained in several pieces
        # (sessions, machines); the checkpoint says where each piece ran and what it cost.
        self.pieces: list[dict] = []
        self.train_set: EncodedCaseSet | None = None
        self.val_set: EncodedCaseSet | None = None

    # -- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        cfg = self.cfg
        train_dirs = list_case_dirs(cfg.train_roots)
        log.info("encoding %d training cases to %s (cached after the first run)", len(train_dirs),
                 self.encoding.grid)
        self.train_set = EncodedCaseSet.from_cache(build_cache(train_dirs, self.encoding, cfg.cache_dir,
                                                               cfg.with_plates))
        log.info("training cases per modality: %s", modality_counts(self.train_set))
        if cfg.val_roots and cfg.val_cases > 0:
            val_dirs = list_case_dirs(cfg.val_roots)
            files = build_cache(val_dirs, self.encoding, cfg.cache_dir, cfg.with_plates)
            val = EncodedCaseSet.from_cache(files)
            keep = [c for c in val.cases if "dose" in c.tensors][: cfg.val_cases]
            self.val_set = EncodedCaseSet(keep) if keep else None

    # -- one step --------------------------------------------------------------------------
    def next_batch(self, stage: StageConfig) -> Batch:
        assert self.train_set is not None
        if stage.name == "any2any":
            target, conditions, cases = self.train_set.sample_any2any(
                self.rng, stage.batch_size, stage.target_weights, stage.p_condition)
        else:
            target = "dose"
            conditions, cases = self.train_set.sample_target(self.rng, stage.batch_size, target)
        modalities = [target, *conditions]
        aug = stage.augmentation
        if aug.active:
            cases = [EncodedCase(c.case_id, augment_case({m: c.tensors[m] for m in modalities}, aug, self.rng,
                                                         self.encoding.oar_channels)) for c in cases]
        volumes = self.train_set.batch(cases, modalities)
        return Batch(target, conditions, {k: v.to(self.device) for k, v in volumes.items()})

    def loss(self, model: torch.nn.Module, batch: Batch, norm: str = "l2", region: str = "all",
             dvh_weight: float = 0.0) -> torch.Tensor:
        """Flow-matching loss of one batch in the run's `loss_space`; `norm`, `region` and
        `dvh_weight` are the stage's loss_norm, loss_region and dvh_loss_weight."""
        x0 = batch.volumes[batch.target]
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        t = sample_timesteps(x0.shape[0], self.flow, generator=self.generator).to(self.device)
        inputs = dict(batch.volumes)
        inputs[batch.target] = add_noise(x0, noise, t)  # only the target is noised
        with autocast_context(self.device):
            v_hat = model(inputs, batch.target, t)
        x0_hat = predict_x0(inputs[batch.target], v_hat.float(), t)
        if self.cfg.loss_space == "x0":
            error = x0_hat - x0
        else:
            error = v_hat.float() - velocity_target(x0, noise)
        per_voxel = error.abs() if norm == "l1" else error**2
        if region == "body" and "body" in batch.conditions:
            loss = body_mean(per_voxel, batch.volumes["body"])
        else:
            loss = torch.mean(per_voxel)
        if dvh_weight > 0 and batch.target == "dose":
            conditions = {m: batch.volumes[m] for m in batch.conditions}
            loss = loss + dvh_weight * moment_loss(x0_hat, x0, conditions, self.encoding.dose_scale_gy)
        return loss

    def set_lr(self, stage: StageConfig) -> float:
        lr = stage.lr_at(self.stage_step, self.stage_seconds, self.stage_cpu_seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    @torch.no_grad()
    def update_ema(self) -> None:
        d = self.cfg.ema_decay
        # Early in training a plain 0.999 EMA lags the weights for thousands of steps; the usual
        # warm-up (1 + n) / (10 + n) keeps the shipped EMA useful on short CPU runs.
        d = min(d, (1 + self.global_step) / (10 + self.global_step))
        for p_ema, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - d)

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> float | None:
        """Mean |dose error| (Gy) inside the body on the working grid, 1-step preview, EMA weights.

        A cheap proxy of the OpenKBP dose score used only to pick the best checkpoint.
        """
        if self.val_set is None:
            return None
        return one_step_dose_mae(self.ema, self.val_set, self.encoding.dose_scale_gy, self.device)

    # -- checkpoints -----------------------------------------------------------------------
    def meta(self) -> dict:
        return {"name": Path(self.cfg.out_dir).name, "global_step": self.global_step,
                "pieces": list(self.pieces),
                "total_cpu_minutes": round(sum(p["cpu_minutes"] for p in self.pieces), 2),
                "stage": self.cfg.stages[self.stage_index].name if self.stage_index < len(self.cfg.stages) else "done",
                "best_val_dose_mae_gy": self.best_val, "train_config": self.cfg.to_dict()}

    def save(self, name: str, with_state: bool) -> Path:
        state = None
        if with_state:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "stage_index": self.stage_index, "stage_step": self.stage_step,
                     "global_step": self.global_step, "stage_seconds": self.stage_seconds,
                     "stage_cpu_seconds": self.stage_cpu_seconds,
                     "best_val": self.best_val, "rng": json.dumps(self.rng.getstate()),
                     "generator": self.generator.get_state(), "history": json.dumps(self.history),
                     "pieces": json.dumps(self.pieces)}
        path = save_checkpoint(self.out_dir / name, self.ema, self.model_config, self.encoding,
                               self.flow.shift, meta=self.meta(), train_state=state)
        if self.cfg.init_from and not with_state:
            carry_full_res_stages(self.cfg.init_from, path)  # a fine-tune keeps the model's full-res stages
        return path

    def try_resume(self) -> bool:
        path = self.out_dir / "last.pt"
        if not path.exists():
            return False
        blob = read_checkpoint(path)
        st = blob.get("train_state")
        if st is None:
            return False
        if blob["model_config"] != self.model_config.to_dict():
            raise ValueError(f"{path} was trained with a different model config; use a new out_dir")
        self.ema.load_state_dict(blob["state_dict"])
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.stage_index, self.stage_step = st["stage_index"], st["stage_step"]
        self.global_step, self.stage_seconds = st["global_step"], st["stage_seconds"]
        self.stage_cpu_seconds = st.get("stage_cpu_seconds", 0.0)
        self.best_val = st["best_val"]
        state = json.loads(st["rng"])
        self.rng.setstate((state[0], tuple(state[1]), state[2]))
        self.generator.set_state(st["generator"])
        self.history = json.loads(st["history"])
        self.pieces = json.loads(st.get("pieces", "[]"))  # runs from before pieces were recorded: none
        log.info("resumed from %s at stage %d step %d (global %d)", path, self.stage_index,
                 self.stage_step, self.global_step)
        return True

    # -- loop ------------------------------------------------------------------------------
    def _emit(self, record: dict) -> None:
        self.history.append(record)
        (self.out_dir / "progress.json").write_text(json.dumps(record))
        if self.progress is not None:
            self.progress(record)

    def run(self, resume: bool = True) -> Path:
        if self.train_set is None:
            self.load_data()
        if resume:
            self.try_resume()
        self.pieces.append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": describe_machine(), "from_step": self.global_step,
                            "to_step": self.global_step, "cpu_minutes": 0.0})
        self.model.train()
        while self.stage_index < len(self.cfg.stages):
            stage = self.cfg.stages[self.stage_index]
            self._run_stage(stage)
            self.stage_index += 1
            self.stage_step = 0
            self.stage_seconds = 0.0
            self.stage_cpu_seconds = 0.0
            self.save("last.pt", with_state=True)
            self.save(f"stage_{stage.name}.pt", with_state=False)
        final = self.save("final.pt", with_state=False)
        log.info("training done: %s (best validation 1-step dose MAE %s Gy)", final, self.best_val)
        return final

    def _run_stage(self, stage: StageConfig) -> None:
        log.info("stage %s: %d steps, batch %d, lr %g, max %s min", stage.name, stage.steps,
                 stage.batch_size, stage.lr, stage.max_minutes)
        smooth = None
        t_last = time.monotonic()
        steps_since = 0
        while self.stage_step < stage.steps:
            if stage.max_minutes is not None and self.stage_seconds >= stage.max_minutes * 60:
                log.info("stage %s: time budget of %.1f min reached at step %d", stage.name,
                         stage.max_minutes, self.stage_step)
                break
            if stage.max_cpu_minutes is not None and self.stage_cpu_seconds >= stage.max_cpu_minutes * 60:
                log.info("stage %s: CPU budget of %.1f CPU-min reached at step %d", stage.name,
                         stage.max_cpu_minutes, self.stage_step)
                break
            t0 = time.monotonic()
            c0 = time.process_time()
            lr = self.set_lr(stage)
            batch = self.next_batch(stage)
            loss = self.loss(self.model, batch, stage.loss_norm, stage.loss_region, stage.dvh_loss_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {self.global_step} (target {batch.target})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.update_ema()
            self.stage_step += 1
            self.global_step += 1
            steps_since += 1
            self.stage_seconds += time.monotonic() - t0
            step_cpu = time.process_time() - c0
            self.stage_cpu_seconds += step_cpu
            if self.pieces:  # (a stage driven without run() records no piece)
                piece = self.pieces[-1]
                piece["cpu_minutes"] = round(piece["cpu_minutes"] + step_cpu / 60, 4)
                piece["to_step"] = self.global_step
            loss_value = loss.item()
            smooth = loss_value if smooth is None else 0.95 * smooth + 0.05 * loss_value
            if self.stage_step % self.cfg.log_every == 0 or self.stage_step == stage.steps:
                now = time.monotonic()
                rate = steps_since / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
                remaining = stage.steps - self.stage_step
                eta = remaining / max(rate, 1e-9)
                if stage.max_minutes is not None:
                    eta = min(eta, stage.max_minutes * 60 - self.stage_seconds)
                if stage.max_cpu_minutes is not None and self.stage_cpu_seconds > 0:
                    cpu_left = stage.max_cpu_minutes * 60 - self.stage_cpu_seconds
                    eta = min(eta, cpu_left * self.stage_seconds / self.stage_cpu_seconds)
                record = {"stage": stage.name, "step": self.stage_step, "steps": stage.steps,
                          "global_step": self.global_step, "loss": round(loss_value, 5),
                          "loss_smooth": round(smooth, 5), "target": batch.target, "lr": lr,
                          "steps_per_s": round(rate, 3), "eta_s": round(max(eta, 0.0), 1),
                          "cpu_minutes": round(self.stage_cpu_seconds / 60, 2)}
                log.info("[%s] step %d/%d loss %.4f (avg %.4f, target %s) %.2f steps/s ETA %s",
                         stage.name, self.stage_step, stage.steps, loss_value, smooth, batch.target,
                         rate, _fmt_eta(eta))
                self._emit(record)
            if self.stage_step % self.cfg.checkpoint_every == 0:
                self.save("last.pt", with_state=True)
            if self.cfg.eval_every and self.stage_step % self.cfg.eval_every == 0:
                self._evaluate(stage)
        if not (self.cfg.eval_every and self.stage_step % self.cfg.eval_every == 0):
            self._evaluate(stage)

    def _evaluate(self, stage: StageConfig) -> None:
        val = self.validate()
        if val is None:
            return
        log.info("[%s] step %d validation 1-step dose MAE in body %.3f Gy", stage.name, self.stage_step, val)
        self._emit({"stage": stage.name, "step": self.stage_step, "global_step": self.global_step,
                    "val_dose_mae_gy": round(val, 4)})
        # Selection only within the dose stage: Stage A checkpoints are not dose models yet.
        if stage.name == "dose" and (self.best_val is None or val < self.best_val):
            self.best_val = val
            self.save("best.pt", with_state=False)


def body_mean(per_voxel: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_voxel`` (B, C, D, H, W) over the working voxels that touch the body.

    ``body`` (B, 1, D, H, W) is the encoded body mask: a working voxel counts when any part of it is
    body (the encoding is -1 outside). The loss region ``body`` of a stage, and of the regression
    peer (benchmarks/peer.py), so that both average over the same voxels.
    """
    weight = (body > -1).to(per_voxel.dtype).expand_as(per_voxel)
    return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0)


@torch.no_grad()
def one_step_dose_mae(model: torch.nn.Module, cases: EncodedCaseSet, dose_scale_gy: float,
                      device: torch.device | str = "cpu") -> float:
    """Mean over cases of the 1-step dose |error| in Gy inside the body, on the working grid.

    The trainer's validation proxy; ``benchmarks/fit_gap.py`` runs the same figure on training
    cases, so the two are comparable by construction. The noise is seeded (1234) so that two
    models, or two case sets, see the same draws.

    Args:
        model: the Any2Any DiT (in eval mode).
        cases: encoded cases with a ``dose``; every other modality present is a condition.
        dose_scale_gy: the encoding's dose scale (``EncodingConfig.dose_scale_gy``): [-1, 1] spans
            0 to this many Gy.
    """
    gen = torch.Generator().manual_seed(1234)
    errors = []
    for case in cases.cases:
        conds = sorted(set(case.tensors) - {"dose"})
        vols = {m: case.tensors[m][None].float().to(device) for m in conds}
        noise = torch.randn((1, *case.tensors["dose"].shape), generator=gen).to(device)
        vols["dose"] = noise
        t = torch.ones(1, device=device)
        with autocast_context(torch.device(device)):
            v = model(vols, "dose", t).float()
        x0 = (noise - v).clamp(-1, 1)
        ref = case.tensors["dose"][None].float().to(device)
        body = (case.tensors["body"][None].float().to(device) > -1) if "body" in case.tensors else \
            torch.ones_like(ref, dtype=torch.bool)
        errors.append(float(((x0 - ref).abs() * 0.5 * dose_scale_gy)[body].mean()))
    return sum(errors) / len(errors)


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


def run_training(cfg: TrainConfig, *, device: str | None = None, resume: bool = True,
                 progress: ProgressFn | None = None) -> Path:
    """Train both stages from a config; returns the final (EMA) checkpoint path."""
    return Trainer(cfg, device=device, progress=progress).run(resume=resume)
