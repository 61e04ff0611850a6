"""Candidate doses of one request, the active candidate, and the preference record.

The server returns N candidates (different initial noise), each with its Scorecard, total and item
scores (docs/request-format.md §4: the dose result the core describes once). The planner compares them, picks one (optional comment) and the
choice is sent as a preference record (§7; schema diffkt3d/preferences/record.py), the label
ScardNFT learns from. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Candidate:
    """One candidate dose.

    Args:
        id: server id ("c0", ...).
        seed: sampling seed (reproduces it).
        scorecard: its Scorecard JSON.
        scorecard_total: its Scorecard total (points), as the server reported it.
        scorecard_items: "<item id>/<structure>" -> unweighted item score, as the server reported it
            (the form preference records carry, so it is copied, never recomputed here).
        dose_path: local NIfTI once fetched.
        dose_node_id / table_node_id: scene nodes showing it.
    """

    id: str
    seed: int | None
    scorecard: dict[str, Any]
    scorecard_total: float
    scorecard_items: dict[str, float]
    dose_path: Path | None = None
    dose_node_id: str | None = None
    table_node_id: str | None = None

    @property
    def total(self) -> float:
        return self.scorecard_total


@dataclass
class CandidateSet:
    """All candidates of one dose request and which one is shown."""

    case_id: str
    request_id: str | None
    model_version: str
    template: str | None
    steps: int | None
    candidates: list[Candidate] = field(default_factory=list)
    best_id: str | None = None  # the server's choice (highest Scorecard total)
    active_id: str | None = None
    preview: bool = False
    session_id: str | None = None  # server session holding the uploaded case

    @classmethod
    def from_response(cls, params: dict[str, Any]) -> CandidateSet:
        """Build from the `dose` JSON.

        Raises:
            ValueError: the JSON lacks candidates or a candidate's id or Scorecard (names what is missing).
        """
        raw = params.get("candidates")
        if not raw:
            raise ValueError(f"the dose answer has no 'candidates' (keys: {sorted(params)})")
        cands = []
        for i, c in enumerate(raw):
            if "id" not in c:
                raise ValueError(f"candidate #{i} of the dose answer has no 'id'")
            missing = [k for k in ("scorecard", "scorecard_total", "scorecard_items") if c.get(k) is None]
            if missing:
                raise ValueError(f"candidate {c['id']} of the dose answer has no {', '.join(map(repr, missing))}")
            cands.append(Candidate(id=str(c["id"]), seed=c.get("seed"), scorecard=c["scorecard"],
                                   scorecard_total=float(c["scorecard_total"]),
                                   scorecard_items={str(k): float(v) for k, v in c["scorecard_items"].items()}))
        case = params.get("case") or {}
        best = str(params.get("chosen_id") or cands[0].id)
        return cls(case_id=str(case.get("id", "")), request_id=params.get("request_id"),
                   model_version=str(params.get("model_version", "")), template=params.get("template"),
                   steps=params.get("steps"), candidates=cands, best_id=best, active_id=best,
                   preview=bool(params.get("preview", False)))

    def get(self, candidate_id: str) -> Candidate:
        for c in self.candidates:
            if c.id == candidate_id:
                return c
        raise ValueError(f"no candidate {candidate_id!r} (have {[c.id for c in self.candidates]})")

    @property
    def active(self) -> Candidate:
        return self.get(self.active_id or self.candidates[0].id)

    def set_active(self, candidate_id: str) -> Candidate:
        candidate = self.get(candidate_id)
        self.active_id = candidate.id
        return candidate

    def index(self, candidate_id: str) -> int:
        return [c.id for c in self.candidates].index(candidate_id)

    def scorecards(self) -> dict[str, dict[str, Any]]:
        return {c.id: c.scorecard for c in self.candidates}

    def preference_record(self, chosen_id: str, rater: str, comment: str = "",
                          checkpoint: str | None = None) -> dict[str, Any]:
        """The JSON body of `POST /diffkt3d/preferences`.

        Raises:
            ValueError: fewer than 2 candidates, unknown chosen id, no rater, or a preview set
                (1-step previews are not labels).
        """
        if self.preview:
            raise ValueError("a 1-step preview cannot be rated: request full candidates first")
        if len(self.candidates) < 2:
            raise ValueError(f"a preference needs at least 2 candidates, this request has "
                             f"{len(self.candidates)}: ask for more candidates")
        self.get(chosen_id)
        if not rater.strip():
            raise ValueError("enter a rater name before sending a preference")
        refs = []
        for c in self.candidates:
            ref: dict[str, Any] = {"id": c.id, "seed": int(c.seed or 0), "model_version": self.model_version}
            if checkpoint:
                ref["checkpoint"] = checkpoint
            ref["scorecard_total"] = c.scorecard_total
            ref["scorecard_items"] = dict(c.scorecard_items)
            refs.append(ref)
        record: dict[str, Any] = {"case_id": self.case_id, "candidates": refs, "chosen_id": chosen_id,
                                  "rater": rater.strip()}
        if comment.strip():
            record["comment"] = comment.strip()
        if self.template:
            record["template"] = self.template
        return record
