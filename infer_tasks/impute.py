"""`impute_ct`, `impute_ptv`, `impute_oar` infer tasks: generate a missing modality of a case.

impute_ct returns a float32 CT (HU) NIfTI; impute_ptv / impute_oar return a uint8 label map with
the JSON `labels` mapping names to values. The model work is `Predictor.impute`.

An imputation takes longer than a dose (and may add a full-resolution stage after the sampling),
so a request with a `job_id` joins the app's job table like a dose request: its steps can be read
and it can be cancelled between two of them (infer_tasks/jobs.py).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from diffkt3d.constants import DEFAULT_SEED, DEFAULT_STEPS, IMPUTABLE
from diffkt3d.inference.quality import VALIDATED
from diffkt3d.io.case_folder import save_nifti
from diffkt3d.io.image_guard import ImageLimits
from infer_tasks.common import (
    MAX_SEED,
    MAX_STEPS,
    SOURCE_KEY,
    ModelProvider,
    TaskError,
    case_summary,
    int_param,
    load_request_case,
    shown,
)
from infer_tasks.jobs import JOB_ID_KEY, JobTable

MAX_STRUCTURES = 64


def structures_param(request: dict[str, Any]) -> list[str] | None:
    """The request's ``structures``: a JSON list of names, or one comma-separated text (a form field)."""
    value = request.get("structures")
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= 4096:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) <= 128 for v in value) \
            or len(value) > MAX_STRUCTURES:
        raise TaskError(422, f"parameter 'structures' must be a list of at most {MAX_STRUCTURES} structure names, "
                             f"found {shown(value)}")
    return value


class ImputeTask(InferTask):
    """Impute one modality (`target` in ct / ptv / oar) from everything else the case has.

    Args:
        target: the modality to generate.
        models: the shared model provider; for `impute_ct` the PRDiT provider when the app is
            configured with `ct_backbone prdit` (same interface).
        max_upload_bytes: session upload limit.
        image_limits: image size limits checked on every header before its data are read
            (None: `ImageLimits.from_env()`).
        jobs: where a request with a `job_id` reports its steps and can be cancelled; the app
            passes the dose task's table, so one GET /diffkt3d/jobs/{id} serves every task (None:
            a table of its own).
    """

    def __init__(self, target: str, models: ModelProvider, max_upload_bytes: int,
                 image_limits: ImageLimits | None = None, jobs: JobTable | None = None):
        if target not in IMPUTABLE:
            raise ValueError(f"cannot impute {target!r}; imputable: {IMPUTABLE}")
        super().__init__(type=InferType.OTHERS if target == "ct" else InferType.SEGMENTATION, labels=None,
                         dimension=3, description=f"Impute the {target.upper()} of a case from its other modalities",
                         config={"steps": DEFAULT_STEPS, "seed": DEFAULT_SEED})
        self.target = target
        self.models = models
        self.max_upload_bytes = max_upload_bytes
        self.image_limits = image_limits
        self.jobs = jobs or JobTable()
        # every key a client may send; `structures` (ptv / oar): the masks to return, default all
        self.param_names = frozenset({"steps", "seed", JOB_ID_KEY} | ({"structures"} if target != "ct" else set()))

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        """MONAI Label's task info plus the served model's quality-gate verdict on this target.

        A target without a passing benchmark stays callable but is marked experimental here (and
        in the description a stock client shows), so no client mistakes its output for contours
        or a CT a planner can rely on.
        """
        out = super().info()
        try:
            verdict = self.models.get().quality().get(self.target)
        except Exception as exc:  # noqa: BLE001 - /info must answer even when the model cannot load
            verdict = {"target": self.target, "status": "unknown", "reason": f"model not loaded: {exc}"}
        out["quality"] = verdict
        if not verdict or verdict.get("status") != VALIDATED:
            out["description"] = f"{out['description']} (experimental: no passing benchmark)"
        return out

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        steps = int_param(request, "steps", DEFAULT_STEPS, 1, MAX_STEPS)
        seed = int_param(request, "seed", DEFAULT_SEED, 0, MAX_SEED)
        case = load_request_case(request, self.max_upload_bytes, self.image_limits)
        predictor = self.models.get()
        kwargs = {}
        if self.target != "ct":
            try:  # refused before any work, naming what the model imputes
                kwargs["structures"] = predictor.check_structures(case, self.target, structures_param(request))
            except ValueError as exc:
                raise TaskError(422, f"parameter 'structures': {exc}") from None
        with self.jobs.track(request, f"impute_{self.target}") as job, self.models.run_lock:
            JobTable.start(job)  # a job cancelled while it waited for the model stops here
            res = predictor.impute(case, target=self.target, steps=steps, seed=seed,
                                   on_step=JobTable.step_hook(job), **kwargs)
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix=f"impute-{self.target}-", delete=False).name
        result: dict[str, Any] = {"task": f"impute_{self.target}", "target": self.target,
                                  "case": case_summary(case, str(request.get(SOURCE_KEY))),
                                  "model_version": res.model_version, "steps": res.steps, "seed": res.seed,
                                  "quality": res.quality.to_dict() if res.quality else None,
                                  "warnings": list(res.warnings)}
        if self.target == "ct":
            assert res.ct_hu is not None
            save_nifti(res.ct_hu.astype(np.float32), case.grid, out, np.float32)
        else:
            # One label map; structures are numbered in the order the model returns them and a later
            # structure wins where two overlap (voxel counts below are before merging).
            labels = {name: k + 1 for k, name in enumerate(res.masks)}
            label_map = np.zeros(case.grid.shape, dtype=np.uint8)
            for name, mask in res.masks.items():
                label_map[mask] = labels[name]
            save_nifti(label_map, case.grid, out, np.uint8)
            result["labels"] = labels
            result["voxels"] = {name: int(mask.sum()) for name, mask in res.masks.items()}
        if res.latent is not None:  # latent-space model: which conditions were VAE-encoded or cached
            result["latent"] = res.latent
        result["timings"] = {**{f"predict_{k}": v for k, v in res.timings.items()},
                             "total_s": round(time.perf_counter() - t0, 4)}
        return out, result
