"""`diffkt3d train --config FILE`: Stage A Any2Any then Stage B dose fine-tune (resumable)."""

from __future__ import annotations

import argparse

from diffkt3d.training.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the Any2Any DiT from a YAML config",
                       description="Resumes from OUT_DIR/last.pt when present. See configs/*.yaml.")
    p.add_argument("--config", required=True, help="training YAML (e.g. configs/cpu-default.yaml)")
    p.add_argument("--out-dir", default=None, help="override out_dir")
    p.add_argument("--stage", default="supervised", choices=["supervised", "scardnft"],
                   help="supervised = Stage A + B (default); scardnft = RL post-training")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if last.pt exists")
    p.add_argument("--device", default=None)
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel training with N processes via torchrun (one per GPU; gloo on CPU); "
                        "see docs/gpu.md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.stage == "scardnft":
        from diffkt3d.training.scardnft import run_scardnft_from_yaml

        run_scardnft_from_yaml(args.config, out_dir=args.out_dir, device=args.device)
        return 0
    if args.nproc:
        from diffkt3d.training.distributed import launch_distributed

        extra = (["--out-dir", args.out_dir] if args.out_dir else []) + (["--no-resume"] if args.no_resume else [])
        return launch_distributed(args.config, args.nproc, extra_args=extra).returncode
    from diffkt3d.training.trainer import run_training

    cfg = TrainConfig.from_yaml(args.config, out_dir=args.out_dir)
    path = run_training(cfg, device=args.device, resume=not args.no_resume)
    print(f"final checkpoint: {path}")
    return 0
