"""`diffkt3d evaluate --pred ROOT --ref ROOT [--json FILE]`: per-case and mean dose figures.

Prints one row per case (OpenKBP dose and DVH score, GDP-HMM MAE, PSNR, SSIM, gamma pass rate,
Scorecard of the prediction and of the reference) and the means; ``--json`` writes the same
figures (schema in docs/scorecard.md). The work is done by :mod:`diffkt3d.evaluation`.
"""

from __future__ import annotations

import argparse
import logging

from diffkt3d.constants import DEFAULT_TEMPLATE
from diffkt3d.scorecard import list_templates

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="compare predicted doses with reference case folders",
        description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--pred", required=True, metavar="ROOT", help="folder of <case>/dose.nii.gz predictions")
    p.add_argument("--ref", required=True, metavar="ROOT",
                   help="folder of reference case folders (OpenKBP layout, with dose.nii.gz)")
    p.add_argument("--json", metavar="FILE", help="also write the figures (and Scorecard details) as JSON")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, metavar="NAME|PATH",
                   help=f"Scorecard template: shipped name ({', '.join(list_templates())}) or a .yaml file "
                        f"(default {DEFAULT_TEMPLATE})")
    p.add_argument("--cases", nargs="+", metavar="CASE", help="evaluate only these case ids")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip (and list) cases without a prediction instead of failing")
    p.add_argument("--no-gamma", action="store_true",
                   help="skip the gamma pass rate (about 1-4 s per 128^3 case on one core)")
    p.add_argument("--no-ssim", action="store_true", help="skip SSIM (about 5 s per 128^3 case on one core)")
    p.add_argument("--no-details", action="store_true",
                   help="leave the per-item Scorecard results out of the JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffkt3d.evaluation import evaluate  # heavy metric imports only when evaluating

    report = evaluate(args.pred, args.ref, template=args.template, cases=args.cases,
                      allow_missing=args.allow_missing, gamma=not args.no_gamma, with_ssim=not args.no_ssim)
    print(report.table())
    if args.json:
        path = report.write_json(args.json, details=not args.no_details)
        log.info("wrote %s", path)
    return 0
