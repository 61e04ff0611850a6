"""Training a full-resolution stage under a frozen base checkpoint (``models.full_res``).

1. Once per training case: the base model's coarse prediction of the target, through
   ``Predictor.predict_coarse`` (``coarse_steps``, fixed seed: what inference gives the stage),
   and the full-res conditions, cached on disk (``training.full_res_data``). The precompute's CPU
   time counts in the budget, so the peer (``stage.coarse_input: false``, no precompute) trains
   for longer on the same total compute.
2. Steps on random crops of the case grid: AdamW, warm-up then constant lr with a final linear
   decay over the CPU budget (``time.process_time``, as ``training.trainer``). Losses: dose L1 in
   the body (+ the DVH moment loss if asked), CT L1 in the body, masks :func:`mask_loss` (Dice +
   binary cross-entropy on sigmoid logits) over the structures each case has.
3. Output: the base checkpoint plus the stage (``final.pt``), one file to serve; ``last.pt`` is
   the same plus the trainer state (weights, optimiser, rng, step, CPU counters), from which a
   run resumes. Each invocation adds a piece (start, machine, steps, CPU minutes) to the record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from diffkt3d.errors import ConfigError
from diffkt3d.machine import describe_machine
from diffkt3d.models.checkpoint import file_digest, read_checkpoint, write_full_res_stages
from diffkt3d.models.full_res import FullResConfig, FullResStage
from diffkt3d.training.dataset import list_case_dirs
from diffkt3d.training.dvh_loss import moment_loss
from diffkt3d.training.full_res_config import FullResTrainConfig
from diffkt3d.training.full_res_data import (
    CaseCropper,
    CropBatch,
    build_case_cache,
    cache_key,
    coarse_cpu_seconds,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]


_DICE = DiceLoss(sigmoid=True, reduction="none")


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-label segmentation loss on logits: binary cross-entropy per voxel + soft Dice (MONAI)
    over the channels that have foreground in the crop.

    Why not MONAI's ``DiceCELoss(sigmoid=True)``: with more than one channel it takes the
    *softmax* cross-entropy across channels, which is zero on every background voxel (a target of
    all zeros), so nothing teaches the network what is not an organ; a stage trained with it
    predicted p ~ 0.5 everywhere. Overlapping multi-label masks need a sigmoid per channel, i.e.
    BCE. A channel without foreground in the crop has a Dice of ~0 whatever the prediction (a
    constant 1 in the loss, no gradient), so it is left to the BCE.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = _DICE(logits, target).reshape(target.shape[:2])
    has = target.flatten(2).sum(-1) > 0
    return bce + (dice[has].mean() if has.any() else dice.sum() * 0.0)


class FullResTrainer:
    """Owns the stage, optimiser, crops and loop. Create, then ``run()``."""

    def __init__(self, cfg: FullResTrainConfig, *, device: str | None = None, progress: ProgressFn | None = None):
        from diffkt3d.inference import Predictor

        self.cfg = cfg
        self.device = torch.device(device or "cpu")
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.base_path = Path(cfg.base_model)
        self.predictor = Predictor.load(self.base_path, device=str(self.device))
        if type(self.predictor) is not Predictor:
            raise ConfigError(f"{self.base_path} is a latent-space model; a full-res stage refines a voxel-space "
                              "Any2Any model")
        self.encoding = self.predictor.encoding
        self.stage_config: FullResConfig = cfg.stage.resolved(tuple(self.predictor.model.config.modalities))
        if self.stage_config.coarse_input:  # serving samples the coarse input as it was trained on
            if cfg.stage.coarse_steps not in (None, cfg.coarse_steps):
                raise ConfigError(f"stage.coarse_steps {cfg.stage.coarse_steps} differs from coarse_steps "
                                  f"{cfg.coarse_steps}; set coarse_steps only")
            self.stage_config = dataclasses.replace(self.stage_config, coarse_steps=int(cfg.coarse_steps))
        torch.manual_seed(cfg.seed)
        self.stage = FullResStage(self.stage_config, self.encoding).to(self.device)
        self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = random.Random(cfg.seed)
        self.step = 0
        self.train_cpu_seconds = 0.0
        self.coarse_cpu_seconds = 0.0
        self.prepare_cpu_seconds = 0.0
        self.pieces: list[dict] = []
        self.history: list[dict] = []
        self.cropper: CaseCropper | None = None

    # -- data ------------------------------------------------------------------------------
    def load_data(self) -> None:
        cfg = self.cfg
        dirs = list_case_dirs(cfg.train_roots)[: cfg.max_cases]
        key = cache_key(self.stage_config, file_digest(self.base_path), cfg.coarse_steps, cfg.coarse_seed)
        folder = Path(cfg.cache_dir) / key
        folder.mkdir(parents=True, exist_ok=True)
        log.info("full-res %s stage: caching %d cases in %s (coarse prediction: %s)", self.stage_config.target,
                 len(dirs), folder, f"{cfg.coarse_steps} steps" if self.stage_config.coarse_input else "not used")
        c0 = time.process_time()
        files = [f for d in dirs if (f := build_case_cache(d, self.predictor, self.stage_config, cfg.coarse_steps,
                                                            cfg.coarse_seed, folder)) is not None]
        self.prepare_cpu_seconds = time.process_time() - c0  # this invocation's caching (0 when all cached)
        self.coarse_cpu_seconds = coarse_cpu_seconds(files)
        self.cropper = CaseCropper(files, self.stage_config, self.encoding.oar_channels, cfg.foreground_ratio,
                                   cfg.flip_lr)

    # -- budget and lr ---------------------------------------------------------------------
    @property
    def cpu_seconds(self) -> float:
        """CPU seconds spent on this stage: the coarse precompute plus the training steps."""
        return self.coarse_cpu_seconds + self.train_cpu_seconds

    def progress_fraction(self) -> float:
        """How far through its budget the run is: steps or CPU minutes, whichever is nearer its limit."""
        done = self.step / self.cfg.steps
        if self.cfg.max_cpu_minutes is not None:
            done = max(done, self.cpu_seconds / (self.cfg.max_cpu_minutes * 60))
        return done

    def lr_now(self) -> float:
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        if cfg.decay_fraction > 0:
            into = (self.progress_fraction() - (1.0 - cfg.decay_fraction)) / cfg.decay_fraction
            if into > 0:
                lr *= 1.0 - (1.0 - cfg.final_lr_ratio) * min(into, 1.0)
        return lr

    def budget_left(self) -> bool:
        if self.step >= self.cfg.steps:
            return False
        cap = self.cfg.max_cpu_minutes
        return cap is None or self.cpu_seconds < cap * 60

    # -- loss ------------------------------------------------------------------------------
    def loss(self, batch: CropBatch) -> torch.Tensor:
        stage, target = self.stage, self.stage_config.target
        coarse = None if batch.coarse is None else batch.coarse.to(self.device)
        out = stage(batch.conditions.to(self.device), coarse)
        ref = batch.target.to(self.device)
        if target in ("oar", "ptv"):
            terms = [mask_loss(out[b: b + 1, keep], ref[b: b + 1, keep])
                     for b in range(out.shape[0]) if (keep := batch.present[b]).any()]
            return torch.stack(terms).mean() if terms else out.sum() * 0.0
        pred = stage.combine(coarse, out)
        body = batch.body.to(self.device).to(pred.dtype)
        loss = ((pred - ref).abs() * body).sum() / body.sum().clamp_min(1.0)
        if target == "dose" and self.cfg.dvh_loss_weight > 0:
            loss = loss + self.cfg.dvh_loss_weight * moment_loss(pred, ref, self._structures(batch),
                                                                 self.encoding.dose_scale_gy)
        return loss

    def _structures(self, batch: CropBatch) -> dict[str, torch.Tensor]:
        """The OAR and PTV conditions of the crops, for the DVH moment loss."""
        out, start = {}, 0
        for m in self.stage_config.conditions:
            n = self.encoding.channels()[m]
            if m in ("oar", "ptv"):
                out[m] = batch.conditions[:, start: start + n].to(self.device)
            start += n
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def record(self) -> dict:
        """What the output checkpoint's meta says about this stage's training."""
        return {"base_model": self.base_path.name, "base_version": self.predictor.model_version,
                "step": self.step, "cases": len(self.cropper.files) if self.cropper else 0,
                "coarse_cpu_minutes": round(self.coarse_cpu_seconds / 60, 3),
                "train_cpu_minutes": round(self.train_cpu_seconds / 60, 3),
                "total_cpu_minutes": round(self.cpu_seconds / 60, 3),
                "pieces": list(self.pieces), "train_config": self.cfg.to_dict()}

    def save(self, name: str, with_state: bool) -> Path:
        base_meta = read_checkpoint(self.base_path).get("meta") or {}
        records = {**dict(base_meta.get("full_res") or {}), self.stage_config.target: self.record()}
        state = None
        if with_state:
            state = {"optimizer": self.optimizer.state_dict(), "step": self.step,
                     "train_cpu_seconds": self.train_cpu_seconds, "rng": json.dumps(self.rng.getstate()),
                     "torch_rng": torch.get_rng_state(), "pieces": json.dumps(self.pieces),
                     "history": json.dumps(self.history[-200:])}
        return write_full_res_stages(self.base_path, self.out_dir / name,
                                     {self.stage_config.target: (self.stage_config, self.stage.state_dict())},
                                     meta_updates={"name": self.out_dir.name, "full_res": records},
                                     train_state=state)

    def try_resume(self) -> bool:
        path = self.out_dir / "last.pt"
        if not path.exists():
            return False
        blob = read_checkpoint(path)
        st, entry = blob.get("train_state"), (blob.get("full_res") or {}).get(self.stage_config.target)
        if st is None or entry is None:
            return False
        if FullResConfig.from_dict(dict(entry["config"])) != self.stage_config:
            raise ConfigError(f"{path} holds a {self.stage_config.target} stage with another config; use a new "
                              f"out_dir (found {entry['config']}, expected {self.stage_config.to_dict()})")
        self.stage.load_state_dict(entry["state_dict"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.step, self.train_cpu_seconds = int(st["step"]), float(st["train_cpu_seconds"])
        state = json.loads(st["rng"])
        self.rng.setstate((state[0], tuple(state[1]), state[2]))
        torch.set_rng_state(st["torch_rng"])
        self.pieces, self.history = json.loads(st["pieces"]), json.loads(st["history"])
        log.info("resumed %s at step %d (%.1f training CPU-min)", path, self.step, self.train_cpu_seconds / 60)
        return True

    # -- loop ------------------------------------------------------------------------------
    def run(self, resume: bool = True) -> Path:
        if self.cropper is None:
            self.load_data()
        if resume:
            self.try_resume()
        piece = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": describe_machine(),
                 "from_step": self.step, "to_step": self.step, "cpu_minutes": 0.0,
                 "cache_cpu_minutes": round(self.prepare_cpu_seconds / 60, 3)}
        self.pieces.append(piece)
        piece_cpu = 0.0
        self.stage.train()
        smooth = None
        while self.budget_left():
            c0, t0 = time.process_time(), time.monotonic()
            lr = self.lr_now()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = self.cropper.batch(self.rng, self.cfg.batch_size)
            loss = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.stage.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            spent = time.process_time() - c0
            self.train_cpu_seconds += spent
            piece_cpu += spent
            piece.update(to_step=self.step, cpu_minutes=round(piece_cpu / 60, 3))
            value = float(loss.detach())
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            if self.step % self.cfg.log_every == 0 or self.step == 1:
                self._emit({"step": self.step, "loss": round(value, 5), "loss_avg": round(smooth, 5),
                            "lr": lr, "cpu_minutes": round(self.cpu_seconds / 60, 3),
                            "step_s": round(time.monotonic() - t0, 3)})
            if self.step % self.cfg.checkpoint_every == 0:
                self.save("last.pt", with_state=True)
        log.info("full-res %s stage stops at step %d, %.2f CPU-min (coarse %.2f)", self.stage_config.target,
                 self.step, self.cpu_seconds / 60, self.coarse_cpu_seconds / 60)
        self.stage.eval()
        self.save("last.pt", with_state=True)
        return self.save("final.pt", with_state=False)

    def _emit(self, record: dict) -> None:
        self.history.append(record)
        (self.out_dir / "progress.json").write_text(json.dumps(record))
        log.info("full-res step %d loss %.4f (avg %.4f) lr %.2e %.2f CPU-min", record["step"], record["loss"],
                 record["loss_avg"], record["lr"], record["cpu_minutes"])
        if self.progress is not None:
            self.progress(record)


def run_full_res_training(cfg: FullResTrainConfig, *, device: str | None = None, resume: bool = True,
                          progress: ProgressFn | None = None) -> Path:
    """Train a full-res stage from a config; returns final.pt (base checkpoint + stage)."""
    return FullResTrainer(cfg, device=device, progress=progress).run(resume=resume)


__all__ = ["FullResTrainer", "run_full_res_training"]
