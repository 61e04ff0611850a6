"""Capture, or compare, what the shipped model outputs on the sample cases, array for array.

A refactor that claims "behaviour unchanged" proves it here: capture on the old tree, capture on the
new one, compare. Identical bytes are the bar (the seeded sampler is deterministic on one machine);
the pytest guard (tests/inference/test_shipped_outputs.py) checks the same outputs with a tolerance
that holds across machines.

    python benchmarks/output_identity.py capture OUT.npz [--model CKPT]
    python benchmarks/output_identity.py compare BEFORE.npz AFTER.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASES = ("pt_201", "pt_202", "pt_205")
IMPUTE_CASE = "pt_201"


def capture(out: Path, model: str | None = None) -> dict[str, np.ndarray]:
    """10-step doses with two candidates, a 1-step preview, and the three imputations of one case."""
    import torch

    from diffkt3d.inference import Predictor
    from diffkt3d.io.case_folder import load_case_folder

    torch.set_num_threads(1)  # thread count can change float reduction order
    predictor = Predictor.load(model, device="cpu")
    arrays: dict[str, np.ndarray] = {}
    for case_id in CASES:
        case = load_case_folder(REPO / "sample-data" / case_id, with_dose=False)
        pred = predictor.predict_dose(case, steps=10, candidates=2, seed=0)
        arrays[f"{case_id}/dose10"] = pred.dose_gy
        for k, cand in enumerate(pred.candidates):
            arrays[f"{case_id}/cand{k}"] = cand.dose_gy
        arrays[f"{case_id}/preview"] = predictor.predict_dose(case, preview=True, seed=3).dose_gy
    case = load_case_folder(REPO / "sample-data" / IMPUTE_CASE, with_dose=True)
    for target in ("ct", "ptv", "oar"):
        result = predictor.impute(case, target, steps=10, seed=0)
        if result.ct_hu is not None:
            arrays[f"impute_{target}/ct"] = result.ct_hu
        for name, mask in result.masks.items():
            arrays[f"impute_{target}/{name}"] = np.asarray(mask)
    np.savez_compressed(out, **arrays)
    return arrays


def compare(before: Path, after: Path) -> bool:
    """Print one line per array; True when every array has the same shape, dtype and bytes."""
    a, b = np.load(before), np.load(after)
    same_all = True
    for key in sorted(set(a.files) | set(b.files)):
        if key not in a.files or key not in b.files:
            print(f"{key:32s} MISSING in {'before' if key not in a.files else 'after'}")
            same_all = False
            continue
        x, y = a[key], b[key]
        same = x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64)).max() if x.shape == y.shape else float("nan")
        print(f"{key:32s} {'identical' if same else 'DIFFERENT'}  max |diff| {diff:.3g}")
        same_all &= same
    print("ALL BIT-IDENTICAL" if same_all else "NOT IDENTICAL")
    return same_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cap = sub.add_parser("capture")
    cap.add_argument("out", type=Path)
    cap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "capture":
        arrays = capture(args.out, args.model)
        print(f"captured {len(arrays)} arrays to {args.out}")
        return 0
    return 0 if compare(args.before, args.after) else 1


if __name__ == "__main__":
    sys.exit(main())
