"""`any2any` train task: supervised fine-tuning of the served model on the datastore's cases.

The run is the shipped recipe (configs/cpu-default.yaml: its stages, losses and budgets) with the
request's overrides on top, built by the same core function as `diffkt3d train`
(diffkt3d.training.recipe.load_recipe), started from the weights being served (`init_from`), on
the datastore cases that have a reference dose minus the held-out validation cases. A request with
`"from_scratch": true` trains a new model instead (then `model_preset`, `model_overrides`, `grid`
and `ptv_resampling` apply; without it they are refused, the served model's architecture is kept).
Runs inside MONAI Label's train subprocess (`POST /train/any2any`); its log lines are what
`GET /train/` shows. The result becomes a model version that is served only if validation says it
is not worse than the served model (train_tasks/lifecycle.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from diffkt3d.audit import AuditLog
from diffkt3d.errors import ConfigError, DiffKT3DError
from diffkt3d.models.registry import ModelRegistry
from diffkt3d.training import TrainConfig, run_training
from diffkt3d.training.recipe import load_recipe
from train_tasks import lifecycle
from train_tasks.request import CONFIGS, dry_run, editable_fields, param_names, recipe_overrides

log = logging.getLogger(__name__)

RECIPE = CONFIGS / "cpu-default.yaml"
# Recipe fields the server sets: the datastore's cases (validation is the lifecycle's, after the
# run, so no evaluation during it), the run folder under the app's model dir, the served model as
# the start; log_every follows the shortest stage. The recipe's full-res stages are not trained by
# the server: a fine-tune changes the DiT only.
SERVER_DECIDED = frozenset({"train_roots", "val_roots", "out_dir", "cache_dir", "eval_every", "log_every",
                            "init_from", "full_res_stages"})
FROM_SCRATCH = "from_scratch"
# Recipe fields that describe a new model: they only apply with from_scratch (a fine-tune keeps the
# served model's architecture and encoding).
ARCHITECTURE = frozenset({"model_preset", "model_overrides", "grid", "ptv_resampling"})
# POST /train/any2any refuses other keys
PARAM_NAMES = param_names(RECIPE, SERVER_DECIDED) | lifecycle.validation_param_names() | {FROM_SCRATCH}


def train_config_from_request(request: dict[str, Any], case_dirs: list[str], run_dir: Path,
                              cache_dir: Path, recipe: Path = RECIPE, base_model: Path | None = None) -> TrainConfig:
    """The recipe with the request's overrides (e.g. `{"stages.dose.steps": 50}`), on `case_dirs`.

    Args:
        base_model: the checkpoint to fine-tune (the served model); ignored with `from_scratch`.
    Raises:
        ConfigError: a bad override; architecture fields without `from_scratch`; no base model to
            fine-tune and no `from_scratch`.
    """
    request, _ = lifecycle.split_request(request)
    scratch = request.pop(FROM_SCRATCH, False)
    if not isinstance(scratch, bool):
        raise ConfigError(f"{FROM_SCRATCH} must be true or false, found {scratch!r}")
    if not scratch:
        arch = sorted(k for k in request if str(k).split(".")[0] in ARCHITECTURE)
        if arch:
            raise ConfigError(f"{arch} describe a new model: a fine-tune keeps the served model's architecture; "
                              f'send "{FROM_SCRATCH}": true to train a new model from scratch')
        if base_model is None:
            raise ConfigError(f'no served model to fine-tune; send "{FROM_SCRATCH}": true to train a new one')
    server = {"train_roots": [str(d) for d in case_dirs], "val_roots": [], "out_dir": str(run_dir),
              "cache_dir": str(cache_dir), "eval_every": 0,
              "init_from": None if scratch else str(base_model), "full_res_stages": []}
    cfg = load_recipe(recipe, {**recipe_overrides(request, SERVER_DECIDED), **server})
    # A short request run still shows progress lines in GET /train/.
    cfg.log_every = max(1, min([cfg.log_every, *(s.steps for s in cfg.stages)]))
    return cfg


def _recipe_record(cfg: Any) -> dict[str, Any]:
    """The run's settings as kept with its model version: the server's paths left out (the data are
    the version's case ids, the start is its parent)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in SERVER_DECIDED}


def check_request(request: dict[str, Any]) -> None:
    """The request's overrides applied to the recipe and validation settings without training
    (ConfigError on a bad value)."""
    dry_run(lambda: train_config_from_request(request, [], Path("run"), Path("cache"), base_model=Path("served.pt")),
            RECIPE)
    lifecycle.validation_config(request)


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
    """Fine-tune the served model (or train a new one) on the datastore cases that have a reference dose.

    Args:
        model_dir: the app's model dir; runs go to `<model_dir>/any2any/runs/<time>/`.
        registry: the model versions; the result is added there and promoted only by validation.
        audit: audit log that records the validation and any promotion (who started the run is
            in the `train.start` entry before them).
        served_model: returns the checkpoint being served (the start of a fine-tune).
        override: `--conf model` when it pins the served file (then there is no parent version).
    """

    def __init__(self, model_dir: str | Path, registry: ModelRegistry, served_model: Callable[[], Path | None],
                 audit: AuditLog | None = None, recipe: Path = RECIPE, override: Path | None = None):
        super().__init__("Any2Any + dose fine-tuning of the served model on datastore cases with dose.nii.gz, "
                         "validated before it is served (diffkt3d.training)")
        self.out = Path(model_dir) / "any2any"
        self.registry = registry
        self.served_model = served_model
        self.audit = audit
        self.recipe = recipe
        self.override = override

    def config(self) -> dict[str, Any]:
        validation = {f"{lifecycle.PREFIX}.{k}": v for k, v in
                      editable_fields(lifecycle.VALIDATION_RECIPE, ()).items()}
        return {**editable_fields(self.recipe, SERVER_DECIDED), FROM_SCRATCH: False, **validation, "gpus": "all"}

    def stats(self) -> dict[str, Any]:
        path = self.out / "train_stats.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        vcfg = lifecycle.validation_config(request)
        train_ids, val_ids = lifecycle.plan_cases(datastore, vcfg)
        case_dirs = [datastore.get_image_uri(i) for i in train_ids]
        run_dir = self.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
        parent = lifecycle.served_version(self.registry, self.override)
        cfg = train_config_from_request(request, case_dirs, run_dir, self.out / "cache", self.recipe,
                                        base_model=self.served_model())
        log.info("any2any %s on %d cases (validation: %s) -> %s",
                 f"fine-tuning {parent}" if cfg.init_from else "from scratch", len(case_dirs), val_ids, run_dir)
        t0 = time.time()

        def progress(record: dict) -> None:
            self._write_stats({"status": "running", "run_dir": str(run_dir), "cases": len(train_ids), **record})

        nproc, visible = processes_for_gpus(request.get("gpus", "all"))
        if nproc > 1:
            final = self._run_distributed(cfg, run_dir, nproc, visible)
        else:
            final = run_training(cfg, resume=False, progress=progress)
        self._write_stats({"status": "validating", "run_dir": str(run_dir), "cases": len(train_ids)})
        outcome = lifecycle.keep_validate_promote(
            self.registry, self.audit, "any2any", final, run_dir, parent if cfg.init_from else None,
            _recipe_record(cfg), train_ids, val_ids, datastore, vcfg)
        stats = {"status": "done", "run_dir": str(run_dir), "cases": len(train_ids),
                 "from_scratch": cfg.init_from is None, **outcome, "seconds": round(time.time() - t0, 1)}
        stats = self._write_stats(stats)
        log.info("any2any training done in %.1f s: version %s", stats["seconds"], outcome["version"])
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

    def _write_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Write the stats /info shows; returns them as shown (server paths relative to the model folder)."""
        self.out.mkdir(parents=True, exist_ok=True)
        stats = lifecycle.shown_paths(stats, self.out.parent)
        tmp = self.out / "train_stats.json.part"
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, self.out / "train_stats.json")
        return stats
