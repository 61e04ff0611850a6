"""Full-resolution stage benchmark: the cascade (DiT + stage) vs its plain U-Net peer vs the DiT alone.

For each of the first N cases of a split (OpenKBP validation by default), these variants of one
target:

- ``model``: the checkpoint with its full-res stage, through ``Predictor`` (what a user gets);
- ``base``: the same checkpoint with the stage left out (the 64^3 DiT upsampled: the floor the
  stage is meant to lift);
- ``peer``: the same trainer with ``stage.coarse_input: false`` (a MONAI BasicUNet with the same
  inputs, crops, loss and CPU budget), run directly on the case grid (``inference.full_res``),
  so its seconds are its own and not those of a DiT sampling run it would ignore;
- ``baseline`` (ct and ptv): the simple baseline of ``benchmarks/baselines.py``, fitted on the
  first ``--baseline-cases`` training cases: the label-mean CT, the PTV70 atlas.

Figures per target: dose, the OpenKBP dose and DVH scores (Gy, lower is better); ct, the MAE in
the body (HU); oar, per-OAR Dice and 95 % Hausdorff distance (mm, MONAI metrics); ptv, PTV70
Dice and HD95. Then paired Wilcoxon signed-rank tests (scipy) per figure, model vs peer and model
vs base, over the cases both have.

Every variant reads the case from a copy of its folder without the target's files (OAR masks, the
PTVs, ct.nii.gz or dose.nii.gz): the prediction cannot see what it is scored against. Cases
without a CT are kept (the model must cope with a missing modality) and the OAR and PTV figures
are also given over the cases that have one. ``--record-quality`` writes the model's figures into
its checkpoint (``meta["quality"]``, the imputation quality gate of ``inference.quality``).
Commands (docs/full-res.md):

    python benchmarks/full_res.py --target oar --model runs/full-res-oar/final.pt \\
        --peer runs/full-res-oar-peer/final.pt --limit 20

writes benchmarks/results/full_res_<target>.md and .json with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine_info import openkbp_dir, write_results  # noqa: E402

from diffkt3d.constants import DEFAULT_SEED, DEFAULT_STEPS  # noqa: E402
from diffkt3d.io.case_folder import load_case_folder  # noqa: E402
from diffkt3d.metrics.image import masked_mae_hu  # noqa: E402
from diffkt3d.metrics.openkbp import score_case_object  # noqa: E402
from diffkt3d.training.dataset import list_case_dirs  # noqa: E402
from diffkt3d.training.full_res_data import has_target  # noqa: E402

log = logging.getLogger("full_res_benchmark")

TARGETS = ("dose", "ct", "oar", "ptv")
VARIANTS = ("model", "base", "peer", "baseline")
# Targets with a simple baseline (benchmarks/baselines.py): the label-mean CT, the PTV atlas.
BASELINE_TARGETS = ("ct", "ptv")
# Figures where a larger value is better; every other figure is an error.
HIGHER_IS_BETTER = ("dice", "mean_dice")
# Row keys that are not figures.
ROW_INFO = ("case", "seconds", "has_ct")


# -- inputs ----------------------------------------------------------------------------------
def target_structures(case, target: str) -> set[str]:
    """Names of the case's structures that are the ``target`` (none for ct and dose)."""
    return set(case.oars if target == "oar" else case.targets if target == "ptv" else ())


def target_files(case, target: str) -> set[str]:
    """Names of the files in a case folder that hold ``target`` (what an input must not contain)."""
    from diffkt3d.constants import CT_FILE, DOSE_FILE

    if target == "ct":
        return {CT_FILE}
    if target == "dose":
        return {DOSE_FILE}
    return {f"{n}{ext}" for n in target_structures(case, target) for ext in (".nii.gz", ".nii")}


def held_out_folder(folder: Path, case, target: str, tmp: Path) -> Path:
    """A copy of the case folder (symlinks) without the target's files; plan.json loses their entries."""
    import json

    from diffkt3d.constants import PLAN_FILE

    out = tmp / folder.name
    out.mkdir(parents=True)
    dropped = target_files(case, target)
    for f in folder.iterdir():
        if f.name in dropped:
            continue
        if f.name == PLAN_FILE and target in ("oar", "ptv"):
            plan = json.loads(f.read_text())
            names = target_structures(case, target)
            plan["structures"] = {k: v for k, v in (plan.get("structures") or {}).items() if k not in names}
            (out / f.name).write_text(json.dumps(plan))
        else:
            (out / f.name).symlink_to(f.resolve())
    return out


# -- predictions -----------------------------------------------------------------------------
def predict(predictor, case, target: str, steps: int, seed: int):
    """Dose (Gy) or CT (HU) array, or {name: mask}, through the Predictor (its stage if it has one)."""
    if target == "dose":
        return predictor.predict_dose(case, steps=steps, seed=seed, template=None, with_dvh=False).dose_gy
    result = predictor.impute(case, target, steps=steps, seed=seed)
    return result.ct_hu if target == "ct" else result.masks


def predict_peer(stage, case, target: str):
    """The peer stage alone on the case grid (it reads no coarse prediction, so none is made)."""
    from diffkt3d.inference.full_res import refine_ct, refine_dose, refine_masks

    if stage.config.coarse_input:
        raise SystemExit(f"the peer's {target} stage reads a coarse prediction; a peer is trained with "
                         "stage.coarse_input: false")
    nothing = torch.zeros((stage.encoding.channels()[target], *stage.encoding.grid))
    if target == "dose":
        return refine_dose(stage, case, np.zeros(case.grid.shape, np.float32))
    if target == "ct":
        return refine_ct(stage, case, nothing)
    masks = refine_masks(stage, case, nothing)
    return {n: m & case.body for n, m in masks.items()} if case.body is not None else masks


def without_stages(predictor):
    """A Predictor of the same checkpoint that ignores its full-res stages (the base variant)."""
    from diffkt3d.inference import Predictor

    base = Predictor(predictor.bundle, predictor.device)
    base.full_res = {}
    return base


# -- figures ---------------------------------------------------------------------------------
def mask_figures(pred: np.ndarray, ref: np.ndarray, spacing_mm: tuple[float, ...]) -> dict[str, float]:
    """Dice and 95 % Hausdorff distance (mm) with MONAI's metrics; HD95 is NaN for an empty prediction."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = torch.from_numpy(np.asarray(pred, bool))[None, None].float()
    r = torch.from_numpy(np.asarray(ref, bool))[None, None].float()
    dice = float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])
    hd95 = float("nan")
    if p.any() and r.any():
        hd95 = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                spacing=list(spacing_mm))[0, 0])
    return {"dice": dice, "hd95_mm": hd95}


def case_figures(case, target: str, output, oar_names: tuple[str, ...]) -> dict[str, float]:
    """{figure: value} of one case; per-structure figures are named ``<figure>/<structure>``."""
    if target == "dose":
        s = score_case_object(case, output)
        return {"dose_score": float(s.dose_score), "dvh_score": float(np.mean(list(s.dvh_errors.values())))}
    if target == "ct":
        return {"mae_hu": masked_mae_hu(output, case.ct_hu, case.body)}
    names = [n for n in oar_names if n in case.oars] if target == "oar" else \
        [n for n in ("PTV70",) if n in case.targets]
    out = {}
    for name in names:
        pred = output.get(name, np.zeros(case.grid.shape, bool))
        for key, value in mask_figures(pred, case.structures[name].mask, case.grid.spacing_mm).items():
            out[f"{key}/{name}"] = value
    dice = [v for k, v in out.items() if k.startswith("dice/")]
    if target == "oar" and dice:
        out["mean_dice"] = float(np.mean(dice))
    return out


def paired_test(rows_a: list[dict], rows_b: list[dict], key: str) -> dict:
    """a vs b on ``key`` over the cases both have a finite value for: mean a - b, cases a is better, Wilcoxon p."""
    from scipy.stats import wilcoxon

    b = {r["case"]: r.get(key) for r in rows_b}
    pairs = [(r[key], b[r["case"]]) for r in rows_a if _finite(r.get(key)) and _finite(b.get(r["case"]))]
    diffs = [x - y for x, y in pairs]
    higher = key.split("/")[0] in HIGHER_IS_BETTER
    better = sum((d > 0) if higher else (d < 0) for d in diffs)
    p = float(wilcoxon(diffs).pvalue) if len(diffs) > 1 and any(diffs) else float("nan")
    return {"n": len(diffs), "mean_diff": float(np.mean(diffs)) if diffs else float("nan"),
            "a_better": int(better), "p": p, "higher_is_better": higher}


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


def summarise(rows: list[dict]) -> dict[str, float]:
    """Mean of each figure over the cases with a finite value (an empty prediction has no HD95)."""
    keys = sorted({k for r in rows for k in r if k not in ROW_INFO})
    out = {}
    for k in keys:
        values = [r[k] for r in rows if _finite(r.get(k))]
        out[k] = float(np.mean(values)) if values else float("nan")
        out[f"{k} (n)"] = len(values)
    out["seconds_median"] = float(np.median([r["seconds"] for r in rows])) if rows else float("nan")
    return out


# -- run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    from diffkt3d.inference import Predictor
    from diffkt3d.models.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    model = Predictor.load(args.model, device="cpu")
    if args.target not in model.full_res:
        raise SystemExit(f"{args.model} has no full-res {args.target} stage (it has {sorted(model.full_res)})")
    peer_bundle = load_checkpoint(args.peer)
    if args.target not in peer_bundle.full_res:
        raise SystemExit(f"{args.peer} has no full-res {args.target} stage (it has {sorted(peer_bundle.full_res)})")
    runners = {"model": lambda c: predict(model, c, args.target, args.steps, args.seed),
               "base": lambda c: predict(without_stages(model), c, args.target, args.steps, args.seed),
               "peer": lambda c: predict_peer(peer_bundle.full_res[args.target], c, args.target)}
    baseline_info = None
    if "baseline" in args.variants:
        runners["baseline"], baseline_info = fit_baseline(args.target, args.baseline_train, args.baseline_cases)
    rows: dict[str, list[dict]] = {v: [] for v in args.variants}
    for folder in list_case_dirs([args.cases])[: args.limit or None]:
        case = load_case_folder(folder)
        if args.target == "dose" and (case.dose_gy is None or case.body is None):
            log.info("%s: no reference dose, skipped", case.case_id)
            continue
        if args.target != "dose" and not has_target(case, args.target):
            log.info("%s: no %s to score, skipped", case.case_id, args.target)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            inp_folder = held_out_folder(folder, case, args.target, Path(tmp))
            inputs = load_case_folder(inp_folder, with_dose=args.target != "dose")  # no variant changes it
        for variant in args.variants:
            t0 = time.perf_counter()
            output = runners[variant](inputs)
            seconds = time.perf_counter() - t0
            row = {"case": case.case_id, "seconds": round(seconds, 3), "has_ct": case.ct_hu is not None,
                   **case_figures(case, args.target, output, model.encoding.oar_channels)}
            rows[variant].append(row)
            log.info("%s %s: %s", variant, case.case_id, {k: round(v, 3) for k, v in row.items() if k != "case"})
    figures = sorted({k for r in rows.get("model", []) for k in r if k not in ROW_INFO})
    paired = {f"model_vs_{other}": {k: paired_test(rows["model"], rows[other], k) for k in figures}
              for other in ("peer", "base", "baseline") if other in rows and "model" in rows}
    out = {"target": args.target, "model": str(args.model), "peer": str(args.peer), "steps": args.steps,
           "seed": args.seed, "threads": args.threads, "baseline": baseline_info,
           "summary": {v: summarise(r) for v, r in rows.items()}, "paired": paired, "rows": rows}
    if any(not r["has_ct"] for r in rows.get(args.variants[0], [])):
        out["summary_with_ct"] = {v: summarise([r for r in rs if r["has_ct"]]) for v, rs in rows.items()}
    return out


def fit_baseline(target: str, train_root: str, n_cases: int):
    """(runner, description) of the target's simple baseline, fitted on the first ``n_cases`` training cases."""
    from baselines import LabelMeanCT, PTVAtlas
    from machine_info import case_dirs

    if target not in BASELINE_TARGETS:
        raise SystemExit(f"no baseline for {target} (baselines: {', '.join(BASELINE_TARGETS)})")
    t0 = time.process_time()
    cases = [load_case_folder(d) for d in case_dirs([train_root], n_cases)]
    if target == "ct":
        fitted = LabelMeanCT.fit(cases)
        info = {"name": "label-mean CT", "cases": len(cases),
                "means_hu": dict(zip(("outside", "body", "oar", "ptv"), fitted.means_hu, strict=True))}

        def run_ct(case):
            return np.where(case.body, fitted.predict(case), -1000.0).astype(np.float32)
        runner = run_ct
    else:
        fitted = PTVAtlas.fit(cases)
        info = {"name": f"{fitted.name} atlas in body-box coordinates", "cases": fitted.cases,
                "threshold": fitted.threshold}

        def run_ptv(case):
            return {fitted.name: fitted.predict(case)}
        runner = run_ptv
    info["fit_cpu_minutes"] = round((time.process_time() - t0) / 60, 2)
    log.info("baseline: %s", info)
    return runner, info


def quality_figures(target: str, rows: list[dict]) -> dict:
    """The quality gate's record of ``target`` from the model's rows (``inference.quality``).

    OAR: the Dice pooled over cases and OARs, each OAR's mean Dice and mean HD95; CT: mean MAE in
    the body; PTV: mean PTV70 Dice. Empty when the target is not an imputation target.
    """
    if target == "oar":
        pairs = [(k.split("/", 1)[1], r[k]) for r in rows for k in r if k.startswith("dice/")]
        names = sorted({n for n, _ in pairs})
        hd = {n: [r[f"hd95_mm/{n}"] for r in rows if _finite(r.get(f"hd95_mm/{n}"))] for n in names}
        figures = {"mean_dice": round(float(np.mean([d for _, d in pairs])), 4),
                   "dice": {n: round(float(np.mean([d for m, d in pairs if m == n])), 4) for n in names},
                   "hd95_mm": {n: round(float(np.mean(v)), 2) for n, v in hd.items() if v}}
        cases = sum(any(k.startswith("dice/") for k in r) for r in rows)
    elif target == "ct":
        values = [r["mae_hu"] for r in rows if _finite(r.get("mae_hu"))]
        figures, cases = {"mae_hu": round(float(np.mean(values)), 2)}, len(values)
    elif target == "ptv":
        values = [r["dice/PTV70"] for r in rows if _finite(r.get("dice/PTV70"))]
        figures, cases = {"dice_high": round(float(np.mean(values)), 4)}, len(values)
    else:
        return {}
    return {"figures": figures, "cases": int(cases)}


def record_quality(model: str, target: str, rows: list[dict], report: str, date: str) -> dict:
    """Write ``target``'s figures into the model checkpoint's ``meta["quality"]`` (its digest changes)."""
    from diffkt3d.inference.quality import write_quality_records

    rec = quality_figures(target, rows)
    if not rec:
        raise SystemExit(f"{target} is not an imputation target: the quality gate records ct, oar and ptv")
    return write_quality_records(model, {target: rec}, report, date)[target]


def report_lines(results: dict, machine: str, started: dt.datetime) -> list[str]:
    summary, variants = results["summary"], list(results["summary"])
    figures = sorted({k for s in summary.values() for k in s})
    lines = [f"# Full-res {results['target']} stage: cascade vs peer vs base", "",
             f"Machine: {machine}. Date: {started.isoformat(timespec='seconds')}. Model {results['model']}, peer "
             f"{results['peer']}, {results['steps']} sampling steps, seed {results['seed']}, "
             f"{results['threads']} threads." + (f" Baseline: {results['baseline']}." if results.get("baseline") else ""),
             "",
             "| figure | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{summary[v].get(k, float('nan')):.4g}" for v in variants) + " |"
              for k in figures]
    if "summary_with_ct" in results:
        sub = results["summary_with_ct"]
        lines += ["", "The same figures over the cases that have a CT:", "",
                  "| figure | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{sub[v].get(k, float('nan')):.4g}" for v in variants) + " |"
                  for k in figures]
    for name, tests in results["paired"].items():
        lines += ["", f"Paired Wilcoxon, {name.replace('_', ' ')} (mean difference, cases the model is better, p):", "",
                  "| figure | n | mean diff | model better | p |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {t['n']} | {t['mean_diff']:.4g} | {t['a_better']} | {t['p']:.3g} |"
                  for k, t in tests.items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("--model", required=True, help="checkpoint with a full-res stage for --target")
    p.add_argument("--peer", required=True, help="checkpoint whose --target stage was trained with coarse_input false")
    p.add_argument("--cases", default=openkbp_dir("validation"))
    p.add_argument("--limit", type=int, default=0, help="first N cases only (0 = all)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="default: model, base, peer, and baseline for ct and ptv")
    p.add_argument("--baseline-train", default=openkbp_dir("train"),
                   help="training cases the baseline is fitted on (ct, ptv)")
    p.add_argument("--baseline-cases", type=int, default=40, help="how many of them (the first N)")
    p.add_argument("--out", default=None, help="results path without suffix (default benchmarks/results/full_res_<target>)")
    p.add_argument("--record-quality", action="store_true",
                   help="write the model's figures into --model's metadata (the imputation quality gate's record)")
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = [v for v in VARIANTS if v != "baseline" or args.target in BASELINE_TARGETS]
    if "baseline" in args.variants and args.target not in BASELINE_TARGETS:
        p.error(f"the baseline variant is for {' and '.join(BASELINE_TARGETS)}, not {args.target}")
    if args.record_quality and (args.target == "dose" or "model" not in args.variants):
        p.error("--record-quality needs an imputation --target (ct, oar, ptv) and the model variant")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = dt.datetime.now(dt.timezone.utc)
    from diffkt3d.errors import DiffKT3DError

    try:
        results = run(args)
    except DiffKT3DError as exc:  # a missing data root or a bad case: one line, not a traceback
        raise SystemExit(f"full_res benchmark: {exc}") from None
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"full_res_{args.target}")
    from machine_info import describe_machine

    write_results(out, report_lines(results, describe_machine(), started), started, **results)
    log.info("wrote %s.md and .json", out)
    if args.record_quality:
        rec = record_quality(args.model, args.target, results["rows"]["model"], f"{out.name}.md",
                             started.date().isoformat())
        log.info("quality record of %s written to %s: passes %s", args.target, args.model, rec["passes"])


if __name__ == "__main__":
    main()
