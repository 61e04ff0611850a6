"""HTTP additions to MONAI Label's FastAPI app: preference records, the audit trail, authentication
and roles (monailabel_app/auth.py), an upload size limit, inference off the event loop, a clear
answer for training tasks this build cannot run, datastore refusals and MONAI Label's invalid-input
errors as 4xx instead of 500, and datastore uploads that need an explicit case id.

MONAI Label 0.8.5 has no hook for app-defined routes, but its FastAPI object (`monailabel.app.app`)
is importable and routes may be added to it at start-up (`MONAILabelApp.on_init_complete`, which
runs in the server's lifespan, before the first request). See `install()`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    BackgroundTasks,
    FastAPI,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    UploadFile,
)
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import User
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffkt3d.audit import AuditLog
from diffkt3d.errors import CaseError
from diffkt3d.ids import check_id
from diffkt3d.preferences import PreferenceStore
from infer_tasks.jobs import JobTable
from monailabel_app.auth import (
    ANONYMOUS,
    STATE_AUDIT,
    STATE_IDENTITY,
    AuthError,
    AuthMiddleware,
    Identity,
    TokenVerifier,
    UserDep,
)
from monailabel_app.case_routes import case_router
from monailabel_app.job_routes import job_router
from monailabel_app.pacs_audit import acting_as
from monailabel_app.preference_routes import Provenance, preference_router
from monailabel_app.redact import redact
from monailabel_app.request_checks import check_infer_source, infer_params, train_endpoint
from monailabel_app.uploads import UploadLimits, session_upload_endpoint

log = logging.getLogger(__name__)

AUDIT_PATH = "/diffkt3d/audit"


class UploadTooLarge(StarletteHTTPException):
    """Raised from inside body reading; an HTTPException so FastAPI's body parser passes it on as is."""

    def __init__(self, limit_bytes: int):
        super().__init__(413, f"request body larger than the server's upload limit of "
                              f"{limit_bytes / 2**20:.0f} MB (max_upload_mb)")


class UploadLimitMiddleware:
    """Reject request bodies above `max_bytes` with 413 before they are written to disk.

    Checks Content-Length up front and, for chunked uploads, counts bytes as they arrive.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except UploadTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": UploadTooLarge(self.max_bytes).detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _identity(request: Request) -> Identity | None:
    return getattr(request.state, STATE_IDENTITY, None)


def audit_router(audit: AuditLog) -> APIRouter:
    """GET /diffkt3d/audit: the audit trail (admin role only when auth is on, see auth.POLICY)."""
    router = APIRouter(prefix=AUDIT_PATH, tags=["DiffKT3D audit"])

    @router.get("", summary="Audit trail: who recorded preferences, trained, changed models or data")
    def read_audit(user: UserDep, user_name: Annotated[str | None, Query(alias="user")] = None,
                   action: Annotated[str | None, Query()] = None) -> dict[str, Any]:
        entries, skipped = audit.read(user=user_name, action=action)
        return {"entries": [e.__dict__ for e in entries], "count": len(entries), "skipped_lines": skipped}

    return router


def _login_route(api: FastAPI, verifier: TokenVerifier) -> None:
    """POST /auth/token (username, password form) -> the provider's token answer.

    Replaces MONAI Label's, which turns a wrong password into a 500 (unguarded raise_for_status).
    Resource-owner password grant for the Slicer module; a browser client would use the
    provider's own login page instead.
    """
    import requests

    def login(username: Annotated[str, Form()], password: Annotated[str, Form()]) -> dict[str, Any]:
        try:
            url = verifier.token_endpoint()
            r = requests.post(url, data={"grant_type": "password", "client_id": verifier.settings.client_id,
                                         "username": username, "password": password},
                              timeout=verifier.settings.timeout_s)
        except AuthError as exc:
            raise HTTPException(exc.status, exc.detail) from None
        except requests.RequestException as exc:
            raise HTTPException(503, f"identity provider unreachable ({type(exc).__name__})") from None
        if r.status_code in (400, 401, 403):
            raise HTTPException(401, "login failed: wrong user name or password (or the account may not "
                                     "use password login)", headers={"WWW-Authenticate": "Bearer"})
        if r.status_code != 200:
            raise HTTPException(502, f"identity provider answered HTTP {r.status_code} to the login")
        return r.json()

    _add_first(api, f"{settings.MONAI_LABEL_API_STR}/auth/token", login, "POST")


def _current_user(request: Request) -> User:
    """MONAI Label's `get_current_user`, answered from AuthMiddleware's identity.

    The middleware has already refused requests whose role does not fit the policy, so MONAI
    Label's own `RBAC` checks are given all of MONAI Label's roles for an authenticated user.
    """
    identity = _identity(request)
    if identity is None or not identity.roles:
        return User(username=ANONYMOUS, roles=[])
    return User(username=identity.username, roles=[
        settings.MONAI_LABEL_AUTH_ROLE_ADMIN, settings.MONAI_LABEL_AUTH_ROLE_REVIEWER,
        settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR, settings.MONAI_LABEL_AUTH_ROLE_USER])


def _threaded_infer_route(api: FastAPI) -> None:
    """POST /infer/{model} as a plain `def` route, so FastAPI runs it in its thread pool.

    MONAI Label's own route is `async def` and calls the (long, synchronous) inference directly,
    which blocks the event loop: while one clinician's dose is computed, nobody else gets even
    `/info/` or can save a preference. Same parameters, same `run_inference`, just off the loop.
    """
    # Imported here: monailabel.endpoints.infer pulls in all of MONAI (slow), only needed by a server.
    from monailabel.endpoints.infer import ResultType, run_inference

    def infer(background_tasks: BackgroundTasks, model: str, user: UserDep, request: Request,
              image: str = "", session_id: str = "", params: Annotated[str, Form()] = "{}",
              file: Annotated[UploadFile | None, File()] = None, label: Annotated[UploadFile | None, File()] = None,
              output: str | None = None):
        # MONAI Label's json.loads is unguarded and an empty case is its 500: both are the client's error
        infer_params(params)
        check_infer_source(image, session_id, file is not None)
        kinds = [k.value for k in ResultType]
        if output is not None and output not in kinds:
            raise HTTPException(status_code=422, detail=f"output must be one of {kinds}, found {output!r}")
        # the task runs here, in this thread: a PACS write it makes is audited under this user (pacs_audit.py)
        with acting_as(getattr(request.state, STATE_IDENTITY, None)):
            return run_inference(background_tasks, model, image, session_id, params, file, label,
                                 None if output is None else ResultType(output))

    _add_first(api, f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}", infer, "POST")


NO_CASE_ID = ("a datastore upload needs an explicit case id: PUT /datastore/image?image=<case id>, a "
              "pseudonymous id (never a patient name or record number); the uploaded file's name is never "
              "used as the case id, because file names often carry the patient's name")


def _datastore_upload_route(api: FastAPI) -> None:
    """PUT /datastore/image (and MONAI Label's deprecated PUT /datastore/) with a required case id.

    MONAI Label 0.8.5 makes the uploaded file's name the case id when `image` is missing, and file
    names from a clinic's exports often carry the patient's name, which would then sit in the
    studies folder, every URL, the log and the audit trail. Here a missing id is a 400 (auth on or
    off: the request format documents case ids as chosen by the client), a bad id a 400 before the
    upload is stored; then MONAI Label's own `add_image` runs with the id.
    """
    def add_image(request: Request, background_tasks: BackgroundTasks, file: Annotated[UploadFile, File()],
                  user: UserDep, image: str | None = None, params: Annotated[str, Form()] = "{}") -> dict[str, Any]:
        if not image:
            raise HTTPException(status_code=400, detail=NO_CASE_ID)
        try:
            check_id(image, "case id")
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=redact(str(exc))) from None
        try:
            json.loads(params or "{}")
        except json.JSONDecodeError as exc:
            raise HTTPException(status_code=400, detail=f"form field 'params' is not valid JSON: {exc}") from None
        getattr(request.state, STATE_AUDIT, {})["case_id"] = image
        from monailabel.endpoints.datastore import add_image as monailabel_add_image

        return monailabel_add_image(background_tasks, image, params, file, user.username)

    for path in ("/datastore/image", "/datastore/"):
        _add_first(api, f"{settings.MONAI_LABEL_API_STR}{path}", add_image, "PUT")


def _model_upload_route(api: FastAPI) -> None:
    """PUT /model/{model}: a clear 404 for DiffKT3D's tasks instead of MONAI Label's 500.

    DiffKT3D's infer tasks have no MONAI Label model file (models are put in service by training
    runs or `--conf model`), so MONAI Label answers 500 "Model File Name NOT configured"; its GET
    and DELETE already answer 404 for the same reason. A task that does have a file goes on to
    MONAI Label's own upload.
    """
    def upload(background_tasks: BackgroundTasks, model: str, file: UploadFile, user: UserDep):
        from monailabel.endpoints.model import update_model
        from monailabel.interfaces.utils.app import app_instance

        if not app_instance().model_file(model, validate=False):
            raise HTTPException(status_code=404, detail=(
                f"no model file for {model!r} can be replaced through /model/: DiffKT3D models are put in "
                "service by training runs (POST /train/any2any, /train/scardnft) or the server's --conf model"))
        return update_model(background_tasks, model, file)

    _add_first(api, f"{settings.MONAI_LABEL_API_STR}/model/{{model}}", upload, "PUT")


async def _case_error(request: Request, exc: Exception) -> JSONResponse:
    """A datastore refusal (`CaseError`, status from monailabel_app.datastore) as a 4xx with its reason."""
    return JSONResponse({"detail": redact(str(exc))}, status_code=getattr(exc, "status", 422))


async def _monailabel_error(request: Request, exc: Exception) -> JSONResponse:
    """MONAI Label's INVALID_INPUT errors (unknown train task or scoring method ...) as 400; others stay 500."""
    if isinstance(exc, MONAILabelException) and exc.error == MONAILabelError.INVALID_INPUT:
        return JSONResponse({"detail": redact(exc.msg)}, status_code=400)
    raise exc


def _add_first(api: FastAPI, path: str, endpoint, method: str) -> None:
    """Add a route that wins over MONAI Label's (Starlette matches routes in order)."""
    api.router.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    route = api.router.routes.pop()
    assert isinstance(route, APIRoute)
    api.router.routes.insert(0, route)


def _unavailable(reason: str):
    def endpoint() -> None:
        raise HTTPException(status_code=503, detail=reason)

    return endpoint


def install(api: FastAPI, store: PreferenceStore, audit: AuditLog, max_upload_bytes: int,
            unavailable_trainers: dict[str, str], verifier: TokenVerifier | None = None,
            threaded_infer: bool = True, upload_limits: UploadLimits | None = None, *, provenance: Provenance,
            train_params: dict[str, frozenset[str]] | None = None, train_server_only: frozenset[str] = frozenset(),
            train_validators: dict[str, Callable[[dict[str, Any]], None]] | None = None,
            jobs: JobTable | None = None, case_dir: Callable[[str], Path] | None = None) -> None:
    """Add our routes and middleware to MONAI Label's FastAPI app (once, at server start-up).

    Args:
        api: `monailabel.app.app`.
        store: the preference store.
        audit: the audit log.
        provenance: what a preference's case and candidates are checked against (preference_routes).
        train_params: train task -> the body keys it accepts (POST /train/{task} refuses others, 422).
        train_server_only: training keys that name server paths (refused with that reason).
        train_validators: train task -> a dry run of its configuration (bad values refused, 422).
        max_upload_bytes: request body limit.
        unavailable_trainers: train task name -> reason; POST /train/<name> answers 503 with it
            instead of starting a subprocess that could only fail.
        verifier: token verifier when authentication is on (MONAI_LABEL_AUTH_ENABLE), else None.
        threaded_infer: replace MONAI Label's event-loop-blocking POST /infer/{model} (see
            `_threaded_infer_route`); False only for in-process tests without MONAI Label's app.
        upload_limits: limits of PUT /session/ (monailabel_app/uploads.py); default
            `max_upload_bytes` and the default image limits.
        jobs: the infer tasks' job table, served at /diffkt3d/jobs (None: no job routes).
        case_dir: the datastore's case id -> folder, for GET /diffkt3d/cases/{id} (None: no route).
    """
    from monailabel.endpoints.user.auth import get_current_user

    api.include_router(preference_router(store, provenance, rater_from_token=verifier is not None),
                       prefix=settings.MONAI_LABEL_API_STR)
    api.include_router(audit_router(audit), prefix=settings.MONAI_LABEL_API_STR)
    if jobs is not None:
        api.include_router(job_router(jobs), prefix=settings.MONAI_LABEL_API_STR)
    if case_dir is not None:
        api.include_router(case_router(case_dir), prefix=settings.MONAI_LABEL_API_STR)
    if train_params:  # before the 503 routes below, which then come first (`_add_first`)
        _add_first(api, f"{settings.MONAI_LABEL_API_STR}/train/{{model}}",
                   train_endpoint(train_params, train_server_only, train_validators), "POST")
    for name, reason in unavailable_trainers.items():
        _add_first(api, f"{settings.MONAI_LABEL_API_STR}/train/{name}", _unavailable(reason), "POST")
    if threaded_infer:
        _threaded_infer_route(api)
    _datastore_upload_route(api)
    _model_upload_route(api)
    _add_first(api, f"{settings.MONAI_LABEL_API_STR}/session/",
               session_upload_endpoint(upload_limits or UploadLimits(max_upload_bytes)), "PUT")
    api.add_exception_handler(CaseError, _case_error)
    api.add_exception_handler(MONAILabelException, _monailabel_error)
    if verifier is not None:
        _login_route(api, verifier)
        api.dependency_overrides[get_current_user] = _current_user
    # Starlette builds its middleware stack lazily on the first call (the lifespan we are running
    # in); clearing it makes the next request rebuild the stack. Added last = outermost: the upload
    # limit answers 413 before anything reads the body, then auth, then MONAI Label's CORS.
    api.middleware_stack = None
    api.add_middleware(AuthMiddleware, verifier=verifier, audit=audit, api_prefix=settings.MONAI_LABEL_API_STR)
    api.add_middleware(UploadLimitMiddleware, max_bytes=max_upload_bytes)
