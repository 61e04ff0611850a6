"""Dose + imputation benchmark on the OpenKBP validation cases, DiT vs the MONAI peer, one run.

For every validation case (40): the shipped DiT with 10 steps and with the 1-step preview, the
BasicUNet peer trained with the same CPU budget (benchmarks/peer.py), and the model's geometric
dose prior alone (``models.dose_prior`` with the shipped model's falloffs and initial mix, no
network): what the DiT adds over the prior it starts from. Figures: OpenKBP dose score
and DVH score (official definitions, diffkt3d.metrics.openkbp), PSNR, SSIM, Scorecard total
(openkbp_hn), seconds per case, and peak memory (each model runs in its own child process, so
ru_maxrss is that model's peak). Imputation (DiT): CT MAE (HU, inside the body) and PSNR, PTV and
OAR Dice per structure, on cases that have the modality.

    python benchmarks/dose_benchmark.py --peer runs/peer/basicunet.pt

writes benchmarks/results/dose_benchmark.md and .json with the machine and date. The variant
``grid`` scores the reference dose after a round trip through the model's working grid, the floor
under every model on that grid; it needs no model, so it can also run alone:

    python benchmarks/dose_benchmark.py --variants grid --out benchmarks/results/dose_grid_floor
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine_info import case_dirs, describe_machine, openkbp_dir, write_results  # noqa: E402

from diffkt3d.constants import DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_TEMPLATE, PREVIEW_STEPS  # noqa: E402
from diffkt3d.io.case_folder import load_case_folder  # noqa: E402
from diffkt3d.metrics.image import dice, masked_mae_hu, psnr, ssim  # noqa: E402
from diffkt3d.metrics.openkbp import score_case_object  # noqa: E402

log = logging.getLogger("dose_benchmark")

# Variants whose seconds per case are checked against targets: run alone, with all threads.
TIMED = ("dit10", "dit1", "dit10flip")


def dose_figures(case, dose_gy: np.ndarray, template) -> dict:
    from diffkt3d.scorecard import score_case

    s = score_case_object(case, dose_gy)
    sc = score_case(dose_gy, case, template)
    return {"dose_score": s.dose_score, "dvh_errors": [float(v) for v in s.dvh_errors.values()],
            "psnr": psnr(dose_gy, case.dose_gy), "ssim": ssim(dose_gy, case.dose_gy),
            "scorecard": float(sc.total), "scorecard_items": item_means(sc.item_scores()),
            "penalty": float(sc.penalty_total), "_score": s}


def item_means(item_scores: dict[str, float]) -> dict[str, float]:
    """"<item>/<structure>" -> score, averaged over the structures of each item (unweighted)."""
    per: dict[str, list[float]] = {}
    for key, value in item_scores.items():
        per.setdefault(key.split("/")[0], []).append(float(value))
    return {k: float(np.mean(v)) for k, v in per.items()}


def run_child(args: argparse.Namespace) -> None:
    """Evaluate one model variant on all cases; write JSON lines to args.child_out."""
    from diffkt3d.scorecard import load_template

    torch.set_num_threads(args.threads)
    template = load_template(args.template)
    cases = case_dirs([args.cases], args.limit)
    rows = []
    if args.child in ("dit10", "dit1", "dit10flip", "impute", "prior", "grid"):
        from diffkt3d.inference import Predictor

        predictor = Predictor.load(args.model)
        meta = predictor.bundle.meta
        model_info = {"version": predictor.model_version, "total_cpu_minutes": meta.get("total_cpu_minutes"),
                      "global_step": meta.get("global_step"), "pieces": meta.get("pieces"),
                      "full_res": stage_records(meta)}
    else:
        model_info = None
    if args.child == "peer":
        from peer import load_peer, predict_peer

        from diffkt3d.data.encoding import decode_dose, encode_case
        from diffkt3d.training.dataset import prepare_case

        model, enc, peer_meta = load_peer(args.peer)
    for folder in cases:
        ref = load_case_folder(folder)
        if ref.dose_gy is None:
            continue
        row: dict = {"case": ref.case_id}
        if args.child in ("dit10", "dit1", "dit10flip"):
            inp = load_case_folder(folder, with_dose=False)
            t0 = time.perf_counter()
            pred = predictor.predict_dose(inp, steps=PREVIEW_STEPS if args.child == "dit1" else DEFAULT_STEPS,
                                          seed=DEFAULT_SEED, template=None, with_dvh=False,
                                          flip_average=args.child == "dit10flip")
            row["seconds"] = time.perf_counter() - t0
            row.update({k: v for k, v in dose_figures(ref, pred.dose_gy, template).items() if k != "_score"})
            from diffkt3d.scorecard import score_case

            ref_sc = score_case(ref.dose_gy, ref, template)
            row["scorecard_ref"] = float(ref_sc.total)
            row["scorecard_ref_items"] = item_means(ref_sc.item_scores())
            row["penalty_ref"] = float(ref_sc.penalty_total)
        elif args.child == "prior":
            dose = prior_dose(predictor, folder)
            row["seconds"] = 0.0
            row.update({k: v for k, v in dose_figures(ref, dose, template).items() if k != "_score"})
        elif args.child == "grid":
            dose = reference_through_grid(predictor, folder)
            row["seconds"] = 0.0
            row.update({k: v for k, v in dose_figures(ref, dose, template).items() if k != "_score"})
        elif args.child == "peer":
            t0 = time.perf_counter()
            inp = prepare_case(folder)
            inp.dose_gy = None
            tensors = encode_case(inp, enc, tuple(m for m in ("ct", "ptv", "oar", "body", "beam", "angle") if inp.has(m)
                                                  or (m == "oar" and inp.oars)))
            dose = decode_dose(predict_peer(model, tensors, enc), inp.grid, enc, inp.body)
            row["seconds"] = time.perf_counter() - t0
            row.update({k: v for k, v in dose_figures(ref, dose, template).items() if k != "_score"})
            row["peer"] = peer_meta
        else:  # imputation
            t0 = time.perf_counter()
            if ref.ct_hu is not None:
                ct = predictor.impute(ref, "ct", steps=DEFAULT_STEPS, seed=DEFAULT_SEED).ct_hu
                row["ct_mae_hu"] = masked_mae_hu(ct, ref.ct_hu, ref.body)
                row["ct_psnr"] = psnr(np.clip(ct, -1000, 1000), np.clip(ref.ct_hu, -1000, 1000), data_range=2000.0)
            ptv = predictor.impute(ref, "ptv", steps=DEFAULT_STEPS, seed=DEFAULT_SEED).masks
            row["ptv_dice"] = {n: dice(ptv.get(n, np.zeros_like(s.mask)), s.mask) for n, s in ref.targets.items()}
            oar = predictor.impute(ref, "oar", steps=DEFAULT_STEPS, seed=DEFAULT_SEED).masks
            row["oar_dice"] = {n: dice(oar[n], s.mask) for n, s in ref.oars.items() if n in oar}
            row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        log.info("%s %s %s", args.child, ref.case_id, {k: v for k, v in row.items() if isinstance(v, float)})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.child_out).write_text(json.dumps({"rows": rows, "peak_rss_mb": peak_mb, "model": model_info}))


def quality_figures(rows: list[dict]) -> dict[str, dict]:
    """The quality gate's record per imputation target from the ``impute`` rows (inference.quality).

    OAR: mean over cases and OARs of the Dice, and each OAR's mean; CT: MAE inside the body; PTV:
    Dice of each case's highest-prescription PTV (the name's number: PTV70 over PTV56).
    """
    out: dict[str, dict] = {}
    ct = [r["ct_mae_hu"] for r in rows if "ct_mae_hu" in r]
    if ct:
        out["ct"] = {"figures": {"mae_hu": round(float(np.mean(ct)), 2)}, "cases": len(ct)}
    oar_rows = [r["oar_dice"] for r in rows if r.get("oar_dice")]
    if oar_rows:
        names = sorted({n for r in oar_rows for n in r})
        per = {n: round(float(np.mean([r[n] for r in oar_rows if n in r])), 4) for n in names}
        mean = float(np.mean([d for r in oar_rows for d in r.values()]))
        out["oar"] = {"figures": {"mean_dice": round(mean, 4), "dice": per}, "cases": len(oar_rows)}
    high = []
    for r in rows:
        named = {n: d for n, d in (r.get("ptv_dice") or {}).items() if any(ch.isdigit() for ch in n)}
        if named:
            top = max(named, key=lambda n: float("".join(ch for ch in n if ch.isdigit() or ch == ".") or 0))
            high.append(named[top])
    if high:
        out["ptv"] = {"figures": {"dice_high": round(float(np.mean(high)), 4)}, "cases": len(high)}
    return out


def record_quality(model: str, rows: list[dict], report: str, date: str) -> dict[str, dict]:
    """Write the imputation figures into the checkpoint's ``meta["quality"]`` (its digest changes)."""
    from diffkt3d.inference.quality import write_quality_records

    return write_quality_records(model, quality_figures(rows), report, date)


def prior_dose(predictor, folder: Path) -> np.ndarray:
    """The shipped model's dose prior alone, decoded to the case grid like a prediction (Gy)."""
    from diffkt3d.data.encoding import encode_case
    from diffkt3d.training.dataset import prepare_case

    case = prepare_case(folder)
    case.dose_gy = None
    tensors = encode_case(case, predictor.encoding, ("ptv", "body"))
    return prior_dose_from(predictor, case, tensors["ptv"], tensors["body"])


def prior_dose_from(predictor, case, ptv: torch.Tensor, body: torch.Tensor) -> np.ndarray:
    """The prior of encoded ``ptv`` / ``body`` (1, D, H, W) with the model's falloffs and initial mix (Gy)."""
    from diffkt3d.data.encoding import decode_dose
    from diffkt3d.models.dose_prior import mix_to_dose_encoding, prior_basis

    head, enc = predictor.model.config.dose_head, predictor.encoding
    if head is None or not head.prior_falloffs:
        raise SystemExit("variant 'prior': the model has no dose prior (dose_head.prior_falloffs is empty)")
    basis = prior_basis(ptv[None], body[None], head.prior_falloffs, head.prior_reach)
    w0 = torch.tensor(head.prior_weights).view(1, -1, 1, 1, 1)
    x0 = mix_to_dose_encoding(basis, w0)[0]  # (1, D, H, W) dose encoding, as a fresh model predicts
    return decode_dose(x0, case.grid, enc, case.body)


def reference_through_grid(predictor, folder: Path) -> np.ndarray:
    """The reference dose encoded to the model's working grid and decoded back (Gy).

    Both the DiT and the peer predict on this grid and are decoded the same way, so this is the
    best either can score: the floor the working grid alone puts under the dose score.
    """
    from diffkt3d.data.encoding import decode_dose, encode_case
    from diffkt3d.training.dataset import prepare_case

    case = prepare_case(folder)
    x0 = encode_case(case, predictor.encoding, ("dose",))["dose"]
    return decode_dose(x0, case.grid, predictor.encoding, case.body)


KNOWN_VARIANTS = ("dit10", "dit1", "dit10flip", "peer", "prior", "grid", "impute")


def stage_records(meta: dict) -> dict[str, dict]:
    """Per full-res stage of a checkpoint: steps, CPU minutes and whether it reads a coarse prediction."""
    out = {}
    for target, rec in (meta.get("full_res") or {}).items():
        cfg = rec.get("train_config") or {}
        out[target] = {"steps": rec.get("step"), "cpu_minutes": rec.get("total_cpu_minutes"),
                       "coarse_input": (cfg.get("stage") or {}).get("coarse_input"),
                       "coarse_steps": cfg.get("coarse_steps")}
    return out


def model_line(info: dict) -> str:
    """One line of a checkpoint's training record: version, steps, CPU minutes of the DiT and of its stages."""
    line = f"model version {info['version']}, {info.get('global_step')} DiT training steps"
    if info.get("total_cpu_minutes") is not None:
        line += f", {info['total_cpu_minutes']:.1f} DiT CPU-minutes"
    for target, rec in (info.get("full_res") or {}).items():
        line += (f"; full-res {target} stage: {rec.get('steps')} steps, {rec.get('cpu_minutes') or 0:.1f} CPU-minutes, "
                 f"coarse input {rec.get('coarse_input')} ({rec.get('coarse_steps')} steps)")
    return line + "."


# Per-case figures the paired table compares, and whether higher is better.
PAIRED_FIGURES = {"dose_score": ("dose score, Gy", False), "dvh_case": ("DVH score, Gy", False),
                  "scorecard": ("Scorecard", True)}


def case_figure(row: dict, key: str) -> float:
    """A per-case figure; ``dvh_case`` is the case's mean |DVH error| (the OpenKBP DVH score pools all
    cases' errors, so a paired test needs one number per case)."""
    if key == "dvh_case" and key not in row:
        return float(np.mean(np.abs(row["dvh_errors"])))
    return float(row[key])


def paired(rows_a: list[dict], rows_b: list[dict], key: str = "dose_score") -> dict:
    """Per-case paired comparison a - b over the cases both have: mean, cases a is better, Wilcoxon p."""
    from scipy.stats import wilcoxon

    higher_better = PAIRED_FIGURES[key][1]
    b = {r["case"]: case_figure(r, key) for r in rows_b}
    diffs = [case_figure(r, key) - b[r["case"]] for r in rows_a if r["case"] in b]
    p = float(wilcoxon(diffs).pvalue) if len(diffs) > 1 and any(diffs) else float("nan")
    better = sum(d > 0 for d in diffs) if higher_better else sum(d < 0 for d in diffs)
    return {"n": len(diffs), "mean_diff": float(np.mean(diffs)), "a_better": int(better), "p": p}


def summarise(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    if rows and "dose_score" in rows[0]:
        out["dose_score"] = float(np.mean([r["dose_score"] for r in rows]))
        out["dvh_score"] = float(np.mean([e for r in rows for e in r["dvh_errors"]]))
        for k in ("psnr", "ssim", "scorecard"):
            out[k] = float(np.mean([r[k] for r in rows]))
    out["seconds_median"] = float(statistics.median(r["seconds"] for r in rows)) if rows else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=openkbp_dir("validation"))
    p.add_argument("--model", default=None, help="DiT checkpoint (default: shipped)")
    p.add_argument("--label", default=None, help="model name in the report (default: cpu-default or the file name)")
    p.add_argument("--peer", default=str(ROOT / "runs/peer/basicunet.pt"))
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--limit", type=int, default=0, help="first N cases only (0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["dit10", "dit1", "peer", "prior", "grid", "impute"])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/dose_benchmark"))
    p.add_argument("--compare", action="append", default=[], metavar="NAME=CKPT",
                   help="another checkpoint predicted like dit10 (10 steps, default settings) in the same run, "
                        "reported as NAME and paired with dit10 (repeatable; e.g. a full-res U-Net peer or the "
                        "previous shipped model)")
    p.add_argument("--record-quality", action="store_true",
                   help="write the imputation figures into --model's metadata (the quality gate's record; "
                        "the file's digest and model version change)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.record_quality and (not args.model or "impute" not in args.variants):
        p.error("--record-quality needs --model CKPT and the impute variant")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.child:
        run_child(args)
        return
    case_dirs([args.cases])  # a missing data folder: one line here, not a traceback from every child
    compare = {}
    for item in args.compare:
        name, sep, ckpt = item.partition("=")
        if not sep or not name or not ckpt:
            p.error(f"--compare takes NAME=CKPT, found {item!r}")
        if name in KNOWN_VARIANTS or name in compare:
            p.error(f"--compare name {name!r} is already a variant")
        if not Path(ckpt).is_file():
            p.error(f"--compare {name}: no checkpoint at {ckpt}")
        compare[name] = ckpt
    results = {}
    started = dt.datetime.now(dt.timezone.utc)

    def launch(variant: str, threads: int) -> tuple[str, str, subprocess.Popen]:
        child_out = f"{args.out}.{variant}.tmp.json"
        model = compare.get(variant, args.model)
        cmd = [sys.executable, __file__, "--child", "dit10" if variant in compare else variant,
               "--child-out", child_out, "--cases", args.cases,
               "--peer", args.peer, "--template", args.template, "--limit", str(args.limit),
               "--threads", str(threads)] + (["--model", model] if model else [])
        log.info("running %s", " ".join(cmd))
        return variant, child_out, subprocess.Popen(cmd)

    def collect(variant: str, child_out: str, proc: subprocess.Popen) -> None:
        if proc.wait() != 0:
            raise SystemExit(f"benchmark variant {variant} failed (exit {proc.returncode})")
        blob = json.loads(Path(child_out).read_text())
        Path(child_out).unlink()
        results[variant] = {"summary": summarise(blob["rows"]), "peak_rss_mb": blob["peak_rss_mb"], "rows": blob["rows"],
                            "threads": args.threads if variant in TIMED else 1, "model": blob.get("model")}

    # Phase 1: the timed DiT variants, one at a time with all threads (their s/case are the figures).
    for variant in [v for v in args.variants if v in TIMED]:
        collect(*launch(variant, args.threads))
    # Phase 2: untimed-by-target variants in parallel, one thread each.
    running = [launch(v, 1) for v in [*args.variants, *compare] if v not in TIMED]
    for item in running:
        collect(*item)
    write_report(args, results, started, compare)
    if args.record_quality:
        report = str(Path(args.out).with_suffix(".md").relative_to(ROOT)) if Path(args.out).is_relative_to(ROOT) \
            else Path(args.out).name + ".md"
        quality = record_quality(args.model, results["impute"]["rows"], report, started.date().isoformat())
        log.info("quality record written to %s: %s", args.model,
                 {t: q["passes"] for t, q in quality.items()})


def scorecard_item_lines(results: dict, names: dict[str, str]) -> list[str]:
    """Mean unweighted score per Scorecard item and variant (0-10 each), hinge penalty last."""
    cols = [k for k in names if k in results and results[k]["rows"] and "scorecard_items" in results[k]["rows"][0]]
    if not cols:
        return []
    ref_rows = results["dit10"]["rows"] if "dit10" in cols and "scorecard_ref_items" in results["dit10"]["rows"][0] else []

    def mean_item(rows: list[dict], key: str, item: str) -> float:
        vals = [r[key][item] for r in rows if item in r[key]]
        return float(np.mean(vals)) if vals else float("nan")

    items = sorted({i for k in cols for r in results[k]["rows"] for i in r["scorecard_items"]})
    head = ["item"] + cols + (["reference"] if ref_rows else [])
    lines = ["", "## Scorecard by item (mean unweighted item score, 0-10, over cases and structures)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for item in items:
        vals = [mean_item(results[k]["rows"], "scorecard_items", item) for k in cols]
        if ref_rows:
            vals.append(mean_item(ref_rows, "scorecard_ref_items", item))
        lines.append(f"| {item} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    pen = [float(np.mean([r["penalty"] for r in results[k]["rows"]])) for k in cols]
    if ref_rows:
        pen.append(float(np.mean([r["penalty_ref"] for r in ref_rows])))
    lines.append("| hinge penalty (points, lower is better) | " + " | ".join(f"{v:.2f}" for v in pen) + " |")
    return lines


def write_report(args: argparse.Namespace, results: dict, started: dt.datetime,
                 compare: dict[str, str] | None = None) -> None:
    compare = compare or {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    label = args.label or ("DiffKT3D cpu-default" if args.model is None else f"DiffKT3D {Path(args.model).name}")
    names = {"dit10": f"{label}, 10 steps", "dit1": f"{label}, 1-step preview",
             "dit10flip": f"{label}, 10 steps, test-time flip average",
             "peer": "MONAI BasicUNet peer (L1 regression)",
             "prior": "geometric dose prior alone (no network; what the DiT starts from)",
             "grid": "reference dose through the working grid (encode, then decode: the floor for any prediction made on this grid)",
             **{k: f"{k} ({Path(v).name}), 10 steps" for k, v in compare.items()}}
    lines = [f"# Dose benchmark: OpenKBP validation ({started:%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {describe_machine()}", "",
             f"Command: `python benchmarks/dose_benchmark.py {' '.join(sys.argv[1:])}`", "",
             "| model | cases | dose score (Gy) | DVH score (Gy) | PSNR (dB) | SSIM | Scorecard | s/case (median) | threads | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, name in names.items():
        if key not in results:
            continue
        s = results[key]["summary"]
        lines.append(f"| {name} | {s['n']} | {s['dose_score']:.3f} | {s['dvh_score']:.3f} | {s['psnr']:.2f} | "
                     f"{s['ssim']:.4f} | {s['scorecard']:.2f} | {s['seconds_median']:.2f} | {results[key]['threads']} | "
                     f"{results[key]['peak_rss_mb']:.0f} |")
    if "dit10" in results:
        ref_scores = [r["scorecard_ref"] for r in results["dit10"]["rows"]]
        lines.append(f"| reference plans (for scale) | {len(ref_scores)} | 0 | 0 | inf | 1 | "
                     f"{np.mean(ref_scores):.2f} | | | |")
    lines += scorecard_item_lines(results, names)
    pairs = [(a, b) for a, b in (("dit10", "peer"), ("dit10", "prior"), ("dit1", "peer"), ("dit1", "prior"),
                                                 ("dit10flip", "dit10"), ("dit10flip", "peer"),
                                                 *(("dit10", k) for k in compare)) if a in results and b in results]
    if pairs:
        lines += ["", "## Paired per-case comparison (Wilcoxon signed-rank, two-sided)", "",
                  "DVH: each case's mean DVH error. Scorecard: higher is better.", "",
                  "| A vs B | figure | cases | mean A - B | cases A better | p |", "|---|---|---|---|---|---|"]
        for a, b in pairs:
            for key, (label, _) in PAIRED_FIGURES.items():
                c = paired(results[a]["rows"], results[b]["rows"], key)
                results.setdefault("paired", {})[f"{a}-{b}:{key}"] = c
                lines.append(f"| {a} vs {b} | {label} | {c['n']} | {c['mean_diff']:+.3f} | {c['a_better']} | "
                             f"{c['p']:.2g} |")
    if "impute" in results:
        rows = results["impute"]["rows"]
        ct = [r for r in rows if "ct_mae_hu" in r]
        lines += ["", f"## Imputation ({label}, 10 steps)", "",
                  "| modality | cases | figure |", "|---|---|---|"]
        if ct:
            lines.append(f"| CT | {len(ct)} | MAE {np.mean([r['ct_mae_hu'] for r in ct]):.1f} HU inside the body, "
                         f"PSNR {np.mean([r['ct_psnr'] for r in ct]):.2f} dB (range 2000 HU) |")
        for key, label in (("ptv_dice", "PTV"), ("oar_dice", "OAR")):
            per: dict[str, list[float]] = {}
            for r in rows:
                for n, d in r[key].items():
                    per.setdefault(n, []).append(d)
            for n, ds in sorted(per.items()):
                lines.append(f"| {label} {n} | {len(ds)} | Dice {np.mean(ds):.3f} |")
        lines.append(f"\nImputation seconds per case (CT+PTV+OAR, median): "
                     f"{results['impute']['summary']['seconds_median']:.1f}")
    if "peer" in results and results["peer"]["rows"]:
        meta = results["peer"]["rows"][0].get("peer", {})
        lines.append(f"\nPeer training: {meta.get('steps')} steps in {meta.get('cpu_minutes', 0):.1f} CPU-minutes, "
                     f"L1 loss over {'the body' if meta.get('loss_region') == 'body' else 'every voxel'} "
                     "(compare with the DiT's budget in docs/model-card.md; equal budgets are the target).")
    for name in compare:
        if name in results and results[name].get("model"):
            lines.append(f"\n{name}: " + model_line(results[name]["model"]))
    info = next((r["model"] for k, r in results.items() if k not in compare and isinstance(r, dict) and r.get("model")),
                None)
    if info:
        pieces = info.get("pieces") or []
        budget = (f"{info['total_cpu_minutes']:.1f} CPU-minutes recorded in {len(pieces)} piece(s)"
                  if info.get("total_cpu_minutes") is not None else "CPU time not recorded in the checkpoint")
        lines.append(f"\nDiT: model version {info['version']}, {info.get('global_step')} training steps, {budget}"
                     + "".join(f"; piece {i}: {pc.get('machine')}, steps {pc.get('from_step')}-{pc.get('to_step')}, "
                               f"{pc.get('cpu_minutes', 0):.1f} CPU-min" for i, pc in enumerate(pieces)) + ".")
    write_results(out, lines, started, args=vars(args), results=results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
