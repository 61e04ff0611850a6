"""DiffKT3D MONAI Label app.

    monailabel start_server --app monailabel_app --studies sample-data [--conf max_upload_mb 512]

Tasks: infer `dose`, `impute_ct`, `impute_ptv`, `impute_oar` (infer_tasks/), train `any2any`,
`scardnft` (train_tasks/), strategy `preference`; extra routes `/diffkt3d/preferences`,
`/diffkt3d/jobs/{id}` (progress and cancel of a dose or imputation request), `/diffkt3d/cases/{id}` (a case as a zip),
`/diffkt3d/models` (model versions: list, promote, roll back; monailabel_app/model_routes.py).
Request format: docs/request-format.md; install and start: docs/server.md.

`--conf` keys (strings): `model` (checkpoint path, served instead of the model versions),
`model_dir` (where training runs write, default `<app>/model`),
`device`, `vae_dir` (the Wan VAE folder a latent-space checkpoint was trained with; checked by
fingerprint, unused by voxel-space models), `latent_cache_dir` (optional: condition latents on disk
too; they are always cached in memory per case), `max_upload_mb` (default 512: one request body, and what an uploaded archive may
expand to), `max_image_mb` (default 1024: memory one image may take when loaded, checked on its
header before its data are read; `diffkt3d.io.image_guard`), `state_dir` (default `<studies>/.diffkt3d`, holds the
preference store, the model versions and case info), `ct_backbone` (`any2any`, the default, or `prdit`: `impute_ct` then
runs the PRDiT checkpoint `prdit_model` with sampler `prdit_sampler` and predictor multiplier
`prdit_k`; see `diffkt3d.inference.ct_backbone`).

Authentication: off unless `MONAI_LABEL_AUTH_ENABLE=true` (environment, MONAI Label's setting);
then `--conf auth_role_clinician|auth_role_physicist|auth_role_admin|auth_issuer|auth_audience|
auth_verify_audience|auth_jwks_uri|auth_algorithms|auth_leeway_s|auth_jwks_cooldown_s` tune it (monailabel_app/auth.py, docs/security.md).
The audit log is `<state_dir>/audit/audit.jsonl`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

# mlflow tracking is on by default in MONAI Label and breaks with mlflow 3 / without mlflow.
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")

from fastapi import HTTPException  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402

from diffkt3d.audit import AuditLog  # noqa: E402
from diffkt3d.errors import CaseError, ConfigError, DiffKT3DError  # noqa: E402
from diffkt3d.ids import check_id  # noqa: E402
from diffkt3d.inference import default_model_path  # noqa: E402
from diffkt3d.inference.ct_backbone import CTImputationConfig  # noqa: E402
from diffkt3d.io.archive import ArchiveLimits  # noqa: E402
from diffkt3d.io.image_guard import ImageLimits  # noqa: E402
from diffkt3d.models.registry import ModelRegistry  # noqa: E402
from diffkt3d.preferences import PreferenceStore, ServedCandidates  # noqa: E402
from diffkt3d.scorecard import list_templates  # noqa: E402
from infer_tasks.common import (  # noqa: E402
    CASE_ID_KEY,
    SOURCE_KEY,
    PRDiTModelProvider,
    TaskError,
    check_param_keys,
    model_provider,
)
from infer_tasks.dose import DoseTask  # noqa: E402
from infer_tasks.impute import ImputeTask  # noqa: E402
from infer_tasks.jobs import JobTable  # noqa: E402
from monailabel_app.auth import AuthSettings, TokenVerifier  # noqa: E402
from monailabel_app.datastore import CaseFolderDatastore, UnknownCaseError  # noqa: E402
from monailabel_app.model_routes import MODELS_PATH, model_router, served_summary  # noqa: E402
from monailabel_app.pacs_audit import PacsWriteAudit  # noqa: E402
from monailabel_app.pacs_datastore import PacsDatastore, dicomweb_client  # noqa: E402
from monailabel_app.pacs_store import answer_from_pacs  # noqa: E402
from monailabel_app.redact import install_log_redaction, redact  # noqa: E402
from monailabel_app.strategy import PreferenceStrategy, record_candidates  # noqa: E402
from monailabel_app.uploads import UploadLimits  # noqa: E402
from train_tasks import any2any, lifecycle, scardnft  # noqa: E402
from train_tasks.any2any import Any2AnyTrainTask  # noqa: E402
from train_tasks.scardnft import NOT_AVAILABLE, ScardNFTTrainTask  # noqa: E402

log = logging.getLogger(__name__)


class DiffKT3DApp(MONAILabelApp):
    """Dose prediction, imputation, training and preference labelling over case folders."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.model_dir = Path(conf.get("model_dir") or Path(app_dir) / "model")
        self.max_upload_bytes = int(float(conf.get("max_upload_mb", "512")) * 2**20)
        try:
            self.image_limits = ImageLimits.from_setting(conf.get("max_image_mb"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.pacs_url = studies.strip().rstrip("/") if studies.strip().startswith(("http://", "https://")) else None
        self.state_dir = Path(conf.get("state_dir") or (
            Path(app_dir) / "state" / f"pacs-{hashlib.sha256(self.pacs_url.encode()).hexdigest()[:12]}"
            if self.pacs_url else Path(studies) / ".diffkt3d"))
        self.preferences = PreferenceStore(self.state_dir / "preferences")
        self.served = ServedCandidates(self.state_dir / "preferences")  # next to the store it vouches for
        self.audit = AuditLog(self.state_dir / "audit")
        try:
            self.auth = AuthSettings.from_monailabel(conf)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # Model versions: a training run adds one, validation or an administrator promotes one.
        self.registry = ModelRegistry(self.state_dir / "models", default_model_path())
        lifecycle.adopt_published(self.registry, self.model_dir)
        self.conf_model = Path(conf["model"]) if conf.get("model") else None
        self.models = model_provider(self.registry.served_path, conf.get("model"), conf.get("device"),
                                     conf.get("vae_dir"), conf.get("latent_cache_dir"))
        self.ct_imputation = CTImputationConfig.from_conf(conf)
        self.jobs = JobTable()  # every infer task's requests with a job_id: progress, cancel (/diffkt3d/jobs)
        self.ct_models = (PRDiTModelProvider(self.ct_imputation, self.models.run_lock)
                          if self.ct_imputation.uses_prdit else self.models)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="DiffKT3D",
                         description="Any2Any 3D diffusion: radiotherapy dose prediction with a clinical Scorecard",
                         version="0.1.0")

    # -- MONAI Label hooks ---------------------------------------------------------------------
    def init_datastore(self) -> Datastore:
        if self.pacs_url:  # not MONAI Label's DICOMweb datastore: RT objects, nothing downloaded at start
            return PacsDatastore(dicomweb_client(self.pacs_url), self.pacs_url, self.state_dir,
                                 image_limits=self.image_limits)
        return CaseFolderDatastore(self.studies, state_dir=self.state_dir,
                                   archive_limits=ArchiveLimits(self.max_upload_bytes))

    def init_infers(self) -> dict[str, InferTask]:
        return {
            "dose": DoseTask(self.models, self.max_upload_bytes, on_candidates=self._store_candidates,
                             image_limits=self.image_limits, jobs=self.jobs),
            "impute_ct": ImputeTask("ct", self.ct_models, self.max_upload_bytes, self.image_limits, jobs=self.jobs),
            **{f"impute_{t}": ImputeTask(t, self.models, self.max_upload_bytes, self.image_limits, jobs=self.jobs)
               for t in ("ptv", "oar")},
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"any2any": Any2AnyTrainTask(self.model_dir, self.registry, self.models.current_path, self.audit,
                                            override=self.conf_model),
                "scardnft": ScardNFTTrainTask(self.model_dir, self.preferences, self.models.current_path,
                                              self.registry, self.audit, override=self.conf_model)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"preference": PreferenceStrategy(self.preferences)}

    def init_scoring_methods(self) -> dict[str, Any]:
        return {}

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["diffkt3d"] = {"model_version": self.models.version(), "templates": list_templates(),
                            "max_upload_mb": self.max_upload_bytes / 2**20,
                            "max_image_mb": self.image_limits.max_image_mb,
                            "preferences_url": "/diffkt3d/preferences", "auth": self.auth.enabled,
                            "ct_backbone": self.ct_imputation.backbone, "ct_model_version": self.ct_models.version(),
                            "models_url": MODELS_PATH,
                            # which version is served and the figures it was accepted on (--conf model pins a file)
                            "served_model": ({"id": None, "pinned_by_conf_model": True} if self.conf_model
                                             else served_summary(self.registry))}
        return meta

    def on_init_complete(self) -> None:
        super().on_init_complete()
        from monailabel.app import app as api  # the running server's FastAPI object
        from monailabel.config import settings

        from monailabel_app.preference_routes import Provenance
        from monailabel_app.routes import install

        unavailable = {} if ScardNFTTrainTask.available() else {"scardnft": NOT_AVAILABLE}
        verifier = TokenVerifier(self.auth) if self.auth.enabled else None
        install(api, self.preferences, self.audit, self.max_upload_bytes, unavailable, verifier,
                upload_limits=UploadLimits(self.max_upload_bytes, self.image_limits),
                provenance=Provenance(self.served, self._datastore.has_case),  # type: ignore[attr-defined]
                train_params={"any2any": any2any.PARAM_NAMES, "scardnft": scardnft.PARAM_NAMES},
                train_server_only=any2any.SERVER_DECIDED | scardnft.SERVER_DECIDED,
                train_validators={"any2any": any2any.check_request, "scardnft": scardnft.check_request},
                jobs=self.jobs, case_dir=self._datastore.case_dir)  # type: ignore[attr-defined]
        api.include_router(model_router(self.registry), prefix=settings.MONAI_LABEL_API_STR)
        install_log_redaction()
        log.info("authentication %s; audit log %s", "ON" if self.auth.enabled else "off (local demo)",
                 self.audit.path)
        if self.auth.enabled and not self.auth.verify_audience:
            log.warning("token audience NOT checked (auth_verify_audience false): any token of the provider is "
                        "accepted, including tokens issued to other applications")

    # -- infer: check the request before MONAI Label touches the file system -------------------
    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Validate task, case id / session, then run the task; user errors become 4xx."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"unknown infer task {model!r}; tasks: {sorted(self._infers)}")
        try:  # before MONAI Label reads any of them (it reads e.g. `timeout` itself)
            check_param_keys(request, getattr(self._infers[model], "param_names", frozenset()), model)
        except TaskError as exc:
            raise HTTPException(exc.status, redact(str(exc))) from None
        request = dict(request)
        if request.get("session"):
            request[SOURCE_KEY] = "session"
            request[CASE_ID_KEY] = f"session-{request['session'].get('name', 'unknown')}"
        else:
            image = request.get("image")
            if not image:
                raise HTTPException(400, "no case given, or the session_id is unknown or expired: pass "
                                         "image=<case id> or a live session_id (see docs/request-format.md)")
            if os.path.isabs(str(image)):
                raise HTTPException(400, "file-system paths and the `file` upload field are not accepted: send a "
                                         "case with PUT /session/ (see docs/request-format.md)")
            try:
                check_id(image, "case id")
                # Absolute folder from here on, so MONAI Label never resolves the id against its cwd.
                request["image"] = str(self._datastore.case_dir(image))  # type: ignore[attr-defined]
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            except UnknownCaseError as exc:
                raise HTTPException(404, str(exc)) from None
            except CaseError as exc:  # a PACS study that makes no case (422) or a PACS that fails (502)
                raise HTTPException(getattr(exc, "status", 422), redact(str(exc))) from None
            request[SOURCE_KEY] = "datastore"
            request[CASE_ID_KEY] = image
        try:
            answer = super().infer(request, datastore)
            if isinstance(self._datastore, PacsDatastore) and request[SOURCE_KEY] == "datastore":
                answer_from_pacs(self._datastore, request[CASE_ID_KEY], model, request, answer,
                                 getattr(self._infers[model], "param_names", frozenset()),
                                 PacsWriteAudit(self.audit, f"/infer/{model}"))
            return answer
        # Error texts go through `redact`: an uploaded file named after the patient stays out of them.
        except TaskError as exc:
            raise HTTPException(exc.status, redact(str(exc))) from None
        except CaseError as exc:
            raise HTTPException(422, redact(str(exc))) from None
        except (ConfigError, DiffKT3DError, ValueError) as exc:
            raise HTTPException(422, redact(f"{type(exc).__name__}: {exc}")) from None

    def _store_candidates(self, case_id: str, source: str, result: dict[str, Any]) -> None:
        self.served.add(case_id, str(result.get("request_id")), [str(c["id"]) for c in result["candidates"]])
        if source == "datastore":
            record_candidates(self._datastore, case_id, result)

    # -- active learning: a clear 404 and no server paths ------------------------------------
    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's, minus its two faults: an unknown strategy (even its default "random",
        which this app does not have) was a 500, and the answer carried the case's server path."""
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(404, f"unknown active-learning strategy {str(strategy)[:80]!r}; strategies: "
                                     f"{sorted(self._strategies)}")
        result = self._strategies[strategy](request, self.datastore())
        return result if result and result.get("id") else {}
