"""Preference record: a clinician's choice between two or more candidate doses of one case.

These records are the labels ScardNFT learns institution-specific Scorecard weights from,
so a record carries everything needed to reproduce the candidates (seed, model version,
checkpoint) and to learn from the choice without re-running the model (each candidate's Scorecard
item scores, optional).

On disk a record is one JSON object (see `PreferenceRecord.to_dict`); `schema_version` lets later
readers migrate old records instead of guessing.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

SCHEMA_VERSION = 1

# Case ids / candidate ids are folder-like names: no separators, no "..", bounded length.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_COMMENT = 2000


def check_id(value: Any, what: str) -> str:
    """Return `value` if it is a safe id (folder-like name), else raise ValueError naming `what`."""
    if not isinstance(value, str) or not _ID_RE.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not a valid id (letters, digits, '.', '_', '-'; "
                         "no path separators or '..'; at most 128 characters)")
    return value


@dataclass
class CandidateRef:
    """One candidate dose shown to the rater.

    Args:
        id: candidate id as returned by the server (e.g. "c0").
        seed: sampling seed that reproduces the candidate.
        model_version: model version string of the predictor that made it.
        checkpoint: checkpoint file name or digest (optional, for provenance).
        scorecard_total: Scorecard total of this candidate (points), if known.
        scorecard_items: Scorecard item name -> score (points), if known; ScardNFT's preference
            learner fits item weights on differences of these between chosen and rejected.
    """

    id: str
    seed: int
    model_version: str
    checkpoint: str | None = None
    scorecard_total: float | None = None
    scorecard_items: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> CandidateRef:
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object with id, seed, model_version")
        unknown = sorted(set(d) - {"id", "seed", "model_version", "checkpoint", "scorecard_total",
                                   "scorecard_items"})
        if unknown:
            raise ValueError(f"{where} has unknown fields {unknown}")
        for key in ("id", "seed", "model_version"):
            if key not in d:
                raise ValueError(f"{where} is missing {key!r}")
        seed = d["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{where}.seed must be a non-negative integer, found {seed!r}")
        mv = d["model_version"]
        if not isinstance(mv, str) or not mv.strip():
            raise ValueError(f"{where}.model_version must be a non-empty string")
        total = d.get("scorecard_total")
        if total is not None:
            total = _finite(total, f"{where}.scorecard_total")
        items = d.get("scorecard_items") or {}
        if not isinstance(items, dict):
            raise ValueError(f"{where}.scorecard_items must map item names to numbers")
        items = {str(k): _finite(v, f"{where}.scorecard_items[{k!r}]") for k, v in items.items()}
        ckpt = d.get("checkpoint")
        return cls(id=check_id(d["id"], f"{where}.id"), seed=seed, model_version=mv,
                   checkpoint=None if ckpt is None else str(ckpt), scorecard_total=total,
                   scorecard_items=items)


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, found {value!r}")
    return float(value)


@dataclass
class PreferenceRecord:
    """A clinician's choice among candidates of one case.

    Args:
        case_id: the case (datastore folder name or `session-<uuid>`).
        candidates: two or more candidates shown side by side.
        chosen_id: id of the preferred candidate (one of `candidates`).
        rater: who chose (user name; with auth on, the server sets it from the identity).
        comment: optional free text (at most 2000 characters).
        template: Scorecard template the rater saw (e.g. "openkbp_hn").
        time_utc: ISO 8601 UTC time of the choice (set at creation).
        record_id: unique id (uuid4 hex, set at creation).
        schema_version: format version of this record.
    """

    case_id: str
    candidates: list[CandidateRef]
    chosen_id: str
    rater: str
    comment: str | None = None
    template: str | None = None
    time_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_id(self.case_id, "case_id")
        if len(self.candidates) < 2:
            raise ValueError(f"a preference needs at least 2 candidates, found {len(self.candidates)}")
        ids = [c.id for c in self.candidates]
        if len(set(ids)) != len(ids):
            raise ValueError(f"candidate ids must be unique, found {ids}")
        if self.chosen_id not in ids:
            raise ValueError(f"chosen_id {self.chosen_id!r} is not one of the candidates {ids}")
        if not isinstance(self.rater, str) or not self.rater.strip() or len(self.rater) > 128:
            raise ValueError("rater must be a non-empty string of at most 128 characters")
        if self.comment is not None and (not isinstance(self.comment, str) or len(self.comment) > _MAX_COMMENT):
            raise ValueError(f"comment must be a string of at most {_MAX_COMMENT} characters")

    @property
    def rejected_ids(self) -> list[str]:
        return [c.id for c in self.candidates if c.id != self.chosen_id]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, *, new: bool = False) -> PreferenceRecord:
        """Build and validate a record.

        Args:
            d: the JSON object.
            new: True for a record arriving from a client: `record_id`, `time_utc` and
                `schema_version` are assigned here, whatever the client sent.
        Raises:
            ValueError: naming the field and the problem.
        """
        if not isinstance(d, dict):
            raise ValueError("a preference record must be a JSON object")
        allowed = {"case_id", "candidates", "chosen_id", "rater", "comment", "template", "time_utc",
                   "record_id", "schema_version"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown fields {unknown}; allowed: {sorted(allowed)}")
        for key in ("case_id", "candidates", "chosen_id", "rater"):
            if key not in d:
                raise ValueError(f"missing field {key!r}")
        if not new and d.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
            raise ValueError(f"record schema_version {d['schema_version']} is newer than this reader "
                             f"({SCHEMA_VERSION})")
        cands = d["candidates"]
        if not isinstance(cands, list):
            raise ValueError("'candidates' must be a list")
        kwargs: dict[str, Any] = dict(
            case_id=d["case_id"],
            candidates=[CandidateRef.from_dict(c, f"candidates[{i}]") for i, c in enumerate(cands)],
            chosen_id=d["chosen_id"], rater=d["rater"], comment=d.get("comment"),
            template=d.get("template"))
        if not new:
            for key in ("time_utc", "record_id", "schema_version"):
                if key in d:
                    kwargs[key] = d[key]
        return cls(**kwargs)
