"""Paired per-case comparison of variants from different dose-benchmark runs.

`dose_benchmark.py` pairs the variants of one run. Models trained in different runs (a retrained
peer, the previous shipped model, a peer with another loss) are compared case by case from their
results files instead: the DiT rows are seeded and the peer is deterministic, so a row does not
depend on the run that produced it, only the seconds do.

    python benchmarks/compare_runs.py A.json:peer B.json@REV:peer [C.json:dit10 ...] --out FILE

``@REV`` reads the file as committed at a git revision (each run overwrites its results file).

Every later run is compared with the first: mean difference, cases where it is better (lower dose
score / DVH error, higher Scorecard) and the two-sided Wilcoxon signed-rank p. Writes FILE.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dose_benchmark import paired  # noqa: E402

# figure -> (row key, higher is better)
FIGURES = {"dose score (Gy)": ("dose_score", False), "mean DVH error per case (Gy)": ("dvh_case", False),
           "Scorecard": ("scorecard", True)}


def read_results(path: str) -> str:
    """The text of ``path``, or of ``path@REV`` as committed at git revision REV (results files are
    overwritten by each run; their history is in git)."""
    file, sep, rev = path.partition("@")
    if not sep:
        return Path(path).read_text()
    proc = subprocess.run(["git", "show", f"{rev}:{file}"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip())
    return proc.stdout


def load_rows(spec: str) -> tuple[str, list[dict]]:
    """``RESULTS.json[@REV]:variant`` -> (label, rows with the per-case mean |DVH error| as ``dvh_case``)."""
    path, sep, variant = spec.rpartition(":")
    if not sep or not path:
        raise SystemExit(f"{spec!r}: expected RESULTS.json[@REV]:VARIANT")
    try:
        blob = json.loads(read_results(path))
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{path}: not a readable dose-benchmark results file ({err})") from None
    results = blob.get("results", {})
    if variant not in results:
        raise SystemExit(f"{path}: no variant {variant!r} (has {sorted(results)})")
    rows = [dict(r, dvh_case=float(np.mean(np.abs(r["dvh_errors"])))) for r in results[variant]["rows"]]
    return f"{Path(path).name}:{variant}", rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="RESULTS.json[@REV]:VARIANT; the first is the baseline")
    p.add_argument("--out", required=True, help="output path without suffix (writes .md)")
    args = p.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("give at least two RESULTS.json:VARIANT")
    loaded = [load_rows(s) for s in args.runs]
    base_label, base = loaded[0]
    lines = [f"# Paired comparison of benchmark runs ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"Command: `python benchmarks/compare_runs.py {' '.join(sys.argv[1:])}`", "",
             "| run | figure | cases | mean of run | mean of baseline | run - baseline | cases run better | p |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rows in loaded[1:]:
        common = {r["case"] for r in rows} & {r["case"] for r in base}
        for figure, (key, higher_better) in FIGURES.items():
            a = sorted((r for r in rows if r["case"] in common), key=lambda r: r["case"])
            b = sorted((r for r in base if r["case"] in common), key=lambda r: r["case"])
            stats = paired(a, b, key)
            diffs = np.array([ra[key] - rb[key] for ra, rb in zip(a, b, strict=True)])
            better = int((diffs > 0).sum() if higher_better else (diffs < 0).sum())
            lines.append(f"| {label} vs {base_label} | {figure} | {stats['n']} | {np.mean([r[key] for r in a]):.3f} | "
                         f"{np.mean([r[key] for r in b]):.3f} | {stats['mean_diff']:+.3f} | {better} | {stats['p']:.2g} |")
    out = Path(args.out).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
