"""`dose` infer task: dose (Gy, float32 NIfTI on the input grid) + Scorecard, DVH and candidates.

Request/response format: docs/request-format.md. The model work is `Predictor.predict_dose`; the
response JSON is its `DosePrediction.to_dict()` (the same description `diffkt3d predict` writes)
plus transport-only fields: `task`, `request_id`, `case.source` and `request_timings`.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from diffkt3d.constants import (
    AGGREGATES,
    DEFAULT_AGGREGATE,
    DEFAULT_CANDIDATES,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
)
from diffkt3d.data.case import Grid
from diffkt3d.errors import ConfigError
from diffkt3d.evaluation import reference_comparison
from diffkt3d.ids import check_id
from diffkt3d.inference import DosePrediction
from diffkt3d.inference.predictor import DOSE_PREDICTION_INPUTS
from diffkt3d.io.case_folder import save_nifti
from diffkt3d.io.image_guard import ImageLimits
from diffkt3d.scorecard import ScorecardTemplate, list_templates, template_from_dict
from infer_tasks.common import (
    CASE_ID_KEY,
    MAX_SEED,
    MAX_STEPS,
    SOURCE_KEY,
    ModelProvider,
    TaskError,
    bool_param,
    int_param,
    load_request_case,
    shown,
)
from infer_tasks.jobs import JOB_ID_KEY, JobTable

log = logging.getLogger(__name__)

MAX_CANDIDATES = 16


# A Scorecard template sent with the request (`template_yaml`): the shipped ones are about 5 KB.
MAX_TEMPLATE_YAML_BYTES = 64 * 2**10


@dataclass(frozen=True)
class DoseParams:
    """The `dose` request parameters, parsed and checked once (defaults: docs/request-format.md).

    The Scorecard template is chosen by name among the shipped ones (`template`) or sent as YAML
    (`template_yaml`); never by a server path, so a request can neither read server files nor learn
    whether one exists.
    """

    steps: int = DEFAULT_STEPS
    candidates: int = DEFAULT_CANDIDATES
    seed: int = DEFAULT_SEED
    preview: bool = False
    aggregate: str = DEFAULT_AGGREGATE
    template: str = DEFAULT_TEMPLATE
    request_id: str | None = None
    candidate_id: str | None = None
    scorecard: ScorecardTemplate | None = None  # from template_yaml; None: the shipped `template`
    compare: bool = False  # compare every candidate with the case's own dose (its dose.nii.gz)

    # every key a client may send (checked by the app before the task runs)
    NAMES = frozenset({"steps", "candidates", "seed", "preview", "aggregate", "template", "template_yaml",
                       "request_id", "candidate_id", "compare", JOB_ID_KEY})

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> DoseParams:
        aggregate = request.get("aggregate", DEFAULT_AGGREGATE)
        if aggregate not in AGGREGATES:
            raise TaskError(422, f"parameter 'aggregate' must be one of {', '.join(map(repr, AGGREGATES))}, found {shown(aggregate)}")
        template, scorecard = _template_param(request)
        rid, cid = request.get("request_id"), request.get("candidate_id")
        if (rid is None) != (cid is None):
            raise TaskError(422, "'request_id' and 'candidate_id' go together (fetching a stored candidate)")
        try:
            if rid is not None:
                check_id(rid, "parameter 'request_id'")
                check_id(cid, "parameter 'candidate_id'")
        except ValueError as exc:
            raise TaskError(422, str(exc)) from None
        return cls(steps=int_param(request, "steps", DEFAULT_STEPS, 1, MAX_STEPS),
                   candidates=int_param(request, "candidates", DEFAULT_CANDIDATES, 1, MAX_CANDIDATES),
                   seed=int_param(request, "seed", DEFAULT_SEED, 0, MAX_SEED),
                   preview=bool_param(request, "preview", False), aggregate=aggregate, template=template,
                   request_id=rid, candidate_id=cid, scorecard=scorecard,
                   compare=bool_param(request, "compare", False))


def _template_param(request: dict[str, Any]) -> tuple[str, ScorecardTemplate | None]:
    """(template name, parsed request template or None) from `template` / `template_yaml`."""
    text = request.get("template_yaml")
    if text is None:
        name = request.get("template", DEFAULT_TEMPLATE)
        shipped = list_templates()
        if name not in shipped:
            raise TaskError(422, f"parameter 'template' must name a shipped Scorecard template {shipped} (or "
                                 f"send the template itself as 'template_yaml'), found {shown(name)}")
        return name, None
    if "template" in request:
        raise TaskError(422, "send either 'template' (a shipped template's name) or 'template_yaml', not both")
    if not isinstance(text, str) or not text.strip():
        raise TaskError(422, f"parameter 'template_yaml' must be the YAML text of a Scorecard template, "
                             f"found {shown(text)}")
    size = len(text.encode())
    if size > MAX_TEMPLATE_YAML_BYTES:
        raise TaskError(413, f"parameter 'template_yaml' is {size} bytes, the limit is {MAX_TEMPLATE_YAML_BYTES}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TaskError(422, f"parameter 'template_yaml' is not valid YAML ({type(exc).__name__})") from None
    try:
        scorecard = template_from_dict(data, source="template_yaml", default_name="request")
    except ConfigError as exc:
        raise TaskError(422, f"parameter 'template_yaml': {exc}") from None
    return scorecard.name, scorecard


class CandidateCache:
    """Candidate doses of recent multi-candidate requests, so a client can fetch each one without
    re-sampling.

    Bounded by bytes (oldest requests evicted first) and by age.

    Args:
        max_bytes: memory budget for all kept doses.
        max_age_s: a request's candidates are dropped after this many seconds.
    """

    def __init__(self, max_bytes: int = 512 * 2**20, max_age_s: float = 1800.0):
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._items: OrderedDict[str, tuple[float, Grid, dict[str, np.ndarray], dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, grid: Grid, doses: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        with self._lock:
            self._items[request_id] = (time.monotonic(), grid, doses, meta)
            self._evict()

    def get(self, request_id: str, candidate_id: str) -> tuple[Grid, np.ndarray, dict[str, Any]]:
        with self._lock:
            self._evict()
            item = self._items.get(request_id)
            if item is None:
                raise TaskError(404, f"request {request_id!r} is unknown or expired (single-candidate results are "
                                     "not kept: their dose was the response); send the dose request again with "
                                     "the same seed (sampling is deterministic)")
            _, grid, doses, meta = item
            if candidate_id not in doses:
                raise TaskError(404, f"request {request_id!r} has no candidate {candidate_id!r}; "
                                     f"candidates: {sorted(doses)}")
            return grid, doses[candidate_id], meta

    def _evict(self) -> None:
        now = time.monotonic()
        for rid in [r for r, (t, *_) in self._items.items() if now - t > self.max_age_s]:
            del self._items[rid]
        total = sum(d.nbytes for _, _, doses, _ in self._items.values() for d in doses.values())
        while total > self.max_bytes and len(self._items) > 1:
            _, (_, _, doses, _) = self._items.popitem(last=False)
            total -= sum(d.nbytes for d in doses.values())


class DoseTask(InferTask):
    """Predict the dose of a case; see docs/request-format.md for parameters and response.

    Args:
        models: the shared model provider.
        max_upload_bytes: session upload limit.
        on_candidates: called with (case_id, source, response JSON) after a prediction with two or
            more candidates (the app stores the candidates' Scorecard spread for active learning).
        image_limits: image size limits checked on every header before its data are read
            (None: `ImageLimits.from_env()`).
        jobs: where a request with a `job_id` reports its sampling steps and can be cancelled
            (None: a table of its own).
    """

    def __init__(self, models: ModelProvider, max_upload_bytes: int,
                 on_candidates: Callable[[str, str, dict[str, Any]], None] | None = None,
                 image_limits: ImageLimits | None = None, jobs: JobTable | None = None):
        defaults = DoseParams()
        super().__init__(type=InferType.OTHERS, labels=None, dimension=3,
                         description="Radiotherapy dose (Gy) from CT + structures, with Scorecard and DVH",
                         config={"steps": defaults.steps, "candidates": defaults.candidates, "seed": defaults.seed,
                                 "preview": defaults.preview, "aggregate": list(AGGREGATES),
                                 "template": defaults.template})
        self.models = models
        self.max_upload_bytes = max_upload_bytes
        self.image_limits = image_limits
        self.on_candidates = on_candidates
        self.cache = CandidateCache()
        self.jobs = jobs or JobTable()
        self.param_names = DoseParams.NAMES

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        params = DoseParams.from_request(request)
        if params.request_id is not None:
            return self._stored_candidate(params)
        # 1. the case: CT and a target with a prescription are required for dose prediction
        case = load_request_case(request, self.max_upload_bytes, self.image_limits, with_dose=params.compare)
        case.validate(require=DOSE_PREDICTION_INPUTS)
        if params.compare and (case.dose_gy is None or case.body is None):
            missing = "dose.nii.gz (the reference dose)" if case.dose_gy is None else "a body / possible-dose mask"
            raise TaskError(422, f"case {case.case_id}: parameter 'compare' needs the case's own dose to compare "
                                 f"with, and the case has no {missing}")
        t1 = time.perf_counter()
        # 2. the model
        predictor = self.models.get()
        with self.jobs.track(request, "dose") as job, self.models.run_lock:
            JobTable.start(job)  # a job cancelled while it waited for the model stops here
            pred: DosePrediction = predictor.predict_dose(
                case, steps=params.steps, candidates=params.candidates, seed=params.seed,
                preview=params.preview, aggregate=params.aggregate,
                template=params.scorecard or params.template, on_step=JobTable.step_hook(job))
        t2 = time.perf_counter()
        # 3. response: chosen dose as NIfTI, JSON with Scorecard, DVH, candidates
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix="dose-", delete=False).name
        save_nifti(pred.dose_gy.astype(np.float32), case.grid, out, np.float32)
        request_id = uuid.uuid4().hex
        result = {"task": "dose", "request_id": request_id, **pred.to_dict()}
        result["case"]["source"] = str(request.get(SOURCE_KEY))
        if params.compare:  # after the model lock: the comparison does not hold up other requests
            result["comparison"] = reference_comparison({c.id: c.dose_gy for c in pred.candidates}, case,
                                                        params.scorecard or params.template)
        if len(pred.candidates) > 1:
            # Only multi-candidate results are kept: a single candidate IS the response image, and
            # keeping it pinned 8 MB per preview (a 128^3 float32 dose) until the 512 MB budget was
            # full -- the RSS growth the 15-minute soak of previews showed
            # (benchmarks/results/server_concurrency_soak.md).
            self.cache.put(request_id, case.grid, {c.id: c.dose_gy for c in pred.candidates},
                           {"case_id": case.case_id, "model_version": pred.model_version})
        # The prediction's own stage timings are `timings`; these add what the server spent around it.
        result["request_timings"] = {"load_s": round(t1 - t0, 4), "model_s": round(t2 - t1, 4),
                                     "total_s": round(time.perf_counter() - t0, 4)}
        if self.on_candidates is not None and len(pred.candidates) > 1:
            self.on_candidates(str(request.get(CASE_ID_KEY)), str(request.get(SOURCE_KEY)), result)
        return out, result

    def _stored_candidate(self, params: DoseParams) -> tuple[str, dict[str, Any]]:
        assert params.request_id is not None and params.candidate_id is not None
        grid, dose, meta = self.cache.get(params.request_id, params.candidate_id)
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix="dose-", delete=False).name
        save_nifti(dose, grid, out, np.float32)
        return out, {"task": "dose", "request_id": params.request_id, "candidate_id": params.candidate_id,
                     **meta}
