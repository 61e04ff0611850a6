"""Small CPU benchmark of PRDiT for CT imputation on OpenKBP.

One run trains and evaluates, on the same machine:
- PRDiT (preset ``cpu-small`` unless overridden: patch 6 / stride 4 / padding 1, global DiT depth
  4) conditioned on ptv + 7 OAR channels + body, two-stage training (local, then global with the
  local frozen) within a CPU-seconds budget per stage;
- the same without overlap (patch = stride = 4, padding 0), same step counts;
- a trivial peer: the mean training HU of each voxel class (outside body / body / OAR / PTV);
and reports CT MAE (HU, inside the body) and PSNR (dB, [-1000, 1000] HU window, data range
2000 HU) for: k = 1, 2, 3 (predictor-corrector), the ancestral sampler, without the global DiT
(local only), without overlap; plus training CPU minutes and sampling seconds per case.

Figures are computed twice: on the working grid against the area-downsampled reference CT (what
the model is trained to produce) and on the 128^3 case grid after trilinear upsampling
(``diffkt3d.data.encoding.decode_ct``) against the original CT inside the original body mask
(``diffkt3d.metrics.image.masked_mae_hu`` / ``psnr``, the same functions the Any2Any benchmark
uses). Validation cases only; never the test split.

Run (from the repo root; 1 thread, low priority):
    nice -n 15 .venv/bin/python benchmarks/prdit_ct.py --out benchmarks/results/prdit_ct.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import describe_machine, openkbp_dir  # noqa: E402

from diffkt3d.constants import CT_WINDOW_HU, DEFAULT_STEPS
from diffkt3d.data.encoding import EncodingConfig, decode_ct
from diffkt3d.io.case_folder import load_case_folder
from diffkt3d.metrics.image import masked_mae_hu, psnr
from diffkt3d.models.prdit import (
    PRDiT,
    get_config,
    impute_ct,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    unit_to_hu,
)
from diffkt3d.training.prdit_trainer import (
    StageSettings,
    VolumeSet,
    config_for_ct_imputation,
    load_ct_imputation_data,
    train_two_stage,
)

log = logging.getLogger("prdit_ct")
DATA = Path(openkbp_dir())


def case_dirs(root: Path, n: int) -> list[Path]:
    """First ``n`` case folders (natural order) that have a CT."""
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and (p / "ct.nii.gz").exists()),
                  key=lambda p: int("".join(c for c in p.name if c.isdigit()) or 0))
    return dirs[:n]


class LabelMeanPeer:
    """Predicts, per voxel, the mean training HU of its class: outside body, body, OAR, PTV."""

    def __init__(self, data: VolumeSet):
        labels = self.labels(data.conditions)
        hu = unit_to_hu(data.targets[:, 0])
        self.means = torch.stack([hu[labels == c].mean() for c in range(4)])

    @staticmethod
    def labels(cond: torch.Tensor) -> torch.Tensor:
        """(B, 9, D, H, W) stacked [ptv, oar x7, body] in [-1, 1] -> (B, D, H, W) class 0..3."""
        body = cond[:, 8] > 0
        oar = (cond[:, 1:8] > 0).any(dim=1)
        ptv = cond[:, 0] > -0.5  # >= 20 Gy prescription in the voxel after area averaging
        lab = body.long()
        lab[body & oar] = 2
        lab[body & ptv] = 3
        return lab

    def predict_unit(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) CT in [-1, 1]."""
        hu = self.means[self.labels(cond)]
        lo, hi = CT_WINDOW_HU
        return ((hu - lo) / (hi - lo) * 2 - 1)[:, None]


def figures(pred_unit: torch.Tensor, ref_unit: torch.Tensor, body_work: torch.Tensor, ref_case, enc) -> dict:
    """Working-grid and case-grid MAE (HU, body) and PSNR (dB) of one case."""
    pred_hu_w, ref_hu_w = unit_to_hu(pred_unit[0, 0]).numpy(), unit_to_hu(ref_unit[0, 0]).numpy()
    out = {
        "mae_work": masked_mae_hu(pred_hu_w, ref_hu_w, body_work.numpy()),
        "psnr_work": psnr(pred_hu_w, ref_hu_w, data_range=2000.0),
    }
    ct_case = decode_ct(pred_unit[0], ref_case.grid, enc)  # (I, J, K) HU on the case grid
    ct_case = np.where(ref_case.body, ct_case, CT_WINDOW_HU[0])  # air outside the body, as the Any2Any predictor
    lo, hi = CT_WINDOW_HU
    out["mae_case"] = masked_mae_hu(ct_case, ref_case.ct_hu, ref_case.body)
    out["psnr_case"] = psnr(np.clip(ct_case, lo, hi), np.clip(ref_case.ct_hu, lo, hi), data_range=2000.0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/prdit_ct.md")
    ap.add_argument("--json", default=None, help="also write raw figures here")
    ap.add_argument("--ckpt-dir", default=None, help="save the trained checkpoints here")
    ap.add_argument("--grid", type=int, default=48, help="working grid edge (OpenKBP 128^3 area-resampled)")
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-val", type=int, default=6)
    ap.add_argument("--local-cpu-s", type=float, default=150.0, help="CPU-seconds budget of stage 1")
    ap.add_argument("--global-cpu-s", type=float, default=200.0, help="CPU-seconds budget of stage 2")
    ap.add_argument("--local-wall-s", type=float, default=None, help="wall-seconds cap of stage 1 (shared machine)")
    ap.add_argument("--global-wall-s", type=float, default=None, help="wall-seconds cap of stage 2")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--reuse", action="store_true",
                    help="load checkpoints found in --ckpt-dir (with their training figures) instead of training")
    ap.add_argument("--train-only", action="store_true", help="train and save checkpoints, skip the evaluation")
    ap.add_argument("--any2any", default=None, help="also impute with this Any2Any checkpoint (diffkt3d.inference)")
    ap.add_argument("--any2any-from", default=None,
                    help="instead of --any2any: take the Any2Any CT figures of the same validation cases from this "
                         "benchmarks/dose_benchmark.py JSON (saves its sampling CPU on a starved machine)")
    ap.add_argument("--any2any-train-cpu-min", type=float, default=float("nan"),
                    help="training CPU minutes of that checkpoint, for the table (from its model card)")
    ap.add_argument("--lr-local", type=float, default=1e-3)
    ap.add_argument("--lr-global", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps")
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    grid = (args.grid,) * 3
    enc = EncodingConfig(grid=grid)

    # 1. Data: train cases for fitting, validation cases for figures.
    train_dirs = case_dirs(DATA / "train", args.n_train)
    val_dirs = case_dirs(DATA / "validation", args.n_val)
    train = load_ct_imputation_data(train_dirs, grid)
    val = None if args.train_only else load_ct_imputation_data(val_dirs, grid)
    # Only the validation cases the loader kept (same order), so val_cases[i] is val's row i.
    val_cases = [] if args.train_only else [c for c in (load_case_folder(d, with_dose=False) for d in val_dirs)
                                            if c.case_id in set(val.case_ids)]
    data_info = {"train_folders": len(train_dirs), "train_used": len(train), "train_skipped": train.skipped,
                 "val_folders": len(val_dirs), "val_used": 0 if val is None else len(val),
                 "val_skipped": {} if val is None else val.skipped}
    data_cpu = time.process_time() - cpu0
    log.info("data: %d of %d train folders with a CT used (skipped %s), %d of %d val (skipped %s), %.0f CPU s",
             len(train), len(train_dirs), train.skipped or "none", len(val_cases), len(val_dirs),
             data_info["val_skipped"] or "none", data_cpu)

    # 2. Models: full PRDiT and the no-overlap ablation (local denoiser only, same step count).
    full_cfg = config_for_ct_imputation(get_config(args.preset))
    s = full_cfg.stride
    noov_cfg = config_for_ct_imputation(get_config(args.preset, patch_size=s, stride=s, padding=0, global_depth=0))
    train_info: dict[str, dict] = {}
    models: dict[str, PRDiT] = {}
    steps_used: dict[str, int] = {}
    for name, cfg in (("full", full_cfg), ("no-overlap", noov_cfg)):
        ckpt = Path(args.ckpt_dir) / f"prdit_ct_{name}.pt" if args.ckpt_dir else None
        if args.reuse and ckpt is not None and ckpt.is_file():
            models[name] = load_checkpoint(ckpt)
            train_info[name] = read_checkpoint(ckpt)["meta"]["train"]
            log.info("%s: reused %s (%s)", name, ckpt, json.dumps(train_info[name]))
        else:
            torch.manual_seed(args.seed)
            model = PRDiT(cfg)
            g = torch.Generator().manual_seed(args.seed)
            if name == "full":
                local = StageSettings(steps=args.max_steps, lr=args.lr_local, batch_size=args.batch,
                                      max_cpu_seconds=args.local_cpu_s, max_wall_seconds=args.local_wall_s,
                                      log_every=25)
                glob = StageSettings(steps=args.max_steps, lr=args.lr_global, batch_size=args.batch,
                                     max_cpu_seconds=args.global_cpu_s, max_wall_seconds=args.global_wall_s,
                                     log_every=25)
            else:  # same number of local steps as the full model; no global DiT
                local = StageSettings(steps=steps_used["local"], lr=args.lr_local, batch_size=args.batch, log_every=25)
                glob = None
            reports = train_two_stage(model, train, local, glob, g)
            train_info[name] = {"params_local": model.num_parameters("local"),
                                "params_global": model.num_parameters("global"),
                                "stages": [r.to_dict() for r in reports],
                                "command": "python " + " ".join(sys.argv)}
            models[name] = model
            if ckpt is not None:
                save_checkpoint(model, ckpt, encoding=enc.to_dict(),
                                meta={"benchmark": "benchmarks/prdit_ct.py", "train": train_info[name]})
            log.info("%s trained: %s", name, json.dumps(train_info[name]))
        steps_used = steps_used or {st["stage"]: st["steps"] for st in train_info[name]["stages"]}
    if args.train_only:
        log.info("--train-only: checkpoints in %s, total CPU %.1f min", args.ckpt_dir,
                 (time.process_time() - cpu0) / 60)
        return 0

    # 3. Evaluation on the validation cases. Rows run in order of importance and the report is
    # rewritten after each one, so a run cut short still leaves a valid (partial) table.
    peer = LabelMeanPeer(train)
    ks = [float(k) for k in args.ks.split(",")]
    any2any_label = f"Any2Any DiT ({Path(args.any2any).name}, 10 steps)" if args.any2any else None
    imported: dict[str, list[dict]] = {}
    if args.any2any_from:
        src = json.loads(Path(args.any2any_from).read_text())
        by_case = {r["case"]: r for r in src["results"]["impute"]["rows"] if "ct_mae_hu" in r}
        missing = [c for c in val.case_ids if c not in by_case]
        if missing:
            raise SystemExit(f"{args.any2any_from}: no CT imputation figures for {missing}")
        label = f"Any2Any DiT (cpu-default, 10 steps; figures from {Path(args.any2any_from).name})"
        imported[label] = [{"mae_case": by_case[c]["ct_mae_hu"], "psnr_case": by_case[c]["ct_psnr"],
                            "mae_work": float("nan"), "psnr_work": float("nan"), "seconds": float("nan"),
                            "cpu_seconds": float("nan")} for c in val.case_ids]
    runs = [(f"PRDiT k={k:g}", "full", True, k, "predictor-corrector") for k in ks]
    runs += [(f"PRDiT w/o global DiT (local only, k={k:g})", "full", False, k, "predictor-corrector") for k in (1.0, 2.0)]
    runs += [(f"PRDiT w/o overlap (local only, k={k:g})", "no-overlap", False, k, "predictor-corrector")
             for k in (1.0, 2.0)]
    runs += [("PRDiT ancestral", "full", True, 1.0, "ancestral")]
    stage_cpu_min = {(name, st["stage"]): st["cpu_seconds"] / 60 for name, info in train_info.items()
                     for st in info["stages"]}
    train_cpu_min = {"label-mean peer": 0.0}
    for label, model_name, use_global, _, _ in runs:
        train_cpu_min[label] = stage_cpu_min[(model_name, "local")] + (
            stage_cpu_min.get((model_name, "global"), 0.0) if use_global else 0.0)
    if any2any_label:
        train_cpu_min[any2any_label] = args.any2any_train_cpu_min
    order: list[str] = ["label-mean peer", runs[0][0], *([any2any_label] if any2any_label else []),
                        *[r[0] for r in runs[1:]]]
    run_of = {r[0]: r for r in runs}
    predictor = None
    rows: dict[str, list[dict]] = {}
    for label in imported:
        train_cpu_min[label] = args.any2any_train_cpu_min
    for label in order:
        rows[label] = []
        for i in range(len(val)):
            x0, cond = val.batch([i])
            t0, c0 = time.perf_counter(), time.process_time()
            if label == "label-mean peer":
                pred = peer.predict_unit(cond)
            elif label == any2any_label:
                from diffkt3d.inference.predictor import Predictor

                predictor = predictor or Predictor.load(args.any2any, device="cpu")
                case = val_cases[i]
                ct_hu = predictor.impute(case, "ct", steps=DEFAULT_STEPS, seed=args.seed + i).ct_hu
                sec, cpu = time.perf_counter() - t0, time.process_time() - c0
                lo, hi = CT_WINDOW_HU
                rows[label].append({"mae_case": masked_mae_hu(ct_hu, case.ct_hu, case.body),
                                    "psnr_case": psnr(np.clip(ct_hu, lo, hi), np.clip(case.ct_hu, lo, hi),
                                                      data_range=2000.0),
                                    "mae_work": float("nan"), "psnr_work": float("nan"), "seconds": sec,
                                    "cpu_seconds": cpu})
                continue
            else:
                _, model_name, use_global, k, sampler = run_of[label]
                conds = {"ptv": cond[:, 0:1], "oar": cond[:, 1:8], "body": cond[:, 8:9]}
                g = torch.Generator().manual_seed(args.seed + i)
                pred = impute_ct(models[model_name], conds, steps=args.steps, k=k, generator=g, sampler=sampler,
                                 use_global=use_global)
            sec, cpu = time.perf_counter() - t0, time.process_time() - c0
            f = figures(pred, x0, cond[0, 8] > 0, val_cases[i], enc)
            f.update(seconds=sec, cpu_seconds=cpu)
            rows[label].append(f)
        log.info("%s: %s", label, {m: round(float(np.mean([r[m] for r in rows[label]])), 2) for m in rows[label][0]})
        if label == "label-mean peer":
            rows.update(imported)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "train": train_info, "data": data_info}, indent=1))
        write_report(args, argv, rows, train_info, train_cpu_min, data_cpu, time.process_time() - cpu0,
                     time.perf_counter() - wall0, data_info, val.case_ids, full_cfg, noov_cfg)

    total_cpu = time.process_time() - cpu0
    total_wall = time.perf_counter() - wall0
    write_report(args, argv, rows, train_info, train_cpu_min, data_cpu, total_cpu, total_wall, data_info,
                 val.case_ids, full_cfg, noov_cfg)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "train": train_info, "data": data_info}, indent=1))
    log.info("total CPU %.1f min, wall %.1f min", total_cpu / 60, total_wall / 60)
    return 0


def _as_command(argv_line: str) -> str:
    """The recorded ``sys.argv`` of a run as a shell command from the repository root."""
    return argv_line if argv_line.startswith("python") else f"python {argv_line}"


def _skipped_text(skipped: dict[str, str]) -> str:
    """``{"pt_38": "no body mask"}`` -> "pt_38 (no body mask)"; "none" when empty."""
    return ", ".join(f"{cid} ({why})" for cid, why in skipped.items()) or "none"


def cpu_share_sentence(train_info: dict, threads: int, total_cpu: float, total_wall: float) -> str:
    """How much CPU the processes got, from their own process CPU time vs wall time.

    Training: summed over the recorded training stages (``StageReport`` cpu / wall seconds, which
    for ``--reuse`` come from the checkpoints, i.e. from the run that trained them); evaluation:
    this process from start to report.
    """
    stages = [st for info in train_info.values() for st in info["stages"]]
    t_cpu = sum(st["cpu_seconds"] for st in stages)
    t_wall = sum(st["wall_seconds"] for st in stages)

    def share(cpu: float, wall: float) -> str:
        return f"{cpu / 60:.1f} CPU min in {wall / 60:.1f} wall min, {100 * cpu / wall:.0f} % of one core" \
            if wall > 0 else f"{cpu / 60:.1f} CPU min"

    return (f"Process CPU time vs wall time: training stages {share(t_cpu, t_wall)}; this run (data, "
            f"evaluation, report) {share(total_cpu, total_wall)}; {threads} thread(s) per process. Where "
            f"the share is well below {100 * threads} %, the machine was busy with other jobs and wall "
            "times are inflated; the process CPU times are the comparable figures.")


def write_report(args, argv, rows, train_info, train_cpu_min, data_cpu, total_cpu, total_wall, data_info, val_ids,
                 full_cfg, noov_cfg) -> None:
    def mean(label, key):
        return float(np.mean([r[key] for r in rows[label]]))

    def cell(label, key, fmt):
        v = mean(label, key)
        return "—" if not np.isfinite(v) else format(v, fmt)

    lines = [
        "# PRDiT CT imputation — small CPU benchmark",
        "",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; torch {torch.__version__}, "
        f"{args.threads} thread(s).",
        "",
        f"Machine: {describe_machine()}. {cpu_share_sentence(train_info, args.threads, total_cpu, total_wall)}",
        "",
        "Commands (from the repository root; the first trains and saves the checkpoints, the second reuses "
        "them, evaluates and writes this file):",
        "",
        "```",
        *sorted({_as_command(info.get("command", "(training command not recorded)")) for info in train_info.values()}),
        "python benchmarks/prdit_ct.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        "## What this is (and is not)",
        "",
        f"- Data: OpenKBP train, the first {data_info['train_folders']} case folders with a CT (natural order, "
        f"`--n-train {args.n_train}`): {data_info['train_used']} used for training, skipped: "
        f"{_skipped_text(data_info['train_skipped'])}. OpenKBP validation, the first {data_info['val_folders']} "
        f"case folders with a CT (`--n-val {args.n_val}`): {data_info['val_used']} used for the figures "
        f"({', '.join(val_ids)}), skipped: {_skipped_text(data_info['val_skipped'])}. "
        "CT and conditions (ptv prescription map, 7 OAR channels, "
        f"body) encoded by `diffkt3d.data.encoding` on a {args.grid}^3 working grid (area resampling of 128^3).",
        f"- PRDiT preset `{args.preset}`: patch {full_cfg.patch_size} / stride {full_cfg.stride} / padding "
        f"{full_cfg.padding}, global DiT depth {full_cfg.global_depth}, width {full_cfg.global_hidden}, "
        f"{full_cfg.global_heads} heads; local {train_info['full']['params_local']:,} + global "
        f"{train_info['full']['params_global']:,} parameters. No-overlap ablation: patch {noov_cfg.patch_size} / "
        f"stride {noov_cfg.stride} / padding 0, a local denoiser only, trained for the same number of local steps "
        "as the full model; compare it with the full model's local denoiser (the 'w/o global DiT' rows), which "
        "isolates the effect of the overlap (a global DiT for it did not fit the CPU budget).",
        f"- Training: AdamW, lr {args.lr_local:g} (stage 1) / {args.lr_global:g} (stage 2) — higher than the "
        f"paper's 1e-4 / 9e-5 because the runs are a few hundred steps —, batch {args.batch}, grad clip 1.0, "
        "stage budgets in process CPU seconds as in the training command (`--local-cpu-s` / `--global-cpu-s`; "
        "steps and CPU minutes actually used: table 'Training cost'). This is minutes of CPU, not the "
        "paper's 6,000 + 8,000 epochs on A100s: figures show the pipeline works end to end and rank the "
        "ablations at this budget only; they say nothing about PRDiT at full scale.",
        f"- Sampling: {args.steps} steps, one sample per case, seed = {args.seed} + case index; the final "
        "sample is clamped to [-1, 1].",
        "- Peers: a trivial label-mean peer (mean training HU per voxel class outside body / body / OAR / PTV)"
        + (f"; the Any2Any DiT checkpoint `{args.any2any}` through `diffkt3d.inference.Predictor.impute` (its own "
           "working grid and conditions: every modality the case has except CT; dose not loaded)."
           if args.any2any else
           ". No trained Any2Any checkpoint was given, so Any2Any imputation figures must be taken from the "
           "lead's `benchmarks/dose_benchmark.py` (case-grid metrics there use the same functions as the "
           "'case grid' columns here)."),
        "- Case-grid figures: prediction trilinearly upsampled to 128^3, set to -1000 HU outside the body (as the "
        "Any2Any predictor does), MAE inside the original body mask, PSNR over the whole grid in the "
        "[-1000, 1000] HU window (data range 2000 HU). Working-grid figures: raw sample vs the area-downsampled "
        "reference, MAE where the downsampled body mask is > 50 %.",
        "",
        "## Results (mean over validation cases)",
        "",
        "| Method | CT MAE HU (body), case grid 128^3 | PSNR dB, case grid | MAE HU (body), working grid | "
        "PSNR dB, working grid | training CPU min | sampling CPU s / case | sampling wall s / case |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in rows:
        tcpu = train_cpu_min.get(label, float("nan"))
        lines.append(f"| {label} | {cell(label, 'mae_case', '.1f')} | {cell(label, 'psnr_case', '.2f')} | "
                     f"{cell(label, 'mae_work', '.1f')} | {cell(label, 'psnr_work', '.2f')} | "
                     f"{'—' if not np.isfinite(tcpu) else format(tcpu, '.1f')} | "
                     f"{cell(label, 'cpu_seconds', '.2f')} | {cell(label, 'seconds', '.2f')} |")
    lines += ["", "## Training cost", "", "| Model | stage | steps | CPU min | wall min | first loss | mean loss, last 50 steps |",
              "|---|---|---|---|---|---|---|"]
    for name, info in train_info.items():
        for st in info["stages"]:
            lines.append(f"| {name} | {st['stage']} | {st['steps']} | {st['cpu_seconds'] / 60:.2f} | "
                         f"{st['wall_seconds'] / 60:.2f} | {st['first_loss']:.3f} | {st['last50_mean_loss']:.3f} |")
    lines += ["", f"Data loading/encoding: {data_cpu / 60:.2f} CPU min. Whole run: {total_cpu / 60:.1f} CPU min, "
              f"{total_wall / 60:.1f} wall min.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(main())
