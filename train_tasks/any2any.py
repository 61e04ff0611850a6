"""`any2any` train task: supervised Any2Any + dose training on the datastore's cases.

Runs inside MONAI Label's train subprocess (`POST /train/any2any`); its log lines are what
`GET /train/` shows. The finished (EMA) checkpoint is copied atomically to
`<app>/model/any2any/model.pt`, which the infer tasks pick up at their next request (mtime check).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from diffkt3d.audit import AuditLog, model_published
from diffkt3d.errors import DiffKT3DError
from diffkt3d.training import StageConfig, TrainConfig, run_training

log = logging.getLogger(__name__)

# Request keys -> defaults. A short CPU run by default; a GPU node sets larger values per request.
# No key names a server file: the recipe's other fields are TrainConfig's defaults (a YAML recipe
# is for the command line, `diffkt3d train --config`).
DEFAULTS: dict[str, Any] = {"preset": "cpu-default", "any2any_steps": 200, "dose_steps": 200,
                            "max_minutes": 30.0, "batch_size": 2, "grid": 64, "lr": 1e-4,
                            "warmup_steps": 50, "seed": 0, "gpus": "all"}
PARAM_NAMES = frozenset(DEFAULTS)  # every key a client may send (POST /train/any2any refuses others)


def train_config_from_request(request: dict[str, Any], case_dirs: list[str], run_dir: Path,
                              cache_dir: Path) -> TrainConfig:
    """One TrainConfig from the request: TrainConfig's defaults with the request's overrides."""
    p = {k: request.get(k, v) for k, v in DEFAULTS.items()}
    base = TrainConfig()
    grid = p["grid"]
    grid = (int(grid),) * 3 if isinstance(grid, (int, str)) else tuple(int(g) for g in grid)
    stages = [StageConfig(name="any2any", steps=int(p["any2any_steps"]), max_minutes=float(p["max_minutes"]) / 2,
                          batch_size=int(p["batch_size"]), lr=float(p["lr"]), warmup_steps=int(p["warmup_steps"])),
              StageConfig(name="dose", steps=int(p["dose_steps"]), max_minutes=float(p["max_minutes"]) / 2,
                          batch_size=int(p["batch_size"]), lr=float(p["lr"]), warmup_steps=int(p["warmup_steps"]))]
    stages = [s for s in stages if s.steps > 0]
    if not stages:
        raise ValueError("any2any_steps and dose_steps are both 0: nothing to train")
    cfg = TrainConfig.from_dict({**base.to_dict(), "stages": [vars(s) for s in stages]})
    cfg.model_preset = str(p["preset"])
    cfg.grid = grid
    cfg.seed = int(p["seed"])
    cfg.train_roots = case_dirs
    cfg.val_roots = []
    cfg.out_dir = str(run_dir)
    cfg.cache_dir = str(cache_dir)
    cfg.log_every = max(1, min(cfg.log_every, int(p["any2any_steps"]) or 1))
    cfg.eval_every = 0
    return cfg


def processes_for_gpus(gpus: Any) -> tuple[int, str | None]:
    """MONAI Label's `gpus` request field -> (training processes, CUDA_VISIBLE_DEVICES or None).

    MONAI Label sends "all" by default; "0,2" selects devices; a number asks for that many
    processes (on a CPU-only server several processes run DDP over gloo, as in the tests).
    """
    text = str(gpus).strip().lower() if gpus is not None else "all"
    if text in ("", "all"):
        import torch

        return max(1, torch.cuda.device_count()), None
    if "," in text:
        ids = [g.strip() for g in text.split(",") if g.strip()]
        if not all(g.isdigit() for g in ids):
            raise DiffKT3DError(f"gpus must be 'all', a count or a list of device ids like '0,1'; got {gpus!r}")
        return len(ids), ",".join(ids)
    if text.isdigit():
        return max(1, int(text)), None
    raise DiffKT3DError(f"gpus must be 'all', a count or a list of device ids like '0,1'; got {gpus!r}")


class Any2AnyTrainTask(TrainTask):
    """Train the Any2Any DiT on the datastore cases that have a reference dose.

    Args:
        model_dir: the app's model dir; output goes to `<model_dir>/any2any/`.
        audit: audit log that records each published model (who started the run is in the
            `train.start` entry before it).
    """

    def __init__(self, model_dir: str | Path, audit: AuditLog | None = None):
        super().__init__("Any2Any + dose training on datastore cases with dose.nii.gz (diffkt3d.training)")
        self.out = Path(model_dir) / "any2any"
        self.audit = audit

    def config(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    def stats(self) -> dict[str, Any]:
        path = self.out / "train_stats.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        ids = datastore.get_labeled_images()
        if not ids:
            raise DiffKT3DError("no datastore case has a dose.nii.gz to train on")
        case_dirs = [datastore.get_image_uri(i) for i in ids]
        run_dir = self.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
        cfg = train_config_from_request(request, case_dirs, run_dir, self.out / "cache")
        log.info("any2any training on %d cases -> %s", len(case_dirs), run_dir)
        t0 = time.time()

        def progress(record: dict) -> None:
            self._write_stats({"status": "running", "run_dir": str(run_dir), "cases": len(ids), **record})

        nproc, visible = processes_for_gpus(request.get("gpus", DEFAULTS["gpus"]))
        if nproc > 1:
            final = self._run_distributed(cfg, run_dir, nproc, visible)
        else:
            final = run_training(cfg, resume=False, progress=progress)
        # Publish atomically: the infer tasks reload when model.pt's mtime changes.
        target = self.out / "model.pt"
        shutil.copyfile(final, str(target) + ".part")
        os.replace(str(target) + ".part", target)
        if self.audit is not None:
            self.audit.append(model_published("any2any", target, run_dir))
        stats = {"status": "done", "model": str(target), "run_dir": str(run_dir), "cases": len(ids),
                 "seconds": round(time.time() - t0, 1)}
        self._write_stats(stats)
        log.info("any2any training done in %.1f s: %s", stats["seconds"], target)
        return stats

    def _run_distributed(self, cfg: TrainConfig, run_dir: Path, nproc: int, visible: str | None = None) -> Path:
        """Several GPUs: the same config through torchrun (diffkt3d.training.distributed, DDP).

        Wall-clock stage budgets are not supported by the distributed trainer (ranks would stop at
        different steps), so steps alone bound the run.
        """
        from diffkt3d.training.distributed import launch_distributed

        for stage in cfg.stages:
            stage.max_minutes = None
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "train_config.yaml"
        config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        env = {"CUDA_VISIBLE_DEVICES": visible} if visible else None
        done = launch_distributed(config_path, nproc, extra_args=["--no-resume"], env=env)
        if done.returncode != 0:
            raise DiffKT3DError(f"distributed training on {nproc} processes failed (exit {done.returncode}); "
                                f"see the train log and {run_dir}")
        return run_dir / "final.pt"

    def _write_stats(self, stats: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "train_stats.json.part"
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, self.out / "train_stats.json")
