"""Scorecard templates: institutional scoring rules as data (YAML), validated on load.

A template is a list of items. Each item names a structure selector, a DVH metric (grammar of
:func:`diffkt3d.metrics.dvh.parse_metric`), piecewise-linear points ``[[value, score], ...]``
that turn the metric value into a score, a weight, and optionally a hard constraint (a
``min`` / ``max`` bound with a hinge penalty). Example::

    name: openkbp_hn
    version: 1
    items:
      - id: ptv_high_d95
        structure: "target:highest"       # or "SpinalCord", "re:(?i)spinal.?cord", "glob:*Parotid*"
        metric: "D95%_%Rx"                # D95 as % of the structure's prescription
        points: [[90, 0], [95, 6], [100, 10]]
        weight: 3
        hard: {min: 95, penalty: 1.0}     # penalty per unit (%Rx here) below 95
        required: false

Structure selectors (all name matching is case-insensitive):

* ``"PTV70"`` or ``"name:PTV70"``: that exact name.
* ``"re:<regex>"``: every structure whose whole name matches the regular expression.
* ``"glob:<pattern>"``: every structure whose name matches the shell pattern (``*Parotid*``).
* ``"target:highest"``: the target(s) with the highest prescription; ``"target:lower"``: every
  target prescribed less than the highest; ``"target:lowest"``: the lowest-prescribed target(s)
  when lower than the highest; ``"target:any"``: every target; ``"oar:any"``: every OAR.

A selector that matches several structures scores the item once per structure (both parotids).

Prescription: metrics with ``%Rx`` need one. ``rx: structure`` (the default for targets) uses
the matched structure's own prescription; ``rx: case_max`` (the default otherwise) the case's
highest prescription; a number is a fixed prescription in Gy.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffkt3d.data.case import Case, Structure
from diffkt3d.errors import ConfigError
from diffkt3d.metrics.dvh import metric_unit, parse_metric

log = logging.getLogger(__name__)

# Shipped templates are package data of diffkt3d.scorecard (pyproject: templates/*.yaml).
TEMPLATE_PACKAGE = "diffkt3d.scorecard"
TEMPLATE_DIR = "templates"
TEMPLATE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml")

_ROLE_SELECTORS: dict[str, tuple[str, ...]] = {
    "target": ("highest", "lower", "lowest", "any"),
    "oar": ("any",),
}
_ITEM_KEYS = {"id", "label", "structure", "metric", "points", "weight", "hard", "required", "rx",
              "source"}
_TEMPLATE_KEYS = {"name", "version", "description", "site", "items"}
_HARD_KEYS = {"min", "max", "penalty"}


# -- selectors ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selector:
    """A parsed structure selector.

    Args:
        text: the selector as written in the template.
        kind: "name", "re", "glob" or "role".
        value: the name / regex / glob / "<role>:<which>".
    """

    text: str
    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse ``text``; raises ValueError with the reason when it is not a valid selector."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"structure selector must be a non-empty string, got {text!r}")
        text = text.strip()
        prefix, sep, rest = text.partition(":")
        if not sep:
            return cls(text, "name", text)
        prefix = prefix.strip().lower()
        rest = rest.strip()
        if prefix == "name":
            return cls(text, "name", rest)
        if prefix == "re":
            try:
                re.compile(rest)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {rest!r}: {exc}") from None
            return cls(text, "re", rest)
        if prefix == "glob":
            return cls(text, "glob", rest)
        if prefix in _ROLE_SELECTORS:
            which = rest.lower()
            if which not in _ROLE_SELECTORS[prefix]:
                raise ValueError(f"unknown role selector {text!r}; expected {prefix}:"
                                 + f" one of {', '.join(_ROLE_SELECTORS[prefix])}")
            return cls(text, "role", f"{prefix}:{which}")
        raise ValueError(f"unknown selector prefix {prefix!r} in {text!r}; expected name:, re:, glob:, "
                         "target:<highest|lower|lowest|any> or oar:any (or a plain structure name)")

    def select(self, case: Case) -> list[Structure]:
        """The case's structures this selector matches, in case order (may be empty)."""
        structures = list(case.structures.values())
        if self.kind == "name":
            return [s for s in structures if s.name.lower() == self.value.lower()]
        if self.kind == "re":
            pattern = re.compile(self.value, re.IGNORECASE)
            return [s for s in structures if pattern.fullmatch(s.name)]
        if self.kind == "glob":
            return [s for s in structures if fnmatch.fnmatchcase(s.name.lower(), self.value.lower())]
        role, which = self.value.split(":")
        if role == "oar":
            return [s for s in structures if s.role == "oar"]
        targets = [s for s in structures if s.role == "target"]
        if which == "any":
            return targets
        with_rx = [s for s in targets if s.prescription_gy is not None]
        if not with_rx:
            return []
        top = max(s.prescription_gy for s in with_rx)  # type: ignore[type-var]
        low = min(s.prescription_gy for s in with_rx)  # type: ignore[type-var]
        if which == "highest":
            return [s for s in with_rx if s.prescription_gy == top]
        if which == "lower":
            return [s for s in with_rx if s.prescription_gy < top]  # type: ignore[operator]
        # lowest: only when it differs from the highest, so a one-target case is not scored twice
        return [s for s in with_rx if s.prescription_gy == low and low < top]


# -- items and templates ------------------------------------------------------------------------
@dataclass(frozen=True)
class HardConstraint:
    """A hard bound on an item's metric value with a hinge penalty.

    penalty = ``penalty_per_unit`` x (amount by which the value is below ``min`` or above
    ``max``), in score points per metric unit; 0 when the bound holds.
    """

    min: float | None = None
    max: float | None = None
    penalty_per_unit: float = 1.0

    def evaluate(self, value: float) -> tuple[bool, float]:
        """(passed, penalty >= 0) for a metric value."""
        excess = 0.0
        if self.min is not None and value < self.min:
            excess += self.min - value
        if self.max is not None and value > self.max:
            excess += value - self.max
        return excess == 0.0, self.penalty_per_unit * excess

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class ScorecardItem:
    """One template item (see the module docstring for the YAML form).

    Args:
        id: unique id within the template (reward weights and preferences key on it).
        selector: which structure(s) the item scores.
        metric: DVH metric spec, e.g. "Dmean", "D0.1cc", "D95%_%Rx", "V20Gy".
        points: ((value, score), ...) with strictly increasing values; the score is linearly
            interpolated between points and clamped to the end scores outside them.
        weight: multiplies the score (weighted score = weight x score).
        hard: optional hard constraint on the value.
        required: a case without a matching structure is an error instead of a skip.
        rx: prescription rule for %Rx metrics: "structure", "case_max" or a fixed Gy value
            (None: "structure" for targets, "case_max" otherwise).
        label: human-readable name for tables and the Slicer panel.
        source: citation of the constraint (QUANTEC, RTOG ...).
    """

    id: str
    selector: Selector
    metric: str
    points: tuple[tuple[float, float], ...]
    weight: float = 1.0
    hard: HardConstraint | None = None
    required: bool = False
    rx: str | float | None = None
    label: str = ""
    source: str = ""

    @property
    def unit(self) -> str:
        """Unit of the metric value and of the points' x values ("Gy", "%", "cc", "%Rx")."""
        return metric_unit(self.metric)

    @property
    def needs_prescription(self) -> bool:
        kind, _, as_pct_rx = parse_metric(self.metric)
        return as_pct_rx or kind.startswith("V%Rx")

    @property
    def max_score(self) -> float:
        return max(y for _, y in self.points)


@dataclass(frozen=True)
class ScorecardTemplate:
    """A validated Scorecard template.

    Args:
        name: template name (file stem for shipped templates).
        items: the items, in template order.
        version: template version (bump when points change, so results stay comparable).
        description, site: free text shown to users.
        path: file it was loaded from ("" when built in code).
    """

    name: str
    items: tuple[ScorecardItem, ...]
    version: str = "1"
    description: str = ""
    site: str = ""
    path: str = ""

    def item(self, item_id: str) -> ScorecardItem:
        for it in self.items:
            if it.id == item_id:
                return it
        raise KeyError(item_id)

    def with_weights(self, weights: Mapping[str, float]) -> ScorecardTemplate:
        """A copy with some item weights replaced (e.g. weights learned from preferences).

        Raises:
            ConfigError: an id that is not an item of this template, or a weight that is not
                finite and > 0.
        """
        ids = {it.id for it in self.items}
        unknown = sorted(set(weights) - ids)
        if unknown:
            raise ConfigError(f"Scorecard template {self.name}: unknown item id(s) {unknown} in weights; "
                              f"items are {sorted(ids)}")
        items = []
        for it in self.items:
            if it.id in weights:
                w = _weight(weights[it.id], self.path or self.name, repr(it.id))
                it = replace(it, weight=w)
            items.append(it)
        return replace(self, items=tuple(items))


# -- loading and validation ---------------------------------------------------------------------
def list_templates() -> list[str]:
    """Names of the templates shipped with DiffKT3D (usable with :func:`load_template`)."""
    folder = resources.files(TEMPLATE_PACKAGE) / TEMPLATE_DIR
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir()
                  if p.name.endswith(TEMPLATE_SUFFIXES))


def resolve_template_path(name_or_path: str | Path) -> Path:
    """Path of a shipped template name ("openkbp_hn") or of a template file.

    Raises:
        ConfigError: neither a shipped name nor an existing file (lists the shipped names).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in TEMPLATE_SUFFIXES or path.parent != Path("."):
        if path.is_file():
            return path
        raise ConfigError(f"Scorecard template file {text} does not exist")
    for suffix in TEMPLATE_SUFFIXES:
        candidate = resources.files(TEMPLATE_PACKAGE) / TEMPLATE_DIR / f"{text}{suffix}"
        if candidate.is_file():
            return Path(str(candidate))
    if path.is_file():
        return path
    raise ConfigError(f"unknown Scorecard template {text!r}; shipped templates: "
                      f"{', '.join(list_templates())} (or give a path to a .yaml file)")


def load_template(name_or_path: str | Path | ScorecardTemplate) -> ScorecardTemplate:
    """Load and validate a template by shipped name ("openkbp_hn") or file path.

    Raises:
        ConfigError: unknown name, unreadable YAML, or an invalid item (the message names the
            template file and the item).
    """
    if isinstance(name_or_path, ScorecardTemplate):
        return name_or_path
    path = resolve_template_path(name_or_path).resolve()
    # Templates are immutable: reuse a parsed one while its file is unchanged (the RL reward
    # scores thousands of candidates with the same template name).
    return _load_template_file(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _load_template_file(path_text: str, mtime_ns: int) -> ScorecardTemplate:
    path = Path(path_text)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"Scorecard template {path}: not valid YAML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"Scorecard template {path}: cannot read ({exc})") from None
    return template_from_dict(data, source=str(path), default_name=path.name.rsplit(".", 1)[0])


def template_from_dict(data: Any, source: str = "<dict>", default_name: str = "") -> ScorecardTemplate:
    """Build and validate a template from its parsed YAML/JSON form.

    Args:
        data: mapping with ``items`` (and optional name, version, description, site).
        source: file name used in error messages.
        default_name: name when ``data`` has none.
    """
    where = f"Scorecard template {source}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with 'items', found {type(data).__name__}")
    unknown = sorted(set(data) - _TEMPLATE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; allowed {sorted(_TEMPLATE_KEYS)}")
    raw_items = data.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise ConfigError(f"{where}: 'items' must be a non-empty list")
    items: list[ScorecardItem] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_items):
        item = _item_from_dict(raw, index, source)
        if item.id in seen:
            raise ConfigError(f"{where}, item {item.id!r}: duplicate item id")
        seen.add(item.id)
        items.append(item)
    name = str(data.get("name") or default_name or "scorecard")
    return ScorecardTemplate(name=name, items=tuple(items), version=str(data.get("version", "1")),
                             description=str(data.get("description", "") or "").strip(),
                             site=str(data.get("site", "") or ""),
                             path=source if source != "<dict>" else "")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, found {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, found {value!r}")
    return value


def _weight(value: Any, source: str, item_label: str) -> float:
    try:
        w = _number(value)
    except ValueError as exc:
        raise ConfigError(f"Scorecard template {source}, item {item_label}: bad weight: {exc}") from None
    if w <= 0:
        raise ConfigError(f"Scorecard template {source}, item {item_label}: weight must be > 0, found {w:g}")
    return w


def _item_from_dict(raw: Any, index: int, source: str) -> ScorecardItem:
    item_name = f"#{index + 1}"
    if isinstance(raw, dict) and isinstance(raw.get("id"), str):
        item_name = f"#{index + 1} ({raw['id']!r})"

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"Scorecard template {source}, item {item_name}: {problem}")

    if not isinstance(raw, dict):
        raise fail(f"expected a mapping, found {type(raw).__name__}")
    unknown = sorted(set(raw) - _ITEM_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {unknown}; allowed {sorted(_ITEM_KEYS)}")
    for key in ("structure", "metric", "points"):
        if key not in raw:
            raise fail(f"missing '{key}'")
    try:
        selector = Selector.parse(raw["structure"])
    except ValueError as exc:
        raise fail(f"bad structure selector: {exc}") from None
    metric = raw["metric"]
    try:
        parse_metric(metric)
    except ValueError as exc:
        raise fail(str(exc)) from None
    metric = metric.strip()
    item_id = raw.get("id", f"{selector.text}:{metric}")
    if not isinstance(item_id, str) or not item_id.strip():
        raise fail(f"'id' must be a non-empty string, found {item_id!r}")

    points_raw = raw["points"]
    if not isinstance(points_raw, list) or len(points_raw) < 2:
        raise fail("'points' must be a list of at least two [value, score] pairs")
    points: list[tuple[float, float]] = []
    for p in points_raw:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise fail(f"each point must be [value, score], found {p!r}")
        try:
            x, y = _number(p[0]), _number(p[1])
        except ValueError as exc:
            raise fail(f"point {p!r}: {exc}") from None
        if y < 0:
            raise fail(f"point {p!r}: scores must be >= 0")
        points.append((x, y))
    xs = [x for x, _ in points]
    if any(b <= a for a, b in zip(xs[:-1], xs[1:], strict=True)):
        raise fail(f"point values must be strictly increasing (non-monotone x: {xs})")
    if max(y for _, y in points) <= 0:
        raise fail("at least one point must have a score > 0")

    weight = _weight(raw.get("weight", 1.0), source, item_name)

    hard = None
    if raw.get("hard") is not None:
        h = raw["hard"]
        if not isinstance(h, dict) or not (set(h) & {"min", "max"}):
            raise fail("'hard' must be a mapping with 'min' and/or 'max' (and optional 'penalty')")
        bad = sorted(set(h) - _HARD_KEYS)
        if bad:
            raise fail(f"unknown key(s) {bad} in 'hard'; allowed {sorted(_HARD_KEYS)}")
        try:
            lo = None if h.get("min") is None else _number(h["min"])
            hi = None if h.get("max") is None else _number(h["max"])
            pen = _number(h.get("penalty", 1.0))
        except ValueError as exc:
            raise fail(f"bad 'hard' constraint: {exc}") from None
        if lo is not None and hi is not None and lo > hi:
            raise fail(f"'hard' min {lo:g} is above max {hi:g}")
        if pen < 0:
            raise fail(f"'hard' penalty must be >= 0, found {pen:g}")
        hard = HardConstraint(min=lo, max=hi, penalty_per_unit=pen)

    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise fail(f"'required' must be true or false, found {required!r}")

    rx = raw.get("rx")
    if rx is not None:
        if isinstance(rx, str):
            if rx not in ("structure", "case_max"):
                raise fail(f"'rx' must be 'structure', 'case_max' or a dose in Gy, found {rx!r}")
        else:
            try:
                rx = _number(rx)
            except ValueError as exc:
                raise fail(f"bad 'rx': {exc}") from None
            if rx <= 0:
                raise fail(f"'rx' must be > 0 Gy, found {rx:g}")

    return ScorecardItem(id=item_id.strip(), selector=selector, metric=metric, points=tuple(points),
                         weight=weight, hard=hard, required=required, rx=rx,
                         label=str(raw.get("label", "") or ""), source=str(raw.get("source", "") or ""))


__all__ = [
    "HardConstraint",
    "ScorecardItem",
    "ScorecardTemplate",
    "Selector",
    "list_templates",
    "load_template",
    "resolve_template_path",
    "template_from_dict",
]
