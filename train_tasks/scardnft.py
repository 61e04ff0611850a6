"""`scardnft` train task: Scorecard-reward RL post-training from the clinic's preference records.

Calls the core ScardNFT trainer (`diffkt3d.training.run_scardnft`) when this build has it. When
it does not, the task says so: `available()` is False, `/info/` shows the reason, and the app
answers `POST /train/scardnft` with 503 instead of starting a subprocess (no fake training).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from diffkt3d.errors import DiffKT3DError
from diffkt3d.preferences import PreferenceStore

log = logging.getLogger(__name__)

NOT_AVAILABLE = ("ScardNFT training is not available in this build: diffkt3d.training has no "
                 "run_scardnft (issue 6 is not merged yet)")


def scardnft_entry():
    """The core ScardNFT entry point, or None when this build has none."""
    training = importlib.import_module("diffkt3d.training")
    return getattr(training, "run_scardnft", None)


class ScardNFTTrainTask(TrainTask):
    """Post-train the current model with ScardNFT on datastore cases and stored preferences.

    Args:
        model_dir: the app's model dir; the adapter goes to `<model_dir>/scardnft/`.
        store: the preference store whose records shape the reward.
    """

    def __init__(self, model_dir: str | Path, store: PreferenceStore):
        super().__init__("ScardNFT: Scorecard-reward RL post-training driven by clinician preferences")
        self.out = Path(model_dir) / "scardnft"
        self.store = store

    @staticmethod
    def available() -> bool:
        return scardnft_entry() is not None

    def config(self) -> dict[str, Any]:
        return {"available": self.available(), **({} if self.available() else {"reason": NOT_AVAILABLE})}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        entry = scardnft_entry()
        if entry is None:
            raise DiffKT3DError(NOT_AVAILABLE)
        records = self.store.read().records
        case_dirs = [datastore.get_image_uri(i) for i in datastore.get_labeled_images()]
        log.info("scardnft on %d cases with %d preference records -> %s", len(case_dirs), len(records), self.out)
        # The core API is announced in diffkt3d/training/__init__.py by the ScardNFT work (issue 6);
        # this call follows the convention of run_training (config-like keyword arguments).
        return entry(case_dirs=case_dirs, preferences=records, out_dir=str(self.out), request=request)
