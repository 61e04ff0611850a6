"""ScardNFT benchmark: preference learner vs N, and before/after post-training on OpenKBP validation.

Steps (sub-commands, so the CPU-heavy ones can run side by side on the 2 cores):

    python benchmarks/scardnft_benchmark.py prefs                  # simulated rater: Spearman vs N,
                                                                   # writes the N=200 preference store
    python benchmarks/scardnft_benchmark.py train                  # ScardNFT on the TRAIN split
    python benchmarks/scardnft_benchmark.py eval --model M --tag before [--shard 0/2]
    python benchmarks/scardnft_benchmark.py eval --model runs/scardnft-bench/merged.pt --tag after
    python benchmarks/scardnft_benchmark.py train --placebo        # control: random rewards, same budget
    python benchmarks/scardnft_benchmark.py eval --model runs/scardnft-bench/placebo/merged.pt --tag placebo
    python benchmarks/scardnft_benchmark.py report                 # paired tests -> results/scardnft.md

Evaluation (40 validation cases, never used for training): one 10-step candidate per case from
seed 0 for both models (same initial noise: a paired comparison), through
``Predictor.predict_dose`` — the product's path. Figures per case: Scorecard total with the
shipped ``openkbp_hn`` template and with the weights learned from the simulated preferences,
hinge penalty, OpenKBP dose score and DVH score (official definitions,
``diffkt3d.metrics.openkbp``). Paired two-sided tests over cases: t-test and Wilcoxon
signed-rank (scipy.stats).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine_info import case_dirs, describe_machine, openkbp_dir

from diffkt3d.constants import DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(openkbp_dir())
OUT = ROOT / "runs" / "scardnft-bench"
RESULTS = ROOT / "benchmarks" / "results"
N_VALUES = (10, 25, 50, 100, 200)
HIDDEN_SEED = 7
log = logging.getLogger("scardnft_benchmark")


def hidden_weights() -> dict[str, float]:
    """The simulated institution's hidden item weights: a random permutation of 0.25 ... 4 (seeded)."""
    from diffkt3d.scorecard import load_template

    ids = [it.id for it in load_template(DEFAULT_TEMPLATE).items]
    rng = np.random.default_rng(HIDDEN_SEED)
    return {i: float(w) for i, w in zip(ids, rng.permutation(np.geomspace(0.25, 4.0, len(ids))), strict=True)}


# -- 1. preference learner ---------------------------------------------------------------------------
def cmd_prefs(args: argparse.Namespace) -> None:
    from scipy.stats import spearmanr

    from diffkt3d.preferences import PreferenceStore
    from diffkt3d.preferences.learner import SimulatedRater, learn_item_weights, simulate_records
    from diffkt3d.scorecard import load_template

    tpl = load_template(DEFAULT_TEMPLATE)
    ids = [it.id for it in tpl.items]
    hidden = hidden_weights()
    # structures as in OpenKBP (two parotids, three PTVs for the "any"/"lower" target items)
    structures = {"parotid_dmean": ("LeftParotid", "RightParotid"), "ptv_lower_d95": ("PTV63", "PTV56"),
                  "ptv_d99": ("PTV70", "PTV63", "PTV56")}
    rater = SimulatedRater(hidden, temperature=args.temperature)
    rows = []
    for n in N_VALUES:
        rhos, accs, lls = [], [], []
        for rep in range(args.reps):
            recs = simulate_records(rater, tpl, n=n, seed=1000 * rep + n, structures_per_item=structures)
            fit = learn_item_weights(recs, tpl, l2=1.0, heldout_fraction=0.2, seed=rep)
            rhos.append(spearmanr([hidden[i] for i in ids], [fit.weights[i] for i in ids]).statistic)
            accs.append(fit.heldout_accuracy)
            lls.append(fit.log_likelihood / fit.n_pairs)
        rows.append({"n": n, "spearman_mean": float(np.mean(rhos)), "spearman_sd": float(np.std(rhos)),
                     "heldout_accuracy_mean": float(np.nanmean(accs)), "loglik_per_pair_mean": float(np.mean(lls))})
        log.info("N=%d: Spearman %.3f ± %.3f, held-out acc %.3f", n, rows[-1]["spearman_mean"],
                 rows[-1]["spearman_sd"], rows[-1]["heldout_accuracy_mean"])
    # Bayes-optimal accuracy of the hidden rater on fresh pairs (ceiling for held-out accuracy).
    fresh = simulate_records(rater, tpl, n=4000, seed=99, structures_per_item=structures)
    p = np.array([rater.p_prefers(r.candidates[0].scorecard_items, r.candidates[1].scorecard_items) for r in fresh])
    ceiling = float(np.mean(np.maximum(p, 1 - p)))
    # The institution's store used for post-training: N = 200 simulated records.
    store_dir = OUT / "prefs"
    if (store_dir / "preferences.jsonl").exists():
        (store_dir / "preferences.jsonl").unlink()
    store = PreferenceStore(store_dir)
    recs = simulate_records(rater, tpl, n=200, seed=12345, structures_per_item=structures)
    for r in recs:
        store.append(r)
    fit = learn_item_weights(recs, tpl, l2=1.0, heldout_fraction=0.2, seed=0)
    out = {"hidden_weights": hidden, "temperature": args.temperature, "reps": args.reps, "rows": rows,
           "ceiling_accuracy": ceiling, "store": str(store_dir), "learned_weights_n200": fit.weights,
           "fit_n200": fit.to_dict(),
           "spearman_n200_store": float(spearmanr([hidden[i] for i in ids], [fit.weights[i] for i in ids]).statistic)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prefs.json").write_text(json.dumps(out, indent=2) + "\n")
    log.info("preference study -> %s", OUT / "prefs.json")


# -- 2. post-training ---------------------------------------------------------------------------------
def placebo_trainer():
    """The control: the same trainer with each candidate's reward replaced by a seeded N(0, 1) draw.

    Any change to the model moves all 40 validation cases the same way, so a paired test can call
    even an undirected update significant. The control spends the same budget on updates that
    follow no reward; ScardNFT has to beat it, not just the base.
    """
    from diffkt3d.training.scardnft import ScardNFTTrainer

    class PlaceboTrainer(ScardNFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._placebo_rng = np.random.default_rng(self.cfg.seed + 12345)

        def candidate_terms(self, dose_gy, case):
            terms = super().candidate_terms(dose_gy, case)  # logged as usual; only the reward is replaced
            terms.reward = float(self._placebo_rng.standard_normal())
            return terms

    return PlaceboTrainer


def cmd_train(args: argparse.Namespace) -> None:
    from diffkt3d.training.recipe import load_scardnft_recipe
    from diffkt3d.training.scardnft import run_scardnft

    overrides = {"max_cpu_minutes": args.cpu_minutes, "threads": 1}
    if args.base:
        overrides["base_model"] = args.base
    cfg = load_scardnft_recipe(args.config, overrides, data_root=DATA.parent)
    if any("validation" in str(r) or "test" in str(r) for r in cfg.train_roots):
        raise SystemExit("post-training must use the train split only")
    t0 = time.time()
    out = OUT / "placebo" if args.placebo else OUT
    res = run_scardnft(cfg, preferences=OUT / "prefs", out_dir=out,
                       trainer_cls=placebo_trainer() if args.placebo else None)
    (out / "train.json").write_text(json.dumps({
        "iterations": res.iterations, "cpu_minutes": res.cpu_minutes, "wall_minutes": (time.time() - t0) / 60,
        "base_model": str(cfg.base_model), "item_weights": res.item_weights, "weight_fit": res.weight_fit,
        "merged": str(res.merged_path), "adapter": str(res.adapter_path)}, indent=2, default=str) + "\n")


# -- 3. evaluation --------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> None:
    from diffkt3d.inference.predictor import Predictor
    from diffkt3d.io.case_folder import load_case_folder
    from diffkt3d.metrics.openkbp import score_case_object
    from diffkt3d.scorecard import load_template, score_case

    torch.set_num_threads(1)
    learned = json.loads((OUT / "prefs.json").read_text())["learned_weights_n200"]
    shipped = load_template(DEFAULT_TEMPLATE)
    learned_tpl = shipped.with_weights(learned)
    pred = Predictor.load(args.model, device="cpu")
    dirs = case_dirs([DATA / "validation"])
    k, n = (int(v) for v in args.shard.split("/"))
    dirs = dirs[k::n]
    rows = []
    for d in dirs:
        t0 = time.process_time()
        case = load_case_folder(d)
        dose = pred.predict_dose(case, steps=DEFAULT_STEPS, candidates=1, seed=DEFAULT_SEED, template=None,
                                 with_dvh=False).dose_gy
        sc = score_case(dose, case, shipped)
        sl = score_case(dose, case, learned_tpl)
        ok = score_case_object(case, dose)
        rows.append({"case": case.case_id, "scorecard": sc.total, "scorecard_max": sc.max_total,
                     "scorecard_learned": sl.total, "penalty": sc.penalty_total, "dose_score": ok.dose_score,
                     "dvh_score": ok.dvh_score, "dvh_errors": [float(v) for v in ok.dvh_errors.values()],
                     "cpu_s": time.process_time() - t0})
        log.info("%s %s: Scorecard %.2f (learned %.2f), dose score %.3f, DVH %.3f, %.1f CPU-s", args.tag,
                 case.case_id, sc.total, sl.total, ok.dose_score, ok.dvh_score, rows[-1]["cpu_s"])
    path = OUT / f"eval_{args.tag}_{k}of{n}.json"
    path.write_text(json.dumps({"model": str(args.model), "model_version": pred.model_version, "rows": rows},
                               indent=2) + "\n")


# -- 4. report -------------------------------------------------------------------------------------------
def _load_eval(tag: str) -> tuple[dict[str, dict], str]:
    rows, version = {}, ""
    for f in sorted(OUT.glob(f"eval_{tag}_*of*.json")):
        blob = json.loads(f.read_text())
        version = blob["model_version"]
        rows.update({r["case"]: r for r in blob["rows"]})
    return rows, version


def _paired(before: np.ndarray, after: np.ndarray) -> dict:
    from scipy.stats import ttest_rel, wilcoxon

    diff = after - before
    t = ttest_rel(after, before)
    w = wilcoxon(after, before) if np.any(diff != 0) else None
    return {"before": float(before.mean()), "after": float(after.mean()), "diff": float(diff.mean()),
            "diff_sd": float(diff.std(ddof=1)), "t_p": float(t.pvalue),
            "wilcoxon_p": float(w.pvalue) if w is not None else 1.0, "improved_cases": int((diff > 0).sum())}


def _prefs_section(prefs: dict) -> list[str]:
    """Markdown lines of the title and section 1 (preference learner vs N)."""
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# ScardNFT benchmark (OpenKBP validation, 40 cases)", "",
        f"Generated by `benchmarks/scardnft_benchmark.py` on {date} ({describe_machine()}).", "",
        "## 1. Preference learner vs number of preferences (simulated rater)", "",
        f"Hidden item weights (seed {HIDDEN_SEED}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in prefs["hidden_weights"].items()) + ".",
        f"Rater: Bradley-Terry with temperature {prefs['temperature']} points; each record = one simulated "
        "case with two candidates (item scores uniform 0-10, candidates ±N(0, 2²)). Learner: non-negative "
        f"L2 (λ = 1) logistic regression; 20 % of records held out. {prefs['reps']} repetitions per N. "
        f"Best possible held-out accuracy (the hidden rater's own consistency): {prefs['ceiling_accuracy']:.3f}.", "",
        "| N preferences | Spearman ρ (learned vs hidden weights), mean ± sd | held-out accuracy (20 % of records) | training log-lik / pair |",
        "| --- | --- | --- | --- |"]
    for r in prefs["rows"]:
        lines.append(f"| {r['n']} | {r['spearman_mean']:.3f} ± {r['spearman_sd']:.3f} | "
                     f"{r['heldout_accuracy_mean']:.3f} | {r['loglik_per_pair_mean']:.3f} |")
    lines += ["", f"The post-training reward used the weights learned from the N = 200 store "
              f"(ρ = {prefs['spearman_n200_store']:.3f} vs hidden): "
              + ", ".join(f"{k} {v:.2f}" for k, v in prefs["learned_weights_n200"].items()) + ".", ""]
    return lines


def _placebo_lines(before: dict[str, dict], after: dict[str, dict], placebo: dict[str, dict], version: str,
                   cases: list[str]) -> list[str]:
    """Section 2b: the control run (random rewards, same budget) against the base and against ScardNFT."""
    common = [c for c in cases if c in placebo]
    if not common:
        return ["Control run (random rewards, same budget): **not measured** (`train --placebo`, then "
                "`eval --model runs/scardnft-bench/placebo/merged.pt --tag placebo`).", ""]
    ptrain = OUT / "placebo" / "train.json"
    tr = json.loads(ptrain.read_text()) if ptrain.exists() else {}
    lines = ["### Control: the same run with random rewards", "",
             f"`train --placebo`: every candidate's reward replaced by a seeded N(0, 1) draw, all else equal "
             f"({tr.get('iterations', '?')} iterations, {tr.get('cpu_minutes', float('nan')):.1f} CPU-minutes; "
             f"`{version}`). Any update moves all cases together, so a paired test can call an undirected "
             "change significant; the control measures that, and ScardNFT must beat it.", "",
             "| figure | control − before (mean ± sd) | p (t) | ScardNFT − control (mean ± sd) | p (t) | cases ScardNFT > control |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, key, fmt in (("Scorecard, shipped (points)", "scorecard", ".2f"),
                           ("Scorecard, learned weights (points)", "scorecard_learned", ".2f"),
                           ("hard-constraint penalty (points)", "penalty", ".2f"),
                           ("dose score (Gy)", "dose_score", ".3f")):
        b = np.array([before[c][key] for c in common])
        p_ = np.array([placebo[c][key] for c in common])
        a = np.array([after[c][key] for c in common])
        pb, ap = _paired(b, p_), _paired(p_, a)
        lines.append(f"| {name} | {pb['diff']:+{fmt}} ± {pb['diff_sd']:{fmt}} | {pb['t_p']:.3g} | "
                     f"{ap['diff']:+{fmt}} ± {ap['diff_sd']:{fmt}} | {ap['t_p']:.3g} | {ap['improved_cases']}/{len(common)} |")
    return lines + [""]


def cmd_report(args: argparse.Namespace) -> None:
    before, v_before = _load_eval("before")
    after, v_after = _load_eval("after")
    placebo, v_placebo = _load_eval("placebo")
    cases = sorted(set(before) & set(after))
    prefs = json.loads((OUT / "prefs.json").read_text())
    if not cases:
        log.warning("no paired evaluations found: writing the preference study only")
        RESULTS.mkdir(parents=True, exist_ok=True)
        lines = _prefs_section(prefs) + ["## 2. Before vs after ScardNFT", "",
                                         "**Not measured yet**: no paired before/after evaluation exists "
                                         "(run `eval` for both tags, then `report`).", ""]
        (RESULTS / "scardnft.md").write_text("\n".join(lines))
        return
    train = json.loads((OUT / "train.json").read_text()) if (OUT / "train.json").exists() else {}
    res = {}
    for key in ("scorecard", "scorecard_learned", "penalty", "dose_score", "dvh_score"):
        res[key] = _paired(np.array([before[c][key] for c in cases]), np.array([after[c][key] for c in cases]))
    pooled = {tag: float(np.mean([e for c in cases for e in rows[c]["dvh_errors"]]))
              for tag, rows in (("before", before), ("after", after))}
    sc_ok = res["scorecard"]["diff"] > 0 and res["scorecard"]["t_p"] < 0.05
    dose_ok = res["dose_score"]["diff"] <= 0.05
    blob = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": describe_machine(),
            "cases": len(cases), "model_before": v_before, "model_after": v_after, "paired": res,
            "dvh_score_pooled": pooled, "train": train, "prefs": prefs,
            "placebo_rows": placebo,
            "target": {"scorecard_p_lt_0_05_and_better": sc_ok, "dose_score_worse_by_at_most_0_05": dose_ok}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scardnft.json").write_text(json.dumps(blob, indent=2) + "\n")

    def row(name: str, key: str, fmt: str = ".3f") -> str:
        r = res[key]
        return (f"| {name} | {r['before']:{fmt}} | {r['after']:{fmt}} | {r['diff']:+{fmt}} ± {r['diff_sd']:{fmt}} | "
                f"{r['t_p']:.3g} | {r['wilcoxon_p']:.3g} | {r['improved_cases']}/{len(cases)} |")

    lines = _prefs_section(prefs) + ["## 2. Before vs after ScardNFT", ""]
    if train:
        lines += [f"Post-training: {train['iterations']} iterations (cases of the TRAIN split, 4 candidates each), "
                  f"{train['cpu_minutes']:.1f} CPU-minutes ({train['wall_minutes']:.1f} min wall), base "
                  f"`{train['base_model']}`.", ""]
    summary = json.loads((OUT / "summary.json").read_text()) if (OUT / "summary.json").exists() else {}
    if summary.get("config"):
        c = summary["config"]
        keys = ("group_size", "sample_steps", "inner_steps", "lr", "beta", "kl_weight", "old_decay", "lora_rank",
                "shared_noise")
        lines += ["Settings: " + ", ".join(f"{k} {c[k]}" for k in keys if k in c)
                  + "; reward weights " + ", ".join(f"{k} {v}" for k, v in c["reward"].items()
                                                      if k.startswith("w_")) + ".", ""]
    lines += [f"Before: `{v_before}`; after: `{v_after}`. One 10-step candidate per case, seed 0 for both "
              "(same initial noise). Paired two-sided tests over the cases.", "",
              "| figure | before | after | after − before (mean ± sd) | t-test p | Wilcoxon p | cases with after > before |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              row("Scorecard, shipped openkbp_hn (points)", "scorecard", ".2f"),
              row("Scorecard, learned weights (points)", "scorecard_learned", ".2f"),
              row("hard-constraint penalty (points)", "penalty", ".2f"),
              row("dose score (Gy, lower is better)", "dose_score"),
              row("DVH score per case (Gy, lower is better)", "dvh_score"), "",
              f"DVH score pooled over all (case, ROI, metric): {pooled['before']:.3f} → {pooled['after']:.3f} Gy.", "",
              *_placebo_lines(before, after, placebo, v_placebo, cases),
              "## 3. Target", "",
              f"* Scorecard improves with p < 0.05: **{'reached' if sc_ok else 'not reached'}** "
              f"(Δ {res['scorecard']['diff']:+.2f} points, t-test p = {res['scorecard']['t_p']:.3g}).",
              f"* Dose score worse by at most 0.05 Gy: **{'reached' if dose_ok else 'not reached'}** "
              f"(Δ {res['dose_score']['diff']:+.3f} Gy).", ""]
    if args.notes and Path(args.notes).is_file():
        lines += [Path(args.notes).read_text().rstrip(), ""]
    (RESULTS / "scardnft.md").write_text("\n".join(lines))
    log.info("report -> %s", RESULTS / "scardnft.md")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prefs")
    s.add_argument("--reps", type=int, default=20)
    s.add_argument("--temperature", type=float, default=5.0)
    s.set_defaults(func=cmd_prefs)
    s = sub.add_parser("train")
    s.add_argument("--config", default=str(ROOT / "configs" / "scardnft-cpu.yaml"))
    s.add_argument("--base", default=None, help="base checkpoint (default: the config's)")
    s.add_argument("--cpu-minutes", type=float, default=15.0)
    s.add_argument("--placebo", action="store_true",
                   help="control run: random rewards, same budget (outputs in runs/scardnft-bench/placebo)")
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("eval")
    s.add_argument("--model", required=True)
    s.add_argument("--tag", required=True, choices=["before", "after", "placebo"])
    s.add_argument("--shard", default="0/1", help="k/n: every n-th case starting at k")
    s.set_defaults(func=cmd_eval)
    s = sub.add_parser("report")
    s.add_argument("--notes", default=None, help="markdown file appended to the report (limits, remarks)")
    s.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    os.chdir(ROOT)  # config paths are relative to the repository root
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
