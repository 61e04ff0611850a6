"""`any2any` train task: supervised Any2Any + dose training on the datastore's cases.

The run is the shipped recipe (configs/cpu-default.yaml) with the request's overrides on top, built
by the same core function as `diffkt3d train` (diffkt3d.training.recipe.load_recipe), on the
datastore cases that have a reference dose instead of the recipe's data folders. Runs inside MONAI Label's train subprocess (`POST /train/any2any`); its log lines are what
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
from diffkt3d.training import TrainConfig, run_training
from diffkt3d.training.recipe import load_recipe
from train_tasks.request import CONFIGS, dry_run, editable_fields, param_names, recipe_overrides

log = logging.getLogger(__name__)

RECIPE = CONFIGS / "cpu-default.yaml"
# Recipe fields the server sets: the datastore's cases (no validation split, so no evaluation) and
# the run folder under the app's model dir; log_every follows the shortest stage.
SERVER_DECIDED = frozenset({"train_roots", "val_roots", "out_dir", "cache_dir", "eval_every", "log_every"})
PARAM_NAMES = param_names(RECIPE, SERVER_DECIDED)  # POST /train/any2any refuses other keys


def train_config_from_request(request: dict[str, Any], case_dirs: list[str], run_dir: Path,
                              cache_dir: Path, recipe: Path = RECIPE) -> TrainConfig:
    """The recipe with the request's overrides (e.g. `{"stages.dose.steps": 50}`), on `case_dirs`."""
    server = {"train_roots": [str(d) for d in case_dirs], "val_roots": [], "out_dir": str(run_dir),
              "cache_dir": str(cache_dir), "eval_every": 0}
    cfg = load_recipe(recipe, {**recipe_overrides(request, SERVER_DECIDED), **server})
    # A short request run still shows progress lines in GET /train/.
    cfg.log_every = max(1, min([cfg.log_every, *(s.steps for s in cfg.stages)]))
    return cfg


def check_request(request: dict[str, Any]) -> None:
    """The request's overrides applied to the recipe without training (ConfigError on a bad value)."""
    dry_run(lambda: train_config_from_request(request, [], Path("run"), Path("cache")), RECIPE)


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

    def __init__(self, model_dir: str | Path, audit: AuditLog | None = None, recipe: Path = RECIPE):
        super().__init__("Any2Any + dose training on datastore cases with dose.nii.gz (diffkt3d.training)")
        self.out = Path(model_dir) / "any2any"
        self.audit = audit
        self.recipe = recipe

    def config(self) -> dict[str, Any]:
        return {**editable_fields(self.recipe, SERVER_DECIDED), "gpus": "all"}

    def stats(self) -> dict[str, Any]:
        path = self.out / "train_stats.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        ids = datastore.get_labeled_images()
        if not ids:
            raise DiffKT3DError("no datastore case has a dose.nii.gz to train on")
        case_dirs = [datastore.get_image_uri(i) for i in ids]
        run_dir = self.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
        cfg = train_config_from_request(request, case_dirs, run_dir, self.out / "cache", self.recipe)
        log.info("any2any training on %d cases -> %s", len(case_dirs), run_dir)
        t0 = time.time()

        def progress(record: dict) -> None:
            self._write_stats({"status": "running", "run_dir": str(run_dir), "cases": len(ids), **record})

        nproc, visible = processes_for_gpus(request.get("gpus", "all"))
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

        Time budgets (wall or CPU minutes) are not supported by the distributed trainer (ranks
        would stop at different steps), so steps alone bound the run.
        """
        from diffkt3d.training.distributed import launch_distributed

        for stage in cfg.stages:
            stage.max_minutes = None
            stage.max_cpu_minutes = None
        log.warning("distributed run: time budgets dropped, the stages run %s steps",
                    [s.steps for s in cfg.stages])
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
