"""`scardnft` train task: Scorecard-reward RL post-training from the clinic's preference records.

Runs `diffkt3d.training.run_scardnft` in MONAI Label's train subprocess on the datastore cases that
have a reference dose (the reward's MAE anchor needs it), with the server's preference store
(enough records -> institution-specific Scorecard item weights). The post-trained model is the one
being served when the run starts; its merged checkpoint is published atomically to
`<model_dir>/scardnft/model.pt`, which the infer tasks serve from their next request on (newest
trained model wins). A build without the ScardNFT core answers POST /train/scardnft with 503.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from diffkt3d.audit import AuditLog, model_published
from diffkt3d.errors import DiffKT3DError
from diffkt3d.preferences import PreferenceStore

log = logging.getLogger(__name__)

NOT_AVAILABLE = "ScardNFT training is not available in this build: diffkt3d.training has no run_scardnft"
# Config fields a client must not set: they name server-side paths (the server decides those).
SERVER_ONLY = {"base_model", "train_roots", "case_dirs", "out_dir", "preferences", "threads"}
# Defaults for a server run (override per request, e.g. {"iterations": 50, "max_cpu_minutes": 60}).
DEFAULTS: dict[str, Any] = {"iterations": 20, "group_size": 4, "sample_steps": 10, "inner_steps": 2,
                            "max_cpu_minutes": 60.0, "min_preferences": 10, "seed": 0}


def param_names() -> frozenset[str]:
    """Keys a client may send to POST /train/scardnft: ScardNFTConfig's fields except server paths."""
    try:
        from diffkt3d.training.scardnft import ScardNFTConfig
    except ImportError:  # a build without ScardNFT: the route answers 503 anyway
        return frozenset(DEFAULTS)
    return frozenset(f.name for f in dataclasses.fields(ScardNFTConfig)) - SERVER_ONLY | frozenset(DEFAULTS)


def scardnft_entry():
    """The core ScardNFT entry point, or None when this build has none."""
    training = importlib.import_module("diffkt3d.training")
    return getattr(training, "run_scardnft", None)


class ScardNFTTrainTask(TrainTask):
    """Post-train the served model with ScardNFT on datastore cases and stored preferences.

    Args:
        model_dir: the app's model dir; runs go to `<model_dir>/scardnft/runs/<time>/`.
        store: the preference store whose records shape the reward.
        served_model: returns the checkpoint currently served (the base of the post-training).
        audit: audit log that records each published model.
    """

    def __init__(self, model_dir: str | Path, store: PreferenceStore, served_model: Callable[[], Path | None],
                 audit: AuditLog | None = None):
        super().__init__("ScardNFT: Scorecard-reward RL post-training driven by clinician preferences")
        self.out = Path(model_dir) / "scardnft"
        self.audit = audit
        self.store = store
        self.served_model = served_model

    @staticmethod
    def available() -> bool:
        # peft (LoRA) is in the `transfer` extra, not in the lean server install.
        return scardnft_entry() is not None and importlib.util.find_spec("peft") is not None

    def config(self) -> dict[str, Any]:
        if self.available():
            return {"available": True, **DEFAULTS}
        reason = NOT_AVAILABLE if scardnft_entry() is None else \
            "ScardNFT needs peft: pip install -e '.[transfer]' on the server"
        return {"available": False, "reason": reason}

    def stats(self) -> dict[str, Any]:
        path = self.out / "train_stats.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        entry = scardnft_entry()
        if entry is None:
            raise DiffKT3DError(NOT_AVAILABLE)
        case_dirs = [datastore.get_image_uri(i) for i in datastore.get_labeled_images()]
        if not case_dirs:
            raise DiffKT3DError("no datastore case has a dose.nii.gz (ScardNFT's MAE anchor needs one)")
        base = self.served_model()
        if base is None:
            raise DiffKT3DError("no model to post-train: ship one or run POST /train/any2any first")
        ignored = sorted(set(request) & SERVER_ONLY)
        if ignored:
            log.warning("request keys decided by the server, ignored: %s", ignored)
        params = {**DEFAULTS, **{k: v for k, v in request.items() if k not in SERVER_ONLY}}
        run_dir = self.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
        log.info("scardnft on %d cases, base %s, %d preference records -> %s", len(case_dirs), base.name,
                 len(self.store.read().records), run_dir)
        t0 = time.time()

        def progress(record: dict) -> None:
            self._write_stats({"status": "running", "run_dir": str(run_dir), **record})

        result = entry({"base_model": str(base)}, case_dirs=case_dirs, preferences=str(self.store.root),
                       out_dir=run_dir, request=params, progress=progress)
        target = self.out / "model.pt"
        shutil.copyfile(result.merged_path, str(target) + ".part")
        os.replace(str(target) + ".part", target)
        if self.audit is not None:
            self.audit.append(model_published("scardnft", target, run_dir))
        stats = {"status": "done", "model": str(target), "adapter": str(result.adapter_path),
                 "base_model": str(base), "iterations": result.iterations,
                 "cpu_minutes": round(result.cpu_minutes, 2), "item_weights": result.item_weights,
                 "weight_fit": result.weight_fit, "seconds": round(time.time() - t0, 1)}
        self._write_stats(stats)
        log.info("scardnft done in %.1f s: %s", stats["seconds"], target)
        return stats

    def _write_stats(self, stats: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "train_stats.json.part"
        tmp.write_text(json.dumps(stats, default=str))
        os.replace(tmp, self.out / "train_stats.json")
