"""A train request's body -> overrides of the task's recipe file.

The recipe (configs/*.yaml) holds every default; a request only names what it changes, with the
recipe's own field names (`stages.dose.steps`, `model_preset`, `iterations` ...). The core
(`diffkt3d.training.recipe`) refuses unknown names; this layer only drops what is not a recipe
field: the keys MONAI Label adds itself and the fields the server decides (the data, the output).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from diffkt3d.errors import ConfigError
from diffkt3d.training.recipe import flat_fields, read_recipe

log = logging.getLogger(__name__)

# Recipes shipped with the repository, beside the app.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Keys MONAI Label puts in every train request (the task name, its GPU selection, bundle and
# rank bookkeeping): not recipe fields.
MONAI_LABEL_KEYS = frozenset({"model", "gpus", "bundle_path", "local_rank"})


def recipe_overrides(request: Mapping[str, Any], server_decided: Iterable[str]) -> dict[str, Any]:
    """The request's recipe overrides: MONAI Label's own keys dropped, server-decided fields ignored (logged)."""
    decided = set(server_decided)
    ignored = sorted(k for k in request if k.split(".")[0] in decided)
    if ignored:
        log.warning("request keys decided by the server, ignored: %s", ignored)
    return {k: v for k, v in request.items() if k not in MONAI_LABEL_KEYS and k.split(".")[0] not in decided}


def editable_fields(recipe: Path, server_decided: Iterable[str]) -> dict[str, Any]:
    """The recipe's fields a request may override, as dotted keys with the recipe's values (for `/info/`)."""
    decided = set(server_decided)
    return {k: v for k, v in flat_fields(read_recipe(recipe)).items() if k.split(".")[0] not in decided}


def dry_run(build: Callable[[], Any], recipe: Path) -> None:
    """Build a task's configuration from a request without training, for the HTTP layer's check.

    A bad value then answers 422 at once instead of failing the training job in the background;
    the message names the recipe by file name, not by its server path.
    """
    try:
        build()
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(str(recipe), recipe.name)) from None


def param_names(recipe: Path, server_decided: Iterable[str]) -> frozenset[str]:
    """Every key a client may send to a train task: the recipe's editable fields, dotted or as the
    nested mapping that holds them (`stages.dose.steps`, `stages`), and MONAI Label's own keys.

    The HTTP layer refuses other keys before a training process starts; the recipe loader checks
    the nested contents again when it applies them.
    """
    names: set[str] = set(MONAI_LABEL_KEYS)
    for dotted in editable_fields(recipe, server_decided):
        parts = dotted.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(names)
