"""`diffkt3d predict CASE... --out ROOT`: dose for each case folder, plus its Scorecard."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from diffkt3d.cli.checks import add_latent_model_args, require_at_least
from diffkt3d.constants import (
    AGGREGATES,
    DEFAULT_AGGREGATE,
    DEFAULT_CANDIDATES,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
    PREVIEW_STEPS,
)
from diffkt3d.io.case_folder import load_case_folder, save_nifti

log = logging.getLogger(__name__)

RESULT_FILE = "scorecard.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict the dose of case folders",
                       description=f"Writes ROOT/<case>/dose.nii.gz (Gy, float32, case grid) and {RESULT_FILE} "
                                   "(the dose result: Scorecard, DVH table, candidates; docs/request-format.md).")
    p.add_argument("cases", nargs="+", help="case folders (a stored dose.nii.gz is ignored)")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped CPU model)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    p.add_argument("--preview", action="store_true", help=f"{PREVIEW_STEPS}-step preview")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="samples per case; best by Scorecard")
    p.add_argument("--aggregate", choices=AGGREGATES, default=DEFAULT_AGGREGATE,
                   help="best-of-n by Scorecard, or per-voxel mean of the candidates")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="Scorecard template name or YAML path")
    p.add_argument("--save-candidates", action="store_true", help="also write dose_<candidate>.nii.gz")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    add_latent_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffkt3d.inference import Predictor
    from diffkt3d.inference.predictor import DOSE_PREDICTION_INPUTS

    require_at_least(args, {"steps": 1, "candidates": 1, "seed": 0})
    predictor = Predictor.load(args.model, device=args.device, vae_dir=args.vae_dir,
                               latent_cache_dir=args.latent_cache_dir)
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
        (out / RESULT_FILE).write_text(json.dumps(pred.to_dict(), indent=2))
        total = pred.chosen.total_score
        print(f"{case.case_id}: dose -> {out / 'dose.nii.gz'}  Scorecard {total:.2f}  "
              f"({pred.steps} steps, {len(pred.candidates)} candidate(s), {pred.timings['total_s']:.1f} s)")
    return 0
