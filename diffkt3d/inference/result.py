"""What a prediction returns, and its one JSON description.

`Predictor.predict_dose` returns a :class:`DosePrediction` holding rich objects (the candidates'
doses and :class:`~diffkt3d.scorecard.ScorecardResult` objects, the DVH table); its
:meth:`DosePrediction.to_dict` is the single description of a dose result. The CLI writes it as
``scorecard.json`` and the server's `dose` task answers with it (plus transport-only fields:
``task``, ``request_id``, ``case.source``, ``request_timings``), so a client never meets two shapes
of the same result. Field reference: docs/request-format.md §4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from diffkt3d.constants import DEFAULT_SEED, DEFAULT_STEPS
from diffkt3d.data.case import Case
from diffkt3d.inference.quality import VALIDATED, TargetQuality, empty_mask_warnings, target_quality
from diffkt3d.metrics.dvh_table import StructureDvh, dvh_table_dict

if TYPE_CHECKING:  # the Scorecard engine is imported only when a template is used
    from diffkt3d.scorecard import ScorecardResult

# Version of the JSON form of DosePrediction.to_dict; bump it when a field changes meaning.
DOSE_RESULT_SCHEMA = "diffkt3d.dose.result/1"


@dataclass(frozen=True)
class CaseInfo:
    """The case a result belongs to, as a client needs it to read the result back.

    Args:
        id: case id.
        shape: (I, J, K) voxels of the case grid (the dose's grid).
        spacing_mm: voxel spacing.
        structures: name -> (role, prescription in Gy or None).
        inferred: plan facts the loader inferred (e.g. a role from a structure name), for the user to check.
    """

    id: str
    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    structures: dict[str, tuple[str, float | None]]
    inferred: tuple[str, ...] = ()

    @classmethod
    def of(cls, case: Case) -> CaseInfo:
        return cls(id=case.case_id, shape=tuple(int(n) for n in case.grid.shape),
                   spacing_mm=tuple(float(v) for v in case.grid.spacing_mm),
                   structures={n: (s.role, s.prescription_gy) for n, s in case.structures.items()},
                   inferred=tuple(case.plan.inferred))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "shape": list(self.shape), "spacing_mm": [round(v, 4) for v in self.spacing_mm],
                "structures": {n: {"role": role, "prescription_gy": rx} for n, (role, rx) in self.structures.items()},
                "inferred": list(self.inferred)}


@dataclass
class Candidate:
    """One sampled dose (Gy, case grid). `seed` reproduces it with the same model and steps."""

    id: str
    seed: int
    dose_gy: np.ndarray
    scorecard: ScorecardResult | None = None

    @property
    def scorecard_total(self) -> float | None:
        """Scorecard total (points), None when the prediction ran without a template."""
        return None if self.scorecard is None else self.scorecard.total

    @property
    def total_score(self) -> float:
        """Scorecard total for ranking: NaN without a Scorecard."""
        total = self.scorecard_total
        return float("nan") if total is None else total

    def to_dict(self) -> dict[str, Any]:
        """``scorecard_items`` is the form preference records carry (``"<item id>/<structure>"`` ->
        unweighted score), so a client copies it into its record unchanged."""
        return {"id": self.id, "seed": self.seed, "scorecard_total": self.scorecard_total,
                "scorecard_items": {} if self.scorecard is None else self.scorecard.item_scores(),
                "scorecard": None if self.scorecard is None else self.scorecard.to_dict()}


@dataclass
class DosePrediction:
    """A dose prediction: the returned dose is the candidate `chosen_id` (see `aggregate`).

    Args:
        candidates: every sampled dose, plus the voxel-wise "mean" entry with aggregate "mean".
        chosen_id: id of the returned candidate.
        steps: Euler steps actually run (1 for a preview).
        seed: base seed; candidate k used seed + k.
        model_version: the checkpoint's version string.
        aggregate: "best" (highest Scorecard total) or "mean".
        template: Scorecard template asked for (None: no Scorecard).
        preview: whether this was a 1-step preview.
        case: the case the dose belongs to.
        dvh: DVH table of the returned dose, structure name -> metrics.
        timings: seconds per stage (encode, sample, decode, scorecard, dvh, total).
        latent: for a latent-space model, its VAE and crop and which conditions were VAE-encoded
            for this request or taken from the per-case cache (None for a voxel-space model).
        full_res: whether a full-resolution stage (models.full_res) refined the dose on the case
            grid; its seconds are ``timings["full_res_s"]``.
    """

    candidates: list[Candidate]
    chosen_id: str
    steps: int
    seed: int
    model_version: str
    aggregate: str
    template: str | None
    preview: bool
    case: CaseInfo
    dvh: dict[str, StructureDvh] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    latent: dict[str, Any] | None = None
    full_res: bool = False

    @property
    def chosen(self) -> Candidate:
        for c in self.candidates:
            if c.id == self.chosen_id:
                return c
        raise ValueError(f"chosen candidate {self.chosen_id!r} is not one of {[c.id for c in self.candidates]}")

    @property
    def dose_gy(self) -> np.ndarray:
        """The returned dose (Gy, case grid): the chosen candidate's."""
        return self.chosen.dose_gy

    @property
    def scorecard(self) -> ScorecardResult | None:
        """Scorecard of the returned dose."""
        return self.chosen.scorecard

    def to_dict(self) -> dict[str, Any]:
        """The JSON description of the result (docs/request-format.md §4)."""
        scorecard = self.scorecard
        return {
            "schema": DOSE_RESULT_SCHEMA,
            "case": self.case.to_dict(),
            "model_version": self.model_version,
            "steps": self.steps,
            "seed": self.seed,
            "preview": self.preview,
            "aggregate": self.aggregate,
            "template": self.template,
            "chosen_id": self.chosen_id,
            "scorecard": None if scorecard is None else scorecard.to_dict(),
            "dvh": dvh_table_dict(self.dvh),
            "candidates": [c.to_dict() for c in self.candidates],
            "timings": dict(self.timings),
            # only for latent-space models, so a voxel model's description is unchanged
            **({"latent": dict(self.latent)} if self.latent is not None else {}),
            # only when a full-resolution stage ran, for the same reason
            **({"full_res": True} if self.full_res else {}),
        }


@dataclass
class ImputationResult:
    """A generated modality: `ct_hu` (HU, case grid) for "ct", else `masks` (name -> bool mask).

    `quality` is the model's quality-gate verdict on the target (``inference.quality``) and
    `warnings` what a user must see before relying on the output (an experimental target, an
    empty mask); both are filled by :meth:`gate`.
    `latent` as in :class:`DosePrediction` (None for voxel-space and PRDiT models), and
    `full_res` (a full-resolution stage produced the output).
    """

    target: str
    ct_hu: np.ndarray | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    steps: int = DEFAULT_STEPS
    seed: int = DEFAULT_SEED
    model_version: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    latent: dict[str, Any] | None = None
    full_res: bool = False
    quality: TargetQuality | None = None
    warnings: list[str] = field(default_factory=list)

    def gate(self, meta: dict) -> ImputationResult:
        """Attach the checkpoint's verdict on this target and the warnings that follow from it."""
        self.quality = target_quality(meta, self.target)
        self.warnings = []
        if self.quality.status != VALIDATED:
            self.warnings.append(f"{self.target} imputation is experimental: {self.quality.reason}")
        self.warnings += empty_mask_warnings(self.masks)
        return self


__all__ = ["DOSE_RESULT_SCHEMA", "Candidate", "CaseInfo", "DosePrediction", "ImputationResult"]
