"""How the prescription map is brought to the working grid changes what the dose prior covers.

Area-averaging the prescription map to 64³ leaves a working voxel on a PTV edge with part of its
Rx, and the prior (``models.dose_prior``) then starts its falloff inside the target. This script
scores the prior alone (no network, the shipped model's falloffs and initial mix) on the
validation cases with the map area-averaged and max-pooled (``EncodingConfig.ptv_resampling``),
using the same metrics as the dose benchmark. It is why the recipe max-pools; the model is not
touched.

    python benchmarks/prior_pooling.py [--limit N]

writes benchmarks/results/prior_pooling.md / .json with the machine and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dose_benchmark import dose_figures, prior_dose_from  # noqa: E402
from machine_info import case_dirs, describe_machine, openkbp_dir, write_results  # noqa: E402

from diffkt3d.constants import DEFAULT_TEMPLATE  # noqa: E402
from diffkt3d.data.encoding import encode_case  # noqa: E402
from diffkt3d.inference import Predictor  # noqa: E402
from diffkt3d.io.case_folder import load_case_folder  # noqa: E402
from diffkt3d.scorecard import load_template  # noqa: E402
from diffkt3d.training.dataset import prepare_case  # noqa: E402


def prior_doses(predictor: Predictor, folder: Path) -> dict[str, np.ndarray]:
    """Prior dose in Gy keyed by ``EncodingConfig.ptv_resampling``: "area" (area-averaged map) and "max"."""
    case = prepare_case(folder)
    body = encode_case(case, predictor.encoding, ("body",))["body"]
    out = {}
    for how in ("area", "max"):
        enc = dataclasses.replace(predictor.encoding, ptv_resampling=how)
        out[how] = prior_dose_from(predictor, case, encode_case(case, enc, ("ptv",))["ptv"], body)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=openkbp_dir("validation"))
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/prior_pooling"))
    args = p.parse_args()
    torch.set_num_threads(1)
    started = dt.datetime.now(dt.timezone.utc)
    predictor = Predictor.load(None)
    template = load_template(DEFAULT_TEMPLATE)
    rows: dict[str, list[dict]] = {"area": [], "max": []}
    for folder in case_dirs([args.cases], args.limit):
        ref = load_case_folder(folder)
        if ref.dose_gy is None:
            continue
        for name, dose in prior_doses(predictor, folder).items():
            fig = {k: v for k, v in dose_figures(ref, dose, template).items() if k != "_score"}
            rows[name].append({"case": ref.case_id, **fig})
    items = sorted({i for r in rows["area"] for i in r["scorecard_items"]})

    def mean(name: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows[name]]))

    def item(name: str, i: str) -> float:
        return float(np.mean([r["scorecard_items"][i] for r in rows[name] if i in r["scorecard_items"]]))

    lines = [f"# Dose prior alone: prescription map area-averaged vs max-pooled to the working grid "
             f"({started:%Y-%m-%d %H:%M} UTC)", "", f"Machine: {describe_machine()}", "",
             f"Command: `python benchmarks/prior_pooling.py {' '.join(sys.argv[1:])}`", "",
             f"Cases: {len(rows['area'])} (OpenKBP validation). The shipped model's falloffs and initial mix, "
             "no network.", "", "| figure | area-averaged | max-pooled |", "|---|---|---|"]
    for key, label in (("dose_score", "dose score (Gy)"), ("scorecard", "Scorecard (openkbp_hn)"),
                       ("penalty", "hinge penalty (points)")):
        lines.append(f"| {label} | {mean('area', key):.3f} | {mean('max', key):.3f} |")
    dvh = {n: float(np.mean([e for r in rows[n] for e in r["dvh_errors"]])) for n in rows}
    lines.append(f"| DVH score (Gy) | {dvh['area']:.3f} | {dvh['max']:.3f} |")
    lines += ["", "| Scorecard item (mean unweighted score, 0-10) | area-averaged | max-pooled |", "|---|---|---|"]
    lines += [f"| {i} | {item('area', i):.2f} | {item('max', i):.2f} |" for i in items]
    write_results(args.out, lines, started, rows=rows)


if __name__ == "__main__":
    main()
