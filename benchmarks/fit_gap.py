"""Under- or over-fitting: the trainer's 1-step validation proxy on training cases and on validation cases.

The proxy (``training.trainer.one_step_dose_mae``: 1-step dose |error| in Gy inside the body, on
the working grid, seeded noise) is run with the same model on N training cases (a seeded random
choice) and on the first N validation cases; with N = 8 the validation figure is the one the
trainer computed to select the checkpoint. If the two are close, the model has not learnt the
training cases better than unseen ones: it is limited by what it can learn in its budget (steps,
capacity), not by the amount of data, and more data alone would not help. Each model is a
checkpoint file; several can be compared in one run.

    python benchmarks/fit_gap.py --models diffkt3d/weights/cpu-default.pt [more.pt ...] [--cases 40]

writes benchmarks/results/fit_gap.md / .json with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine_info import case_dirs, describe_machine, openkbp_dir, write_results  # noqa: E402

from diffkt3d.models.checkpoint import load_checkpoint  # noqa: E402
from diffkt3d.training.dataset import EncodedCaseSet, build_cache  # noqa: E402
from diffkt3d.training.trainer import one_step_dose_mae  # noqa: E402


def case_sets(encoding, args: argparse.Namespace) -> dict[str, EncodedCaseSet]:
    """{"train": a seeded random choice of N training case folders, "validation": the first N}, those
    with a dose (so possibly fewer than N; the report gives the counts). Only the chosen folders are
    encoded, so a few cases cost seconds, not the whole split."""
    out = {}
    for split, roots in (("train", args.train_roots), ("validation", args.val_roots)):
        dirs = case_dirs(roots)
        if split == "train":
            random.Random(args.seed).shuffle(dirs)
        files = build_cache(dirs[: args.cases], encoding, args.cache_dir, with_plates=True)
        out[split] = EncodedCaseSet([c for c in EncodedCaseSet.from_cache(files).cases if "dose" in c.tensors])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[str(ROOT / "diffkt3d/weights/cpu-default.pt")])
    p.add_argument("--train-roots", nargs="+", default=[openkbp_dir("train")])
    p.add_argument("--val-roots", nargs="+", default=[openkbp_dir("validation")])
    p.add_argument("--cache-dir", default=str(ROOT / "runs/cache"))
    p.add_argument("--cases", type=int, default=40, help="cases per split")
    p.add_argument("--seed", type=int, default=0, help="choice of the training cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/fit_gap"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    rows = []
    sets_by_encoding: dict[str, dict[str, EncodedCaseSet]] = {}  # models of one recipe share their cases
    for path in args.models:
        bundle = load_checkpoint(path)
        key = json.dumps(bundle.encoding.to_dict(), sort_keys=True)
        if key not in sets_by_encoding:
            sets_by_encoding[key] = case_sets(bundle.encoding, args)
        sets = sets_by_encoding[key]
        row = {"model": path, "version": bundle.version, "global_step": bundle.meta.get("global_step")}
        for split, cases in sets.items():
            t0 = time.perf_counter()
            row[split] = one_step_dose_mae(bundle.model, cases, bundle.encoding.dose_scale_gy)
            row[f"{split}_cases"] = len(cases.cases)
            row[f"{split}_seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"# Fit gap: 1-step validation proxy on training and validation cases ({started:%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {describe_machine()}", "",
             f"Command: `python benchmarks/fit_gap.py {' '.join(sys.argv[1:])}`", "",
             "1-step dose |error| in Gy inside the body on the working grid (the trainer's proxy, "
             "`training.trainer.one_step_dose_mae`, seeded noise).", "",
             "| model | training steps | train cases | train (Gy) | validation cases | validation (Gy) | validation - train (Gy) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['version']} | {r['global_step']} | {r['train_cases']} | {r['train']:.3f} | "
                     f"{r['validation_cases']} | {r['validation']:.3f} | {r['validation'] - r['train']:+.3f} |")
    write_results(args.out, lines, started, args=vars(args), rows=rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
