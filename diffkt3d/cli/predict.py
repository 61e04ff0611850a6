"""`diffkt3d predict CASE... --out ROOT`: dose for each case folder, plus its Scorecard."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from diffkt3d.cli.checks import require_at_least
from diffkt3d.io.case_folder import load_case_folder, save_nifti

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict the dose of case folders",
                       description="Writes ROOT/<case>/dose.nii.gz (Gy, float32, case grid) and scorecard.json.")
    p.add_argument("cases", nargs="+", help="case folders (a stored dose.nii.gz is ignored)")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped CPU model)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    p.add_argument("--preview", action="store_true", help="1-step preview")
    p.add_argument("--candidates", type=int, default=1, help="samples per case; best by Scorecard")
    p.add_argument("--aggregate", choices=["best", "mean"], default="best",
                   help="best-of-n by Scorecard, or per-voxel mean of the candidates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default="openkbp_hn", help="Scorecard template name or YAML path")
    p.add_argument("--save-candidates", action="store_true", help="also write dose_<candidate>.nii.gz")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffkt3d.inference import Predictor
    from diffkt3d.inference.predictor import DOSE_PREDICTION_INPUTS

    require_at_least(args, {"steps": 1, "candidates": 1, "seed": 0})
    predictor = Predictor.load(args.model, device=args.device)
    out_root = Path(args.out)
    for folder in args.cases:
        case = load_case_folder(folder, with_dose=False)
        case.validate(require=DOSE_PREDICTION_INPUTS)  # the server's policy too (infer_tasks/dose.py)
        for note in case.plan.inferred:
            log.info("%s: inferred %s", case.case_id, note)
        pred = predictor.predict_dose(case, steps=args.steps, candidates=args.candidates, seed=args.seed,
                                      preview=args.preview, aggregate=args.aggregate, template=args.template)
        out = out_root / case.case_id
        save_nifti(pred.dose_gy, case.grid, out / "dose.nii.gz")
        if args.save_candidates:
            for c in pred.candidates:
                save_nifti(c.dose_gy, case.grid, out / f"dose_{c.id}.nii.gz")
        report = {"case": case.case_id, "model_version": pred.model_version, "steps": pred.steps,
                  "seed": pred.seed, "aggregate": pred.aggregate, "chosen": pred.chosen_id,
                  "scorecard": pred.scorecard, "timings": pred.timings, "inferred": case.plan.inferred,
                  "candidates": [{"id": c.id, "seed": c.seed, "total": c.scorecard["total"] if c.scorecard else None}
                                 for c in pred.candidates]}
        (out / "scorecard.json").write_text(json.dumps(report, indent=2))
        total = pred.scorecard["total"] if pred.scorecard else float("nan")
        print(f"{case.case_id}: dose -> {out / 'dose.nii.gz'}  Scorecard {total:.2f}  "
              f"({pred.steps} steps, {len(pred.candidates)} candidate(s), {pred.timings['total_s']:.1f} s)")
    return 0
