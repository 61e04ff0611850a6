"""Training recipes: a YAML file is the one source of a run's settings; overrides go on top of it.

The command line (`diffkt3d train --set KEY=VALUE`), the MONAI Label train tasks (the request body)
and the distributed launcher all build their config here, so a server run and a command-line run
of the same recipe with the same overrides are the same run. An override names a field by its
dotted path (`stages.dose.steps`, `model_overrides.depth`, `reward.w_mae`) or as a nested mapping
(`{"stages": {"dose": {"steps": 10}}}`); it replaces that one field and leaves the rest of the
recipe as written, so shortening Stage B keeps its loss_norm, loss_region and budgets. A key that
is not a field of the recipe is refused with the list of known keys: a misspelt override must not
silently train the default.

Data folders (`train_roots`, `val_roots`) are written relative to a data root given on the command
line (`--data-root DIR`) or in the environment (`DIFFKT3D_DATA_ROOT`), so a recipe names the
dataset (`openkbp/train`) rather than where one machine keeps it; an absolute path stays as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from diffkt3d.errors import ConfigError
from diffkt3d.training.config import StageConfig, TrainConfig

if TYPE_CHECKING:
    from diffkt3d.training.full_res_config import FullResTrainConfig
    from diffkt3d.training.scardnft import ScardNFTConfig

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "DIFFKT3D_DATA_ROOT"
DATA_ROOT_OPTION = "--data-root"
# Config fields holding data folders, resolved against the data root.
DATA_FIELDS = ("train_roots", "val_roots")
# The names the docs use for the two supervised stages.
STAGE_ALIASES = {"A": "any2any", "B": "dose"}


# -- reading -----------------------------------------------------------------------------------
def read_recipe(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a recipe file, or a ConfigError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"training config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"training config {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLI's `--set`) -> overrides; VALUE is read as YAML (`[32, 32, 32]`, `l1`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. stages.dose.steps=500), found {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
        out[key.strip()] = _yaml_1_1_float(value)
    return out


def _yaml_1_1_float(value: Any) -> Any:
    """`3e-4` as a number: YAML 1.1 (PyYAML) reads an exponent without a dot as a string."""
    if isinstance(value, str) and any(c.isdigit() for c in value):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# -- overrides ---------------------------------------------------------------------------------
def _field_names(cls: type) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls))


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested override mappings -> dotted keys; the leaves are the values to set."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _check_type(key: str, old: Any, new: Any) -> Any:
    """Refuse an override whose type cannot stand for the recipe's value (a string for a step count)."""
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        ok = isinstance(old, bool) and isinstance(new, bool)
    elif isinstance(old, (int, float)):
        ok = isinstance(new, (int, float))  # YAML writes 13 for a float budget: numbers stand for numbers
    elif isinstance(old, (list, tuple)):
        ok = isinstance(new, (list, tuple, int))  # an int grid is a cube
    else:
        ok = isinstance(new, type(old))
    if not ok:
        raise ConfigError(f"override {key}: expected {type(old).__name__} like {old!r}, found {new!r}")
    return new


def _set_path(target: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    """Set target[parts[0]][parts[1]]... = value inside a free-form mapping field."""
    for part in parts[:-1]:
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} holds {child!r}, not a mapping")
        target = child
    target[parts[-1]] = _check_type(key, target.get(parts[-1]), value)


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any] | None, cls: type,
                    source: str = "recipe") -> dict[str, Any]:
    """`data` (a recipe mapping for dataclass `cls`) with every override set in place.

    Args:
        data: the recipe as read from YAML (not modified).
        overrides: dotted keys and/or nested mappings; `stages.<name>.<field>` addresses one stage
            of a TrainConfig by its name (`any2any`/`dose`, or `A`/`B`).
        cls: TrainConfig or ScardNFTConfig: its fields are the known keys.
        source: named in errors (the recipe file, the request ...).
    """
    out = copy.deepcopy(dict(data))  # (keeps key order: target_weights' order is the sampler's)
    known = _field_names(cls)
    for key, value in _flatten(overrides or {}).items():
        try:
            _apply_one(out, key, value, cls, known, source)
        except ConfigError as exc:
            raise ConfigError(str(exc) if str(exc).startswith(source) else f"{source}: {exc}") from None
    return out


def _apply_one(out: dict[str, Any], key: str, value: Any, cls: type, known: list[str], source: str) -> None:
    """One dotted override set in `out` (a top-level field, a key inside a mapping field or a stage field)."""
    head, *rest = key.split(".")
    if head not in known:
        raise ConfigError(f"{source}: unknown override {key!r}; known keys: {known}")
    if head == "stages" and cls is TrainConfig:
        _set_stage_field(out, rest, value, key, source)
    elif rest:
        current = out.setdefault(head, {})
        if not isinstance(current, dict):
            raise ConfigError(f"{source}: override {key!r}: {head} is {current!r}, not a mapping")
        _set_path(current, rest, value, key)
    else:
        default = getattr(cls(), head) if head not in out else out[head]
        out[head] = _check_type(key, default, value)


def _set_stage_field(data: dict[str, Any], parts: list[str], value: Any, key: str, source: str) -> None:
    """stages.<stage>.<field>[.<key>] = value, on the stage of that name (the others untouched)."""
    stages = data.setdefault("stages", [dataclasses.asdict(StageConfig("any2any")),
                                        dataclasses.asdict(StageConfig("dose"))])
    names = [s.get("name", "any2any") for s in stages]
    if len(parts) < 2:
        raise ConfigError(f"{source}: override {key!r}: a stage field is set as stages.<stage>.<field> "
                          f"with a stage among {names} (e.g. stages.dose.steps)")
    name, field_name, sub = STAGE_ALIASES.get(parts[0], parts[0]), parts[1], parts[2:]
    if name not in names:
        raise ConfigError(f"{source}: override {key!r}: no stage {parts[0]!r} in the recipe; stages: {names}")
    stage_fields = _field_names(StageConfig)
    if field_name not in stage_fields or field_name == "name":
        raise ConfigError(f"{source}: unknown override {key!r}; known stage keys: "
                          f"{[f for f in stage_fields if f != 'name']}")
    stage = stages[names.index(name)]
    if sub:
        _set_path(stage.setdefault(field_name, dict(getattr(StageConfig(name), field_name))), sub, value, key)
    else:
        stage[field_name] = _check_type(key, stage.get(field_name, getattr(StageConfig(name), field_name)), value)


# -- data root ---------------------------------------------------------------------------------
def data_root_from(data_root: str | Path | None) -> tuple[Path | None, str]:
    """The data root (the option's value, else the environment variable) and where it came from."""
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser(), f"{DATA_ROOT_OPTION} {data_root}"
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser(), f"{DATA_ROOT_ENV}={env}"
    return None, ""


def resolve_data_paths(data: dict[str, Any], data_root: str | Path | None, source: str,
                       fields: Iterable[str] = DATA_FIELDS) -> dict[str, Any]:
    """`data` with its relative data folders joined to the data root; every folder must exist."""
    root, origin = data_root_from(data_root)
    out = dict(data)
    for name in fields:
        entries = out.get(name) or []
        if isinstance(entries, (str, Path)):
            entries = [entries]
        resolved = []
        for entry in entries:
            path = Path(str(entry)).expanduser()
            if not path.is_absolute():
                if root is None:
                    raise ConfigError(f"{source}: {name} entry {str(entry)!r} is relative to the data root, and "
                                      f"none is set: pass {DATA_ROOT_OPTION} DIR or set {DATA_ROOT_ENV}")
                if not root.is_dir():
                    raise ConfigError(f"{source}: data root {root} (from {origin}) is not a folder; pass "
                                      f"{DATA_ROOT_OPTION} DIR or set {DATA_ROOT_ENV} to the folder holding "
                                      f"{str(entry)!r}")
                path = root / path
            if not path.is_dir():
                hint = "" if Path(str(entry)).expanduser().is_absolute() else (
                    f" (data root from {origin}); set {DATA_ROOT_OPTION} DIR or {DATA_ROOT_ENV} to the folder "
                    f"that holds {str(entry)!r}")
                raise ConfigError(f"{source}: {name} folder not found: {path}{hint}")
            resolved.append(str(path))
        if name in out:
            out[name] = resolved
    return out


# -- the two recipes ---------------------------------------------------------------------------
def build_train_config(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                       data_root: str | Path | None = None, source: str = "training config") -> TrainConfig:
    """A recipe mapping + overrides -> TrainConfig, data folders resolved.

    A stage whose `steps` is 0 is left out (a request for Stage B only sets `stages.any2any.steps`
    to 0); with no stage left there is nothing to train, which is an error.
    """
    merged = apply_overrides(data, overrides, TrainConfig, source)
    stages = merged.get("stages")
    if stages is not None:
        kept = [s for s in stages if int(s.get("steps", 1)) != 0]
        if not kept:
            raise ConfigError(f"{source}: every stage has steps 0; nothing to train")
        merged["stages"] = kept
    return TrainConfig.from_dict(resolve_data_paths(merged, data_root, source))


def load_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None,
                data_root: str | Path | None = None) -> TrainConfig:
    """The supervised recipe at `path` (e.g. configs/cpu-default.yaml) with `overrides` applied.

    Args:
        path: the recipe YAML (TrainConfig fields).
        overrides: dotted or nested field overrides (see the module docstring).
        data_root: folder that relative `train_roots`/`val_roots` are under; None = $DIFFKT3D_DATA_ROOT.
    """
    cfg = build_train_config(read_recipe(path), overrides, data_root, source=str(path))
    for spec in cfg.full_res_stages:  # stage recipes are named relative to the recipe that lists them
        if not Path(spec["recipe"]).is_absolute():
            spec["recipe"] = str(Path(path).parent / spec["recipe"])
    return cfg


def load_scardnft_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None,
                         data_root: str | Path | None = None) -> ScardNFTConfig:
    """The ScardNFT recipe at `path` (e.g. configs/scardnft-cpu.yaml) with `overrides` applied.

    Same rules as :func:`load_recipe`: dotted or nested overrides (`reward.w_mae`), unknown keys
    refused, relative `train_roots` under the data root.
    """
    from diffkt3d.training.scardnft import ScardNFTConfig

    merged = apply_overrides(read_recipe(path), overrides, ScardNFTConfig, str(path))
    return ScardNFTConfig.from_dict(resolve_data_paths(merged, data_root, str(path), fields=("train_roots",)))


def load_full_res_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None,
                         data_root: str | Path | None = None) -> FullResTrainConfig:
    """The full-res stage recipe at `path` (e.g. configs/full-res-dose.yaml) with `overrides` applied.

    Same rules as :func:`load_recipe`; the stage's fields are set as `stage.<field>`
    (`--set stage.coarse_input=false` makes the peer).
    """
    from diffkt3d.training.full_res_config import FullResTrainConfig

    merged = apply_overrides(read_recipe(path), overrides, FullResTrainConfig, str(path))
    try:
        return FullResTrainConfig.from_dict(resolve_data_paths(merged, data_root, str(path), fields=("train_roots",)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def flat_fields(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config mapping as dotted keys (stages by name), e.g. for a client to show and edit."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key == "stages" and not prefix and isinstance(value, list):
            for stage in value:
                out.update(flat_fields({k: v for k, v in stage.items() if k != "name"},
                                       f"stages.{stage.get('name', 'any2any')}."))
        elif isinstance(value, Mapping) and value:
            out.update(flat_fields(value, path + "."))
        else:
            out[path] = list(value) if isinstance(value, tuple) else value
    return out
