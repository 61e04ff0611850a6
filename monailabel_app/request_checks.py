"""Request parameters checked at the HTTP edge, before MONAI Label acts on them.

MONAI Label merges a request's `params` field into the request it hands the app, so `params`
could overwrite what the route itself decided (`image`, `session`) and a JSON list or an empty
case turned into a 500 inside MONAI Label. Training parameters are checked here too: a training
run starts in a subprocess, where a refused parameter would only show up in its log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import Body, HTTPException

from diffkt3d.errors import DiffKT3DError
from infer_tasks.common import SERVER_KEYS
from monailabel_app.auth import UserDep

NO_CASE = ("no case given: pass image=<case id> (a datastore case) or session_id=<id> (an uploaded session); "
           "see docs/request-format.md")


def infer_params(params: str) -> dict[str, Any]:
    """The `params` form field of POST /infer/{task} as a JSON object.

    Raises:
        HTTPException: 400 (not JSON, not an object) or 422 (sets a key the route decides).
    """
    try:
        parsed = json.loads(params or "{}")
    except json.JSONDecodeError as exc:
        raise HTTPException(status_code=400, detail=f"form field 'params' is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise HTTPException(status_code=400, detail="form field 'params' must be a JSON object of task "
                                                    f"parameters, found a JSON {type(parsed).__name__}")
    reserved = sorted(set(parsed) & SERVER_KEYS)
    if reserved:
        raise HTTPException(status_code=422, detail=f"'params' may not set {reserved}: the case is chosen with "
                                                    "the image= or session_id= query parameter")
    return parsed


def check_infer_source(image: str, session_id: str, has_file: bool) -> None:
    """A request names a case (image id or session) or carries a file; else 400 (MONAI Label: 500)."""
    if not image.strip() and not session_id.strip() and not has_file:
        raise HTTPException(status_code=400, detail=NO_CASE)


def check_train_params(task: str, params: Any, known: Mapping[str, frozenset[str]],
                       server_only: frozenset[str] = frozenset(),
                       validators: Mapping[str, Callable[[dict[str, Any]], None]] | None = None) -> None:
    """Refuse a training body that is not an object, or has keys the task does not know.

    Args:
        task: the train task name.
        params: the JSON body.
        known: train task -> the parameter names it accepts (tasks not listed are MONAI Label's to refuse).
        server_only: names the server decides (paths); refused with that reason.
        validators: train task -> a dry run that builds the task's configuration from the body and
            raises ConfigError / ValueError on a bad value, so a mistyped value is a 422 now
            instead of a training job that fails in the background.
    """
    if task not in known or params is None:
        return
    if not isinstance(params, dict):
        raise HTTPException(status_code=422, detail=f"train task {task!r}: the body must be a JSON object of "
                                                    f"parameters, found a JSON {type(params).__name__}")
    paths = sorted(set(params) & server_only)
    if paths:
        raise HTTPException(status_code=422, detail=f"train task {task!r}: {paths} are decided by the server "
                                                    "(server paths and run settings) and cannot be sent")
    unknown = sorted(str(k) for k in set(params) - known[task])
    if unknown:
        raise HTTPException(status_code=422, detail=f"train task {task!r}: unknown parameter(s) {unknown[:20]}; "
                                                    f"known parameters: {sorted(known[task])}")
    if validators and task in validators:
        try:
            validators[task](params)
        except (DiffKT3DError, ValueError, TypeError) as exc:
            raise HTTPException(status_code=422, detail=f"train task {task!r}: {exc}") from None


def train_endpoint(known: Mapping[str, frozenset[str]], server_only: frozenset[str] = frozenset(),
                   validators: Mapping[str, Callable[[dict[str, Any]], None]] | None = None):
    """POST /train/{model}: `check_train_params`, then MONAI Label's own `run_model` (routes.install)."""
    from monailabel.endpoints.train import run_model

    def train(model: str, user: UserDep, params: Annotated[Any, Body()] = None, run_sync: bool = False,
              enqueue: bool = False) -> Any:
        check_train_params(model, params, known, server_only, validators)
        return run_model(model, params, run_sync, enqueue)

    return train
