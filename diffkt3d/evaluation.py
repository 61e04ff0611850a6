"""Evaluate predicted doses against reference case folders (`diffkt3d evaluate`).

Layout (docs/case-format.md): the prediction root holds ``<case>/dose.nii.gz`` (Gy), the
reference root holds case folders (OpenKBP layout, with ``dose.nii.gz``). For every reference
case the report gives:

* OpenKBP dose score and DVH errors (:mod:`diffkt3d.metrics.openkbp`, the official definitions;
  the cohort DVH score is the pooled mean over (case, ROI, metric), as the official evaluator);
* GDP-HMM MAE (:mod:`diffkt3d.metrics.gdp_hmm`) with the high-dose PTV D97 normalisation
  factor of the reference applied to BOTH doses (``scale_prediction=True``): OpenKBP doses and
  our predictions are in un-normalised Gy, so scaling only the reference would count the
  normalisation itself as error;
* PSNR and SSIM over the whole grid with the fixed 80 Gy data range (:mod:`diffkt3d.metrics.image`);
* global gamma pass rate 3 %/3 mm, 10 % cut-off (:mod:`diffkt3d.metrics.gamma`), optional;
* Scorecard total of the prediction and of the reference (:mod:`diffkt3d.scorecard`), both
  scored on the reference case's structures.

Cohort means are plain means over cases, except the DVH score (pooled, see above).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffkt3d.constants import DEFAULT_TEMPLATE, DOSE_FILE
from diffkt3d.data.case import Case, Grid
from diffkt3d.errors import CaseError
from diffkt3d.io.case_folder import load_case_folder, load_nifti
from diffkt3d.metrics import gdp_hmm, openkbp
from diffkt3d.metrics.gamma import gamma_pass_rate
from diffkt3d.scorecard import ScorecardResult, ScorecardTemplate, load_template, score_case

log = logging.getLogger(__name__)

# Version of the JSON written by EvaluationReport.to_dict (docs/scorecard.md).
EVALUATION_SCHEMA = "diffkt3d.evaluation/1"

# Per-case figures in table / JSON order: key -> (column title, format, unit).
METRIC_COLUMNS: dict[str, tuple[str, str, str]] = {
    "dose_score": ("dose", "{:.3f}", "Gy"),
    "dvh_score": ("DVH", "{:.3f}", "Gy"),
    "gdp_hmm_mae": ("MAE", "{:.3f}", "Gy"),
    "psnr": ("PSNR", "{:.2f}", "dB"),
    "ssim": ("SSIM", "{:.4f}", ""),
    "gamma_pass_rate": ("gamma", "{:.2f}", "%"),
    "scorecard": ("Scard", "{:.2f}", ""),
    "scorecard_ref": ("Scard-ref", "{:.2f}", ""),
    "scorecard_max": ("max", "{:.1f}", ""),
}


def _natural_key(name: str) -> list[Any]:
    """pt_2 before pt_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass
class CaseEvaluation:
    """Figures of one case (NaN where a metric was skipped or undefined; PSNR is inf for
    identical doses)."""

    case_id: str
    dose_score: float
    dvh_score: float
    dvh_errors: dict[tuple[str, str], float]
    gdp_hmm_mae: float
    psnr: float
    ssim: float
    gamma_pass_rate: float
    scorecard: ScorecardResult
    scorecard_ref: ScorecardResult
    seconds: float = 0.0

    def figures(self) -> dict[str, float]:
        return {
            "dose_score": self.dose_score,
            "dvh_score": self.dvh_score,
            "gdp_hmm_mae": self.gdp_hmm_mae,
            "psnr": self.psnr,
            "ssim": self.ssim,
            "gamma_pass_rate": self.gamma_pass_rate,
            "scorecard": self.scorecard.total,
            "scorecard_ref": self.scorecard_ref.total,
            "scorecard_max": self.scorecard.max_total,
        }


@dataclass
class EvaluationReport:
    """Per-case figures, cohort means and what was skipped."""

    pred_root: str
    ref_root: str
    template: str
    cases: list[CaseEvaluation] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # case -> reason
    gamma: bool = True
    ssim: bool = True

    def means(self) -> dict[str, float]:
        """Cohort figures: mean over cases; DVH score pooled over (case, ROI, metric)."""
        if not self.cases:
            return {k: float("nan") for k in METRIC_COLUMNS}
        out = {k: float(np.mean([c.figures()[k] for c in self.cases])) for k in METRIC_COLUMNS}
        pooled = [e for c in self.cases for e in c.dvh_errors.values()]
        out["dvh_score"] = float(np.mean(pooled)) if pooled else float("nan")
        return out

    def table(self) -> str:
        """Plain-text per-case table followed by the means (what the CLI prints)."""
        cols = list(METRIC_COLUMNS)
        width = 10
        head = f"{'case':<12}" + "".join(f"{METRIC_COLUMNS[k][0]:>{width}}" for k in cols)
        units = f"{'':<12}" + "".join(f"{('(' + METRIC_COLUMNS[k][2] + ')') if METRIC_COLUMNS[k][2] else '':>{width}}"
                                      for k in cols)
        lines = [head, units]

        def row(label: str, figures: dict[str, float]) -> str:
            return f"{label:<12}" + "".join(f"{_fmt(figures[k], METRIC_COLUMNS[k][1]):>{width}}" for k in cols)

        for c in self.cases:
            lines.append(row(c.case_id, c.figures()))
        lines.append("-" * len(head))
        lines.append(row(f"mean (n={len(self.cases)})", self.means()))
        notes = [f"Scorecard template: {self.template}; Scard = prediction, Scard-ref = reference dose, "
                 "max = best possible total for the case's structures",
                 "DVH: per-case mean error; the mean row is the official pooled OpenKBP DVH score"]
        if not self.gamma:
            notes.append("gamma pass rate not computed (--no-gamma)")
        if not self.ssim:
            notes.append("SSIM not computed (--no-ssim)")
        for case, reason in self.skipped.items():
            notes.append(f"skipped {case}: {reason}")
        return "\n".join(lines + notes)

    def to_dict(self, details: bool = True) -> dict[str, Any]:
        """JSON-ready form with the same figures as :meth:`table` (non-finite values -> null).

        Args:
            details: include each case's full Scorecard results (prediction and reference).
        """
        cases = []
        for c in self.cases:
            entry: dict[str, Any] = {"case_id": c.case_id,
                                     **{k: _json_num(v) for k, v in c.figures().items()},
                                     "scorecard_penalty": c.scorecard.penalty_total,
                                     "scorecard_ref_penalty": c.scorecard_ref.penalty_total,
                                     "seconds": round(c.seconds, 3)}
            if details:
                entry["scorecard_detail"] = c.scorecard.to_dict()
                entry["scorecard_ref_detail"] = c.scorecard_ref.to_dict()
            cases.append(entry)
        return {
            "schema": EVALUATION_SCHEMA,
            "pred_root": self.pred_root,
            "ref_root": self.ref_root,
            "template": self.template,
            "metrics": {k: {"title": t, "unit": u} for k, (t, _, u) in METRIC_COLUMNS.items()},
            "options": {"gamma": self.gamma, "ssim": self.ssim,
                        "gamma_criteria": "3 %/3 mm global, 10 % cut-off",
                        "gdp_hmm_mae": "reference D97(PTV-high) = Rx normalisation applied to both doses"},
            "n_cases": len(self.cases),
            "means": {k: _json_num(v) for k, v in self.means().items()},
            "cases": cases,
            "skipped": dict(self.skipped),
        }

    def write_json(self, path: str | Path, details: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(details=details), indent=2) + "\n")
        return path


def _fmt(value: float, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return fmt.format(value)


def _json_num(value: float) -> float | None:
    """Strict JSON has no NaN/Infinity: they become null (PSNR of identical doses is inf)."""
    return float(value) if value is not None and math.isfinite(value) else None


def list_case_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that hold NIfTI files, in natural order."""
    return sorted((p for p in root.iterdir() if p.is_dir()
                   and any(f.name.endswith((".nii.gz", ".nii")) for f in p.iterdir())),
                  key=lambda p: _natural_key(p.name))


def load_prediction(path: Path, ref_case: Case, ref_file: Path) -> np.ndarray:
    """Read a predicted dose and check it lies on the reference grid.

    Raises:
        CaseError: unreadable file, grid mismatch (naming both files), NaN/Inf, negative dose.
    """
    dose, affine = load_nifti(path, ref_case.case_id, np.float32)
    grid = Grid(shape=tuple(int(s) for s in dose.shape), affine=np.asarray(affine, dtype=np.float64))
    if not grid.same_as(ref_case.grid):
        raise CaseError(f"grid mismatch: prediction {path} has {grid.describe()}, reference {ref_file} has "
                        f"{ref_case.grid.describe()}" + ("" if grid.shape != ref_case.grid.shape
                                                         else " (same shape, different affine)"),
                        case=ref_case.case_id, file=str(path))
    if not np.isfinite(dose).all():
        raise CaseError(f"predicted dose has {int((~np.isfinite(dose)).sum())} NaN/Inf voxels",
                        case=ref_case.case_id, file=str(path))
    return dose


def evaluate_case(
    pred_dose_gy: np.ndarray,
    ref_case: Case,
    template: ScorecardTemplate,
    *,
    gamma: bool = True,
    with_ssim: bool = True,
) -> CaseEvaluation:
    """All figures of one predicted dose against one reference case (with dose and body).

    Args:
        pred_dose_gy: (I, J, K) predicted dose (Gy) on the reference grid.
        ref_case: reference case with ``dose_gy`` and ``body`` (possible-dose mask).
        template: Scorecard template.
        gamma: compute the gamma pass rate (the slowest metric after SSIM).
        with_ssim: compute SSIM (~5 s per 128^3 case on one CPU core).
    """
    # Imported here: diffkt3d.metrics.image imports MONAI (which pulls in transformers), several
    # seconds of CPU that other sub-commands building the CLI parser should not pay.
    from diffkt3d.metrics.image import psnr, ssim

    start = time.perf_counter()
    cid = ref_case.case_id
    if ref_case.dose_gy is None:
        raise CaseError("reference case has no dose.nii.gz", case=cid)
    if ref_case.body is None:
        raise CaseError("reference case has no possible_dose_mask.nii.gz / body.nii.gz", case=cid)
    ref = ref_case.dose_gy
    # Scorecards first: a template/structure problem (CaseError) fails before the slow metrics.
    scorecard = score_case(pred_dose_gy, ref_case, template)
    scorecard_ref = score_case(ref, ref_case, template)
    try:
        okbp = openkbp.score_case_object(ref_case, pred_dose_gy)
        highest = max(ref_case.targets.values(), default=None,
                      key=lambda s: -1.0 if s.prescription_gy is None else s.prescription_gy)
        if highest is None or highest.prescription_gy is None:
            mae = float("nan")
            log.warning("case %s: no target with a prescription; GDP-HMM MAE not computed", cid)
        else:
            mae = gdp_hmm.gdp_hmm_mae(ref, pred_dose_gy, ref_case.body, highest.mask,
                                      highest.prescription_gy, scale_prediction=True, case_id=cid)
        psnr_db = psnr(pred_dose_gy, ref)
        ssim_value = ssim(pred_dose_gy, ref) if with_ssim else float("nan")
        gamma_pct = gamma_pass_rate(ref, pred_dose_gy, ref_case.grid.spacing_mm) if gamma else float("nan")
    except ValueError as exc:  # metric modules report bad input as ValueError
        raise CaseError(str(exc), case=cid) from None
    return CaseEvaluation(
        case_id=cid, dose_score=okbp.dose_score, dvh_score=okbp.dvh_score, dvh_errors=okbp.dvh_errors,
        gdp_hmm_mae=mae, psnr=psnr_db, ssim=ssim_value, gamma_pass_rate=gamma_pct,
        scorecard=scorecard, scorecard_ref=scorecard_ref,
        seconds=time.perf_counter() - start)


# What a planner reads when comparing a prediction with the case's own (reference) dose.
REFERENCE_FIGURES = ("gamma_pass_rate", "dose_score", "dvh_score", "scorecard")


def reference_comparison(doses: dict[str, np.ndarray], ref_case: Case,
                         template: str | Path | ScorecardTemplate = DEFAULT_TEMPLATE) -> dict[str, Any]:
    """Each predicted dose against the case's own dose, as JSON (the server's `compare` answer).

    Args:
        doses: candidate id -> (I, J, K) dose (Gy) on the case grid.
        ref_case: the case with its dose (`dose_gy`) and possible-dose / body mask.
        template: the Scorecard template the candidates were scored with.

    Returns:
        {"criteria": gamma criteria text, "reference": {"scorecard": JSON, "scorecard_total"},
        "candidates": {id: {gamma_pass_rate (%), dose_score (Gy), dvh_score (Gy), scorecard (total)}}};
        undefined figures are null.
    """
    tmpl = load_template(template)
    out: dict[str, Any] = {"criteria": "gamma 3 %/3 mm global, 10 % cut-off; OpenKBP dose and DVH scores (Gy)",
                           "reference": None, "candidates": {}}
    for cid, dose in doses.items():
        ev = evaluate_case(dose, ref_case, tmpl, gamma=True, with_ssim=False)
        figures = ev.figures()
        out["candidates"][cid] = {k: _json_num(figures[k]) for k in REFERENCE_FIGURES}
        if out["reference"] is None:
            out["reference"] = {"scorecard": ev.scorecard_ref.to_dict(),
                                "scorecard_total": _json_num(ev.scorecard_ref.total)}
    return out


def evaluate(
    pred_root: str | Path,
    ref_root: str | Path,
    *,
    template: str | Path | ScorecardTemplate = DEFAULT_TEMPLATE,
    cases: Sequence[str] | None = None,
    allow_missing: bool = False,
    gamma: bool = True,
    with_ssim: bool = True,
) -> EvaluationReport:
    """Evaluate every reference case (or ``cases``) against ``pred_root/<case>/dose.nii.gz``.

    Args:
        pred_root: folder of ``<case>/dose.nii.gz`` predictions.
        ref_root: folder of reference case folders (with dose.nii.gz and the possible-dose mask).
        template: Scorecard template name or path.
        cases: case ids to evaluate (default: every reference case folder).
        allow_missing: skip (and list) cases without a prediction instead of failing.
        gamma, with_ssim: compute those (slow) metrics.

    Raises:
        CaseError: missing roots, predictions missing for some cases (all named) unless
            ``allow_missing``, grid mismatch, unreadable files.
    """
    pred_root, ref_root = Path(pred_root), Path(ref_root)
    for what, root in (("prediction", pred_root), ("reference", ref_root)):
        if not root.is_dir():
            raise CaseError(f"{what} root is not a folder", file=str(root))
    if (ref_root / DOSE_FILE).exists():
        raise CaseError("--ref must be a folder OF case folders, but it is a case folder itself "
                        "(pass its parent)", file=str(ref_root))
    tpl = load_template(template)
    ref_folders = {p.name: p for p in list_case_folders(ref_root)}
    if cases:
        unknown = [c for c in cases if c not in ref_folders]
        if unknown:
            raise CaseError(f"requested case(s) not in the reference root: {', '.join(unknown)}",
                            file=str(ref_root))
        ref_folders = {c: ref_folders[c] for c in cases}
    if not ref_folders:
        raise CaseError("no case folders (sub-folders with .nii.gz files) in the reference root",
                        file=str(ref_root))

    report = EvaluationReport(str(pred_root), str(ref_root), f"{tpl.name} v{tpl.version}",
                              gamma=gamma, ssim=with_ssim)
    no_ref_dose = [c for c, p in ref_folders.items() if not (p / DOSE_FILE).exists()]
    for c in no_ref_dose:
        report.skipped[c] = f"reference has no {DOSE_FILE}"
        log.warning("case %s: reference has no %s; skipped", c, DOSE_FILE)
    todo = [c for c in ref_folders if c not in no_ref_dose]
    missing = [c for c in todo if not (pred_root / c / DOSE_FILE).exists()]
    if missing and not allow_missing:
        raise CaseError(f"no prediction {DOSE_FILE} for {len(missing)} of {len(todo)} case(s): "
                        f"{', '.join(missing)} (use --allow-missing to skip them)", file=str(pred_root))
    for c in missing:
        report.skipped[c] = f"no prediction {pred_root / c / DOSE_FILE}"
        log.warning("case %s: no prediction; skipped (--allow-missing)", c)
    extra = sorted((p.name for p in pred_root.iterdir() if p.is_dir() and (p / DOSE_FILE).exists()
                    and p.name not in ref_folders), key=_natural_key)
    if extra and not cases:
        log.warning("predictions without a reference case are ignored: %s", ", ".join(extra))

    todo = [c for c in todo if c not in missing]
    for i, cid in enumerate(todo, 1):
        ref_case = load_case_folder(ref_folders[cid])
        pred = load_prediction(pred_root / cid / DOSE_FILE, ref_case, ref_folders[cid] / DOSE_FILE)
        result = evaluate_case(pred, ref_case, tpl, gamma=gamma, with_ssim=with_ssim)
        report.cases.append(result)
        log.info("[%d/%d] %s: dose score %.3f Gy, Scorecard %.2f (reference %.2f) in %.1f s", i, len(todo),
                 cid, result.dose_score, result.scorecard.total, result.scorecard_ref.total, result.seconds)
    return report


def score_references(ref_root: str | Path, template: str | Path | ScorecardTemplate = DEFAULT_TEMPLATE,
                     cases: Iterable[str] | None = None) -> list[ScorecardResult]:
    """Scorecards of the reference doses of every case folder under ``ref_root`` that has a dose."""
    tpl = load_template(template)
    folders = list_case_folders(Path(ref_root))
    if cases is not None:
        wanted = set(cases)
        folders = [p for p in folders if p.name in wanted]
    out = []
    for p in folders:
        if not (p / DOSE_FILE).exists():
            log.warning("case %s: no %s; not scored", p.name, DOSE_FILE)
            continue
        case = load_case_folder(p)
        out.append(score_case(case.dose_gy, case, tpl))
    return out


__all__ = [
    "EVALUATION_SCHEMA",
    "METRIC_COLUMNS",
    "CaseEvaluation",
    "EvaluationReport",
    "evaluate",
    "evaluate_case",
    "list_case_folders",
    "load_prediction",
    "score_references",
]
