"""`diffkt3d train CONFIG [--data-root DIR] [--set KEY=VALUE]`: Stage A Any2Any then Stage B dose (resumable).

`--stage scardnft` runs the RL post-training recipe, `--stage full-res` trains a full-resolution
cascade stage under a frozen base checkpoint (docs/full-res.md); both read their own recipe type.

The recipe file holds every setting; `--set` overrides go on top of it through the same core
function the server's train tasks use (diffkt3d.training.recipe), so both build the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from diffkt3d.errors import ConfigError
from diffkt3d.training.config import TrainConfig
from diffkt3d.training.recipe import DATA_ROOT_ENV, load_recipe, parse_assignments

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the Any2Any DiT from a YAML recipe",
                       description="Resumes from OUT_DIR/last.pt when present. See configs/*.yaml.")
    p.add_argument("config_path", nargs="?", metavar="CONFIG", help="training YAML (e.g. configs/cpu-default.yaml)")
    p.add_argument("--config", dest="config_option", metavar="CONFIG", help="the same, as an option")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help=f"folder the recipe's relative train_roots/val_roots are under (default: ${DATA_ROOT_ENV})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe field, VALUE read as YAML (repeatable), e.g. --set stages.dose.steps=500")
    p.add_argument("--out-dir", default=None, help="override out_dir")
    p.add_argument("--stage", default="supervised", choices=["supervised", "scardnft", "full-res"],
                   help="supervised = Stage A + B (default); scardnft = RL post-training; full-res = a "
                        "full-resolution stage under the recipe's base_model (configs/full-res-*.yaml)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if last.pt exists")
    p.add_argument("--device", default=None)
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel training with N processes via torchrun (one per GPU; gloo on CPU); "
                        "see docs/gpu.md")
    smoke = p.add_argument_group("smoke run", "check a recipe end to end quickly; the result is not a model to "
                                 "ship and goes to <out_dir>-smoke unless --out-dir is given")
    smoke.add_argument("--max-steps", type=int, default=None,
                       help="cap every stage at N optimiser steps (scardnft: N iterations); budgets still apply")
    smoke.add_argument("--max-cases", type=int, default=None,
                       help="use only the first N case folders of the training and of the validation roots")
    p.set_defaults(func=run)


def apply_smoke_limits(cfg: TrainConfig, max_steps: int | None, max_cases: int | None,
                       out_dir_given: bool = False) -> TrainConfig:
    """Return `cfg` with every stage capped at `max_steps` and the data roots cut to `max_cases` cases.

    The roots become explicit case folders (`train_roots` accepts those), so the encoded-case cache
    of a full run is reused and nothing else in the recipe changes. Without an explicit out_dir the
    run goes to `<out_dir>-smoke`, so a smoke run never resumes from or overwrites the real run.
    """
    if max_steps is not None:
        cfg = dataclasses.replace(cfg, stages=[dataclasses.replace(s, steps=min(s.steps, max_steps))
                                               for s in cfg.stages])
    if max_cases is not None:
        from diffkt3d.training.dataset import list_case_dirs

        cfg = dataclasses.replace(cfg, train_roots=[str(p) for p in list_case_dirs(cfg.train_roots)[:max_cases]],
                                  val_roots=[str(p) for p in list_case_dirs(cfg.val_roots)[:max_cases]])
    if max_steps is not None or max_cases is not None:
        if not out_dir_given:
            cfg = dataclasses.replace(cfg, out_dir=f"{cfg.out_dir.rstrip('/')}-smoke")
        log.warning("smoke run (--max-steps %s, --max-cases %s) into %s: not a model to ship",
                    max_steps, max_cases, cfg.out_dir)
    return cfg


def config_path(args: argparse.Namespace) -> str:
    """The recipe, given as the positional CONFIG or as --config (one of them)."""
    given = [c for c in (args.config_path, args.config_option) if c]
    if not given:
        raise ConfigError("no training config: pass CONFIG (e.g. configs/cpu-default.yaml) or --config CONFIG")
    if len(given) == 2 and given[0] != given[1]:
        raise ConfigError(f"two training configs given ({given[0]} and --config {given[1]}); pass one")
    return given[0]


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The supervised run these arguments ask for: recipe + --set + --out-dir, then the smoke limits."""
    overrides = parse_assignments(args.overrides)
    if args.out_dir is not None:
        overrides["out_dir"] = args.out_dir
    cfg = load_recipe(config_path(args), overrides, data_root=args.data_root)
    return apply_smoke_limits(cfg, args.max_steps, args.max_cases, out_dir_given=args.out_dir is not None)


def run(args: argparse.Namespace) -> int:
    smoke = args.max_steps is not None or args.max_cases is not None
    for name, value in (("--max-steps", args.max_steps), ("--max-cases", args.max_cases)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, found {value}")
    if args.stage == "scardnft":
        return _run_scardnft(args)
    if args.stage == "full-res":
        return _run_full_res(args)
    from diffkt3d.training.pipeline import run_pipeline

    cfg = train_config_from_args(args)
    train_dit = None
    if args.nproc:
        if smoke:
            raise ConfigError("--max-steps/--max-cases are not supported with --nproc")
        from pathlib import Path

        from diffkt3d.errors import DiffKT3DError
        from diffkt3d.training.distributed import launch_distributed

        extra = (["--out-dir", args.out_dir] if args.out_dir else []) + (["--no-resume"] if args.no_resume else [])
        extra += (["--data-root", args.data_root] if args.data_root else [])
        extra += [a for item in args.overrides for a in ("--set", item)]

        def train_dit() -> Path:
            code = launch_distributed(config_path(args), args.nproc, extra_args=extra).returncode
            if code != 0:
                raise DiffKT3DError(f"distributed DiT training failed (exit {code}); the full-res stages were not run")
            return Path(cfg.out_dir) / "final.pt"
    path = run_pipeline(cfg, data_root=args.data_root, device=args.device, resume=not args.no_resume,
                        max_steps=args.max_steps, max_cases=args.max_cases, train_dit=train_dit)
    stages = f" (the DiT + {len(cfg.full_res_stages)} full-res stage(s))" if cfg.full_res_stages else ""
    print(f"final checkpoint{stages}: {path}")
    return 0


def _run_scardnft(args: argparse.Namespace) -> int:
    """--stage scardnft: the ScardNFT recipe with --set overrides; the smoke options cap iterations and cases."""
    from diffkt3d.training.recipe import load_scardnft_recipe
    from diffkt3d.training.scardnft import run_scardnft

    cfg = load_scardnft_recipe(config_path(args), parse_assignments(args.overrides), data_root=args.data_root)
    out_dir = args.out_dir
    if args.max_steps is not None or args.max_cases is not None:
        # smoke run: --max-steps caps the iterations (one case group each), --max-cases the cases
        limits = {"iterations": min(cfg.iterations, args.max_steps) if args.max_steps else cfg.iterations,
                  "max_cases": min(cfg.max_cases or args.max_cases, args.max_cases) if args.max_cases else cfg.max_cases}
        cfg = dataclasses.replace(cfg, **limits)
        out_dir = out_dir or f"{cfg.out_dir.rstrip('/')}-smoke"
        log.warning("ScardNFT smoke run (%s) into %s: not a model to ship", limits, out_dir)
    result = run_scardnft(cfg, out_dir=out_dir, device=args.device)
    log.info("adapter: %s; merged checkpoint: %s", result.adapter_path, result.merged_path)
    print(f"merged checkpoint: {result.merged_path}")
    return 0


def _run_full_res(args: argparse.Namespace) -> int:
    """--stage full-res: the full-res recipe with --set overrides; the smoke options cap steps and cases."""
    from diffkt3d.training.full_res_trainer import run_full_res_training
    from diffkt3d.training.recipe import load_full_res_recipe

    if args.nproc:
        raise ConfigError("--nproc is not supported with --stage full-res")
    overrides = parse_assignments(args.overrides)
    if args.out_dir is not None:
        overrides["out_dir"] = args.out_dir
    cfg = load_full_res_recipe(config_path(args), overrides, data_root=args.data_root)
    if args.max_steps is not None or args.max_cases is not None:
        limits = {"steps": min(cfg.steps, args.max_steps) if args.max_steps else cfg.steps,
                  "max_cases": min(cfg.max_cases or args.max_cases, args.max_cases) if args.max_cases
                  else cfg.max_cases}
        if args.out_dir is None:
            limits["out_dir"] = f"{cfg.out_dir.rstrip('/')}-smoke"
        cfg = dataclasses.replace(cfg, **limits)
        log.warning("full-res smoke run (%s) into %s: not a model to ship", limits, cfg.out_dir)
    path = run_full_res_training(cfg, device=args.device, resume=not args.no_resume)
    print(f"final checkpoint (base model + full-res {cfg.stage.target} stage): {path}")
    return 0
