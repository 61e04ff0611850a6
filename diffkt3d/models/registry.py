"""Model versions of a server: every trained model kept, one of them served, any of them servable again.

A clinic must be able to say which model produced a dose, what it was accepted on, and go back to
an earlier model when a new one disappoints. So a training run never overwrites the served
checkpoint: it adds a version (its own immutable copy of the weights, with its parent, recipe,
data ids and validation figures), and what is served is a separate pointer that only a promotion
moves (the train task's validation rule, or an administrator). The shipped model is the version
``shipped``; rolling back to it is promoting it.

Layout under ``root``::

    versions/<id>/model.pt        the weights (never rewritten)
    versions/<id>/version.json    ModelVersion (validation figures added after the run)
    served.json                   {"version": <id>, "since": ..., "by": ..., "reason": ...}
    registry.lock                 inter-process lock (train subprocess and server both write)

Ids are ``v<n>-<task>`` (``v3-scardnft``), numbered in the order versions were added.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from diffkt3d.errors import DiffKT3DError
from diffkt3d.models.checkpoint import file_digest

SHIPPED = "shipped"
MODEL_FILE = "model.pt"
_VERSION_RE = re.compile(r"^v(\d+)-[a-z0-9_]+$")


class UnknownVersionError(DiffKT3DError, LookupError):
    """No model version of that id in the registry."""


@dataclass
class ModelVersion:
    """One servable model and where it came from.

    Args:
        id: ``v<n>-<task>`` or ``shipped``.
        task: the train task that made it (``any2any``, ``scardnft``) or ``shipped``.
        parent: the version it was trained from (None: from scratch, or the shipped model).
        created: ISO 8601 UTC.
        digest: first 12 hex digits of the weights' SHA-256 (the ``@...`` of the model version
            the predictor reports).
        recipe: the run's full configuration (recipe with the request's overrides).
        data: case ids the run trained on (``train``) and validated on (``validation``).
        validation: the validation report (figures of this version and of the model it was
            compared with, the rule and the decision); None before validation.
    """

    id: str
    task: str
    parent: str | None
    created: str
    digest: str
    recipe: dict[str, Any] = field(default_factory=dict)
    data: dict[str, list[str]] = field(default_factory=dict)
    validation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelVersion:
        return cls(id=str(d["id"]), task=str(d["task"]), parent=d.get("parent"), created=str(d["created"]),
                   digest=str(d.get("digest", "")), recipe=dict(d.get("recipe") or {}),
                   data={k: list(v) for k, v in (d.get("data") or {}).items()}, validation=d.get("validation"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


class ModelRegistry:
    """The versions folder of one server.

    Args:
        root: the registry folder (created).
        shipped: the shipped checkpoint (the ``shipped`` version; may not exist).
        lock_timeout_s: how long a writer waits for the lock.
    """

    def __init__(self, root: str | Path, shipped: str | Path | None, lock_timeout_s: float = 60.0):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.shipped = Path(shipped) if shipped else None
        self._lock = FileLock(str(self.root / "registry.lock"), timeout=lock_timeout_s)

    # -- reading -----------------------------------------------------------------------------
    def path(self, version_id: str) -> Path:
        """The weights of a version (UnknownVersionError when there is no such version)."""
        if version_id == SHIPPED:
            if self.shipped is None:
                raise UnknownVersionError("this server has no shipped model")
            return self.shipped
        self.get(version_id)
        return self.versions_dir / version_id / MODEL_FILE

    def get(self, version_id: str) -> ModelVersion:
        if version_id == SHIPPED:
            return self._shipped_version()
        meta = self.versions_dir / str(version_id) / "version.json"
        if not _VERSION_RE.match(str(version_id)) or not meta.is_file():
            known = [v.id for v in self.list()]
            raise UnknownVersionError(f"no model version {str(version_id)[:80]!r}; versions: {known}")
        return ModelVersion.from_dict(json.loads(meta.read_text()))

    def list(self) -> list[ModelVersion]:
        """The shipped model (when there is one), then every trained version, oldest first."""
        out = [self._shipped_version()] if self.shipped is not None and self.shipped.is_file() else []
        numbered = []
        for d in self.versions_dir.iterdir():
            m = _VERSION_RE.match(d.name)
            if m and (d / "version.json").is_file() and (d / MODEL_FILE).is_file():
                numbered.append((int(m.group(1)), d.name))
        return out + [self.get(name) for _, name in sorted(numbered)]

    def served(self) -> dict[str, Any]:
        """The served pointer: ``{"version", "since", "by", "reason"}`` (the shipped model until a promotion)."""
        path = self.root / "served.json"
        if path.is_file():
            return json.loads(path.read_text())
        return {"version": SHIPPED, "since": None, "by": None, "reason": "nothing promoted yet"}

    def served_id(self) -> str:
        return str(self.served()["version"])

    def served_path(self) -> Path | None:
        """Weights of the served version (None when it is the shipped model and none is shipped)."""
        vid = self.served_id()
        if vid == SHIPPED:
            return self.shipped
        return self.versions_dir / vid / MODEL_FILE

    def _shipped_version(self) -> ModelVersion:
        digest = file_digest(self.shipped) if self.shipped is not None and self.shipped.is_file() else ""
        return ModelVersion(id=SHIPPED, task=SHIPPED, parent=None, created="", digest=digest)

    # -- writing -----------------------------------------------------------------------------
    def add(self, weights: str | Path, task: str, parent: str | None, recipe: dict[str, Any] | None = None,
            data: dict[str, list[str]] | None = None) -> ModelVersion:
        """Keep a copy of `weights` as a new (not served) version."""
        if not re.fullmatch(r"[a-z0-9_]+", task):
            raise ValueError(f"task name {task!r} must be lower-case letters, digits or '_'")
        with self._lock:
            numbers = [int(m.group(1)) for d in self.versions_dir.iterdir() if (m := _VERSION_RE.match(d.name))]
            vid = f"v{max(numbers, default=0) + 1}-{task}"
            folder = self.versions_dir / vid
            part = self.versions_dir / f".{vid}.part"
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()
            shutil.copyfile(weights, part / MODEL_FILE)
            version = ModelVersion(id=vid, task=task, parent=parent, created=_now(),
                                   digest=file_digest(part / MODEL_FILE), recipe=dict(recipe or {}),
                                   data={k: list(v) for k, v in (data or {}).items()})
            _write_json(part / "version.json", version.to_dict())
            os.replace(part, folder)  # a version appears whole or not at all
        return version

    def record_validation(self, version_id: str, validation: dict[str, Any]) -> ModelVersion:
        """Store the validation report of a trained version (the weights are not touched)."""
        with self._lock:
            version = self.get(version_id)
            if version.id == SHIPPED:
                raise ValueError("the shipped model's record is not stored in the registry")
            version.validation = validation
            _write_json(self.versions_dir / version.id / "version.json", version.to_dict())
        return version

    def promote(self, version_id: str, by: str, reason: str) -> dict[str, Any]:
        """Serve `version_id` from the next request on (also the way back to any earlier version).

        Returns:
            ``{"version", "previous", "since", "by", "reason"}``.
        """
        with self._lock:
            path = self.path(version_id)
            if not path.is_file():
                raise UnknownVersionError(f"model version {version_id!r} has no weights file ({path.name} missing)")
            previous = self.served_id()
            pointer = {"version": version_id, "previous": previous, "since": _now(), "by": by, "reason": reason}
            _write_json(self.root / "served.json", pointer)
        return pointer


__all__ = ["MODEL_FILE", "SHIPPED", "ModelRegistry", "ModelVersion", "UnknownVersionError"]
