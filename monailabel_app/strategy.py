"""Active learning for preference labelling: which case should a clinician compare candidates on next.

A preference between candidates teaches the most where the candidates differ most in Scorecard
terms (nearly equal candidates make a coin-flip label). Every `dose` request with two or more
candidates stores, per datastore case, the candidates' Scorecard totals (see `record_candidates`);
the strategy returns the case with the largest spread (max - min total, in Scorecard points), skipping
cases the same rater already labelled. Cases never scored with several candidates come after all
scored ones, in id order, so a fresh server still hands out work.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from diffkt3d.preferences import PreferenceStore

log = logging.getLogger(__name__)

INFO_KEY = "diffkt3d_candidates"


def candidate_spread(totals: list[float]) -> float:
    """Disagreement of candidate Scorecards: range of their totals (points)."""
    return float(max(totals) - min(totals)) if len(totals) > 1 else 0.0


def record_candidates(datastore: Datastore, case_id: str, result: dict[str, Any]) -> None:
    """Store the candidates' Scorecard totals of a dose response in the case's image info.

    `result` is the `dose` task's answer: the core's dose-result description
    (`DosePrediction.to_dict()`, docs/request-format.md §4) plus the server's `request_id`.
    """
    totals = [c["scorecard_total"] for c in result.get("candidates", []) if c.get("scorecard_total") is not None]
    if len(totals) < 2:
        return
    datastore.update_image_info(case_id, {INFO_KEY: {
        "request_id": result.get("request_id"), "model_version": result.get("model_version"),
        "template": result.get("template"), "seeds": [c["seed"] for c in result["candidates"]],
        "totals": totals, "spread": candidate_spread(totals)}})


class PreferenceStrategy(Strategy):
    """Next case for preference labelling (largest candidate Scorecard spread, not yet labelled by
    the rater given as `rater` in the request body)."""

    def __init__(self, store: PreferenceStore):
        super().__init__("Next case for preference labelling: where candidate Scorecards disagree most, "
                         "skipping cases the rater already labelled")
        self.store = store

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        rater = request.get("rater")
        done = self.store.labelled_cases(rater=str(rater)) if rater else set()
        scored: list[tuple[float, str, dict]] = []
        unscored: list[str] = []
        for case_id in datastore.list_images():
            if case_id in done:
                continue
            info = datastore.get_image_info(case_id).get(INFO_KEY)
            if info and len(info.get("totals", [])) > 1:
                scored.append((float(info["spread"]), case_id, info))
            else:
                unscored.append(case_id)
        if scored:
            spread, case_id, info = min(scored, key=lambda s: (-s[0], s[1]))  # largest spread, then id
            return {"id": case_id, "score": spread, "candidate_totals": info["totals"],
                    "reason": f"candidate Scorecard totals differ by {spread:.2f} points"}
        if unscored:
            return {"id": unscored[0], "score": None,
                    "reason": "no case has stored candidate Scorecards yet; first unlabelled case"}
        log.info("no case left for rater %s", rater)
        return {}
