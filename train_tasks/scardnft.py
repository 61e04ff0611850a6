"""`scardnft` train task: Scorecard-reward RL post-training from the clinic's preference records.

The run is the ScardNFT recipe (configs/scardnft-cpu.yaml) with the request's overrides on top
(diffkt3d.training.recipe.load_scardnft_recipe, as `diffkt3d train --stage scardnft`), on the
datastore cases that have a reference dose (the reward's MAE anchor needs it) and with the server's
preference store (enough records -> institution-specific Scorecard item weights). The post-trained
model is the one being served when the run starts; held-out validation cases are not trained on.
The merged checkpoint becomes a model version that is served only if validation (with the learned
weights, the preference-weighted Scorecard too) says it is not worse (train_tasks/lifecycle.py).

LoRA comes from peft, which the server install includes (requirements-server.txt); a server
without it says so at start and answers POST /train/scardnft with 503 and the install command.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from diffkt3d.audit import AuditLog
from diffkt3d.errors import DiffKT3DError
from diffkt3d.models.registry import ModelRegistry
from diffkt3d.preferences import PreferenceStore
from diffkt3d.training import ScardNFTConfig, run_scardnft
from diffkt3d.training.recipe import load_scardnft_recipe
from train_tasks import lifecycle
from train_tasks.request import CONFIGS, dry_run, editable_fields, param_names, recipe_overrides

log = logging.getLogger(__name__)

RECIPE = CONFIGS / "scardnft-cpu.yaml"
NOT_AVAILABLE = ("ScardNFT is not available on this server: it needs the 'peft' package (LoRA), which is "
                 "missing; pip install -r requirements-server.txt (or pip install -e '.[transfer]') on the server")
# Recipe fields the server sets (they name server-side paths and resources): the served model,
# the datastore's cases, the run folder, the preference store, the thread count of the recipe.
SERVER_DECIDED = frozenset({"base_model", "train_roots", "case_dirs", "out_dir", "preferences", "threads"})
# POST /train/scardnft refuses other keys
PARAM_NAMES = param_names(RECIPE, SERVER_DECIDED) | lifecycle.validation_param_names()


def scardnft_config_from_request(request: dict[str, Any], case_dirs: list[str], base_model: Path, run_dir: Path,
                                 preferences: Path, recipe: Path = RECIPE) -> ScardNFTConfig:
    """The recipe with the request's overrides (e.g. `{"iterations": 20}`), on the server's cases and store."""
    request, _ = lifecycle.split_request(request)
    server = {"base_model": str(base_model), "train_roots": [], "case_dirs": [str(d) for d in case_dirs],
              "out_dir": str(run_dir), "preferences": str(preferences)}
    return load_scardnft_recipe(recipe, {**recipe_overrides(request, SERVER_DECIDED), **server})


def _recipe_record(cfg: Any) -> dict[str, Any]:
    """The run's settings as kept with its model version: the server's paths left out (the data are
    the version's case ids, the start is its parent)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in SERVER_DECIDED}


def check_request(request: dict[str, Any]) -> None:
    """The request's overrides applied to the recipe without training (ConfigError on a bad value)."""
    if not ScardNFTTrainTask.available():  # the route answers 503 before this runs
        return
    dry_run(lambda: scardnft_config_from_request(request, [], Path("model.pt"), Path("run"), Path("preferences")),
            RECIPE)
    lifecycle.validation_config(request)


class ScardNFTTrainTask(TrainTask):
    """Post-train the served model with ScardNFT on datastore cases and stored preferences.

    Args:
        model_dir: the app's model dir; runs go to `<model_dir>/scardnft/runs/<time>/`.
        store: the preference store whose records shape the reward.
        served_model: returns the checkpoint currently served (the base of the post-training).
        registry: the model versions; the result is added there and promoted only by validation.
        audit: audit log that records the validation and any promotion.
        recipe: the ScardNFT recipe YAML the requests override.
        override: `--conf model` when it pins the served file (then there is no parent version).
    """

    def __init__(self, model_dir: str | Path, store: PreferenceStore, served_model: Callable[[], Path | None],
                 registry: ModelRegistry, audit: AuditLog | None = None, recipe: Path = RECIPE,
                 override: Path | None = None):
        super().__init__("ScardNFT: Scorecard-reward RL post-training driven by clinician preferences, "
                         "validated before it is served")
        self.out = Path(model_dir) / "scardnft"
        self.audit = audit
        self.store = store
        self.served_model = served_model
        self.registry = registry
        self.recipe = recipe
        self.override = override
        if not self.available():
            log.warning(NOT_AVAILABLE)

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("peft") is not None

    def config(self) -> dict[str, Any]:
        if not self.available():
            return {"available": False, "reason": NOT_AVAILABLE}
        validation = {f"{lifecycle.PREFIX}.{k}": v for k, v in
                      editable_fields(lifecycle.VALIDATION_RECIPE, ()).items()}
        return {**editable_fields(self.recipe, SERVER_DECIDED), **validation}

    def stats(self) -> dict[str, Any]:
        path = self.out / "train_stats.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        if not self.available():
            raise DiffKT3DError(NOT_AVAILABLE)
        vcfg = lifecycle.validation_config(request)
        train_ids, val_ids = lifecycle.plan_cases(datastore, vcfg)
        case_dirs = [datastore.get_image_uri(i) for i in train_ids]
        base = self.served_model()
        if base is None:
            raise DiffKT3DError("no model to post-train: ship one or run POST /train/any2any first")
        parent = lifecycle.served_version(self.registry, self.override)
        run_dir = self.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
        cfg = scardnft_config_from_request(request, case_dirs, base, run_dir, self.store.root, self.recipe)
        log.info("scardnft on %d cases (validation: %s), base %s, %d preference records -> %s", len(case_dirs),
                 val_ids, parent or base.name, len(self.store.read().records), run_dir)
        t0 = time.time()

        def progress(record: dict) -> None:
            self._write_stats({"status": "running", "run_dir": str(run_dir), **record})

        result = run_scardnft(cfg, progress=progress)
        self._write_stats({"status": "validating", "run_dir": str(run_dir)})
        outcome = lifecycle.keep_validate_promote(
            self.registry, self.audit, "scardnft", result.merged_path, run_dir, parent, _recipe_record(cfg),
            train_ids, val_ids, datastore, vcfg, item_weights=result.item_weights)
        stats = {"status": "done", "adapter": str(result.adapter_path), "run_dir": str(run_dir),
                 "base_model": parent or base.name, "iterations": result.iterations,
                 "cpu_minutes": round(result.cpu_minutes, 2), "item_weights": result.item_weights,
                 "weight_fit": result.weight_fit, **outcome, "seconds": round(time.time() - t0, 1)}
        stats = self._write_stats(stats)
        log.info("scardnft done in %.1f s: version %s", stats["seconds"], outcome["version"])
        return stats

    def _write_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Write the stats /info shows; returns them as shown (server paths relative to the model folder)."""
        self.out.mkdir(parents=True, exist_ok=True)
        stats = lifecycle.shown_paths(stats, self.out.parent)
        tmp = self.out / "train_stats.json.part"
        tmp.write_text(json.dumps(stats, default=str))
        os.replace(tmp, self.out / "train_stats.json")
        return stats
