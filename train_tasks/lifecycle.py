"""What both train tasks do around the training itself: hold validation cases out, keep the trained
model as a version, validate it against the served model, promote it only by the rule.

The validation settings are configs/validation.yaml; a request overrides them with keys prefixed
`validation.` (`{"validation.rule.min_cases": 5}`), checked like the recipe's keys. The core work is
`diffkt3d.training.validation` and `diffkt3d.models.registry`; this module only wires the
datastore, the audit log and the train stats to them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore

from diffkt3d.audit import AuditLog, model_promoted, model_validated
from diffkt3d.errors import ConfigError, DiffKT3DError
from diffkt3d.models.registry import ModelRegistry, UnknownVersionError
from diffkt3d.training.recipe import flat_fields, read_recipe
from diffkt3d.training.validation import PROMOTE, ValidationConfig, load_validation_config, split_cases
from train_tasks.request import CONFIGS

log = logging.getLogger(__name__)

VALIDATION_RECIPE = CONFIGS / "validation.yaml"
PREFIX = "validation"
# `diffkt3d.audit` user of the promotions the rule makes (an administrator's carry their name).
RULE = "validation-rule"


# Fields of a training run's stats that hold a path on the server.
PATH_FIELDS = ("run_dir", "adapter")


def shown_paths(stats: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """The stats as ``/info`` and the train answer show them: paths relative to the app's model
    folder, so a client can name a run without learning the server's file-system layout."""
    out = dict(stats)
    for key in PATH_FIELDS:
        if isinstance(out.get(key), str | Path):
            path = Path(out[key])
            out[key] = path.relative_to(model_dir).as_posix() if path.is_relative_to(model_dir) else path.name
    return out


def split_request(request: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the request without its validation keys, the validation overrides without their prefix)."""
    rest, overrides = {}, {}
    for key, value in request.items():
        head, _, tail = str(key).partition(".")
        if head != PREFIX:
            rest[key] = value
        elif tail:
            overrides[tail] = value
        elif isinstance(value, dict):
            overrides.update(value)
        else:
            raise ConfigError(f"'{PREFIX}' must be a mapping of {VALIDATION_RECIPE.name} fields, found {value!r}")
    return rest, overrides


def validation_config(request: dict[str, Any]) -> ValidationConfig:
    """configs/validation.yaml with the request's `validation.*` overrides (ConfigError naming the file)."""
    try:
        return load_validation_config(VALIDATION_RECIPE, split_request(request)[1])
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(str(VALIDATION_RECIPE), VALIDATION_RECIPE.name)) from None


def validation_param_names() -> frozenset[str]:
    """Every `validation.*` key a train request may send (dotted, or the mappings that hold them)."""
    names = {PREFIX}
    for dotted in flat_fields(read_recipe(VALIDATION_RECIPE)):
        parts = dotted.split(".")
        names.update(".".join([PREFIX, *parts[:i]]) for i in range(1, len(parts) + 1))
    return frozenset(names)


def plan_cases(datastore: Datastore, cfg: ValidationConfig) -> tuple[list[str], list[str]]:
    """(training case ids, validation case ids) among the datastore cases with a dose."""
    ids = list(datastore.get_labeled_images())
    if not ids:
        raise DiffKT3DError("no datastore case has a dose.nii.gz to train on")
    return split_cases(ids, cfg)


def served_version(registry: ModelRegistry, override: Path | None) -> str | None:
    """Registry id of the model being served (None when `--conf model` pins a file outside it)."""
    return None if override is not None else registry.served_id()


def keep_validate_promote(registry: ModelRegistry, audit: AuditLog | None, task: str, weights: Path, run_dir: Path,
                          parent: str | None, recipe: dict[str, Any], train_ids: list[str], val_ids: list[str],
                          datastore: Datastore, cfg: ValidationConfig,
                          item_weights: dict[str, float] | None = None) -> dict[str, Any]:
    """Add the trained weights as a version, validate them against the served version, promote by the rule.

    Returns:
        the train stats' part about the version: its id, parent, decision, reasons and figures.
    """
    from diffkt3d.training.validation import validate_candidate

    version = registry.add(weights, task, parent, recipe, {"train": train_ids, "validation": val_ids})
    reference_id = registry.served_id()
    try:
        reference = registry.path(reference_id)
        reference = reference if reference.is_file() else None
    except UnknownVersionError:
        reference = None
    try:
        report = validate_candidate(registry.path(version.id), reference,
                                    [datastore.get_image_uri(i) for i in val_ids], cfg, item_weights)
    except (DiffKT3DError, ValueError, RuntimeError) as exc:  # e.g. the candidate cannot predict at all
        log.exception("validation of %s failed", version.id)
        report = {"cases": val_ids, "decision": "keep", "reasons": [f"validation failed: {type(exc).__name__}: {exc}"]}
    report["reference_version"] = reference_id if reference is not None else None
    registry.record_validation(version.id, report)
    if audit is not None:
        audit.append(model_validated(task, version.id, run_dir, report))
    promoted = report["decision"] == PROMOTE
    if promoted:
        pointer = registry.promote(version.id, RULE, f"validated against {report['reference_version']} on "
                                                     f"{len(val_ids)} case(s)")
        if audit is not None:
            audit.append(model_promoted(task, pointer))
    log.info("%s: %s (%s)", version.id, "PROMOTED, served from the next request" if promoted else
             "kept as a candidate, not served", "; ".join(report["reasons"]) or "not worse by the rule")
    return {"version": version.id, "parent": parent, "promoted": promoted, "served_version": registry.served_id(),
            "validation": {k: report.get(k) for k in ("cases", "reference_version", "decision", "reasons",
                                                      "candidate_means", "reference_means",
                                                      "paired_mean_difference")}}


def adopt_published(registry: ModelRegistry, model_dir: Path) -> str | None:
    """Keep serving what an earlier server served: before model versions existed, the newest of
    `<model_dir>/any2any/model.pt` and `<model_dir>/scardnft/model.pt` was served. On the first
    start with a registry (nothing promoted yet, no versions) those files become versions (no
    parent, no validation) and the newest is promoted. Returns its id, or None when there was none.
    """
    if (registry.root / "served.json").exists() or len(registry.list()) > int(registry.shipped is not None
                                                                               and registry.shipped.is_file()):
        return None
    published = sorted((p for p in (model_dir / "any2any" / "model.pt", model_dir / "scardnft" / "model.pt")
                        if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    ids = [registry.add(p, p.parent.name, None, {}, {}).id for p in published]
    if not ids:
        return None
    registry.promote(ids[-1], RULE, "served before model versions were kept (newest published model)")
    log.warning("adopted earlier published models as versions %s; serving %s", ids, ids[-1])
    return ids[-1]


__all__ = ["PREFIX", "adopt_published", "VALIDATION_RECIPE", "keep_validate_promote", "plan_cases", "served_version",
           "split_request", "validation_config", "validation_param_names"]
