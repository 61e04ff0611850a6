"""`diffkt3d impute --target ct|ptv|oar CASE... --out ROOT`: generate a missing modality."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from diffkt3d.cli.checks import add_latent_model_args, require_at_least
from diffkt3d.constants import DEFAULT_SEED, DEFAULT_STEPS, IMPUTABLE
from diffkt3d.errors import ConfigError
from diffkt3d.inference.ct_backbone import CT_BACKBONES, PRDIT_SAMPLERS, CTImputationConfig
from diffkt3d.io.case_folder import load_case_folder, save_nifti
from diffkt3d.io.imputed_case import MASK_ROLES, write_imputed_case


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("impute", help="impute CT, PTV or OAR masks of case folders",
                       description="Writes ROOT/<case>/ct.nii.gz (HU) or one <Structure>.nii.gz per mask; "
                                   "with --write-case ROOT/<case> is the whole case with the imputed "
                                   "structures in it, ready for `diffkt3d export dicom`.")
    p.add_argument("cases", nargs="+", help="case folders")
    p.add_argument("--target", required=True, choices=IMPUTABLE)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped CPU model)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--device", default=None)
    p.add_argument("--write-case", action="store_true",
                   help="(--target ptv / oar) write ROOT/<case> as a complete case folder: the input case's "
                        "files, the imputed structures added or replacing those of the same name, and plan.json "
                        "with their roles, prescriptions and `imputed_by` (model version); ROOT/<case> must not "
                        "hold files yet")
    p.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                   help="(--target ptv / oar) the structures to write, e.g. SpinalCord Larynx (default: every one "
                        "the model imputes; an unknown name is refused with the list of known ones)")
    add_latent_model_args(p)
    g = p.add_argument_group("CT backbone", "PRDiT as an alternative CT-imputation backbone")
    g.add_argument("--ct-backbone", choices=CT_BACKBONES, default="any2any",
                   help="model that imputes the CT (default: the Any2Any DiT of --model)")
    g.add_argument("--prdit-model", default=None, help="PRDiT checkpoint (required with --ct-backbone prdit)")
    g.add_argument("--prdit-k", type=float, default=CTImputationConfig.prdit_k,
                   help="predictor multiplier k of Algorithm 1 (1 = cold deterministic)")
    g.add_argument("--prdit-sampler", choices=PRDIT_SAMPLERS, default=CTImputationConfig.prdit_sampler)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffkt3d.inference import Predictor
    from diffkt3d.inference.prdit_predictor import PRDiTCTPredictor

    require_at_least(args, {"steps": 1, "seed": 0})
    if args.write_case and args.target not in MASK_ROLES:
        raise ConfigError(f"--write-case writes imputed structures (--target {' / '.join(MASK_ROLES)}); an imputed "
                          "CT is written as ROOT/<case>/ct.nii.gz without it")
    if args.structures and args.target == "ct":
        raise ConfigError("--structures selects masks of --target ptv / oar; a CT imputation has none")
    ct_config = CTImputationConfig(backbone=args.ct_backbone, prdit_model=args.prdit_model,
                                   prdit_k=args.prdit_k, prdit_sampler=args.prdit_sampler)
    if ct_config.uses_prdit:
        if args.target != "ct":
            raise ConfigError(f"--ct-backbone prdit imputes CT only; --target {args.target} needs the Any2Any model")
        predictor = PRDiTCTPredictor.load(ct_config)
    else:
        predictor = Predictor.load(args.model, device=args.device, vae_dir=args.vae_dir,
                               latent_cache_dir=args.latent_cache_dir)
    for folder in args.cases:
        case = load_case_folder(folder)
        out = Path(args.out) / case.case_id
        if out.resolve() == Path(folder).resolve():
            raise ConfigError(f"--out {args.out} would write into the input case folder {folder}; choose another "
                              "--out (the input case is never overwritten)")
        kwargs = {}
        if args.structures:
            try:
                kwargs["structures"] = predictor.check_structures(case, args.target, args.structures)
            except ValueError as exc:
                raise ConfigError(f"--structures: {exc}") from None
        res = predictor.impute(case, args.target, steps=args.steps, seed=args.seed, **kwargs)
        extra: dict = {}
        if args.write_case:
            written_case = write_imputed_case(folder, case, res.masks, args.target, res.model_version, out)
            written = [out / f"{n}.nii.gz" for n in (*written_case.added, *written_case.replaced)]
            extra = {"case_folder": True, "added": written_case.added, "replaced": written_case.replaced,
                     "empty": written_case.empty, "input_kept": written_case.kept}
        else:
            written = []
            if res.ct_hu is not None:
                written.append(save_nifti(np.round(res.ct_hu), case.grid, out / "ct.nii.gz", np.int16))
            for name, mask in res.masks.items():
                written.append(save_nifti(mask, case.grid, out / f"{name}.nii.gz", np.uint8))
        (out / f"impute_{args.target}.json").write_text(json.dumps(
            {"case": case.case_id, "target": args.target, "steps": res.steps, "seed": res.seed,
             "model_version": res.model_version, "timings": res.timings,
             "quality": res.quality.to_dict() if res.quality else None, "warnings": res.warnings,
             "files": [p.name for p in written], **extra, **({"latent": res.latent} if res.latent else {})}, indent=2))
        for warning in res.warnings:
            print(f"{case.case_id}: WARNING: {warning}", file=sys.stderr)
        if args.write_case:
            print(f"{case.case_id}: imputed {args.target} -> case folder {out} ({written_case.summary()})")
        else:
            print(f"{case.case_id}: imputed {args.target} -> {', '.join(p.name for p in written)}")
    return 0
