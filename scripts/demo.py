"""Quick-start client: send a sample case to a running DiffKT3D server the way 3D Slicer does.

Uploads the case's files as a session (the reference dose is NOT sent), asks for a dose, and writes
ROOT/<case>/dose.nii.gz, the Scorecard (printed and as JSON), a DVH plot and a dose-overlay slice.
It uses the Slicer module's own HTTP client (slicer_extension/DiffKT3D/DiffKT3DLib/client.py), so
this demo exercises exactly what the Slicer panel sends.

    python scripts/demo.py --server http://127.0.0.1:8000 --case sample-data/pt_201 --out demo-output
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A repository script, not part of the installed product: it imports the Slicer module's Lib from
# its folder exactly as Slicer does (the Lib is a Slicer module, never pip-installed).
sys.path.insert(0, str(ROOT / "slicer_extension" / "DiffKT3D"))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from DiffKT3DLib.client import DiffKT3DClient  # noqa: E402
from DiffKT3DLib.constants import DEFAULT_SERVER_URL  # noqa: E402

from diffkt3d.constants import DEFAULT_SEED, DEFAULT_STEPS, DOSE_FILE  # noqa: E402
from diffkt3d.io.case_folder import load_case_folder  # noqa: E402
from diffkt3d.report import dose_overlay, dvh_plot, scorecard_table  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default=DEFAULT_SERVER_URL)
    p.add_argument("--case", default=str(ROOT / "sample-data" / "pt_201"))
    p.add_argument("--out", default=str(ROOT / "demo-output"))
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = p.parse_args()

    case_dir = Path(args.case)
    out = Path(args.out) / case_dir.name
    client = DiffKT3DClient(args.server)
    info = client.info()
    tasks = client.available_tasks(info)
    print(f"[demo] server {client.server_url}: model {info.get('diffkt3d', {}).get('model_version', '?')}, "
          f"tasks {tasks['dose'] + tasks['impute']}")

    files = {f.name: f for f in sorted(case_dir.iterdir())
             if f.is_file() and f.name != DOSE_FILE and (f.name.endswith(".nii.gz") or f.name == "plan.json")}
    print(f"[demo] uploading case {case_dir.name}: {len(files)} files (the reference dose stays local)")
    session = client.upload_case(files)
    print(f"[demo] predicting the dose ({args.steps} sampling steps on the server) ...", flush=True)
    t0 = time.time()
    result = client.infer("dose", out, session_id=session, params={"steps": args.steps, "seed": args.seed})
    elapsed = time.time() - t0
    client.delete_session(session)
    dose_path = out / "dose.nii.gz"
    result.image_path.replace(dose_path)
    res = result.params  # the dose result, the same description `diffkt3d predict` writes
    (out / "scorecard.json").write_text(json.dumps(res, indent=2))
    print(f"[demo] dose received in {elapsed:.1f} s -> {dose_path}")
    print()
    print(f"Scorecard (template {res['template']}), case {case_dir.name}:")
    print(scorecard_table(res["scorecard"]))
    print()

    case = load_case_folder(case_dir)
    dose = np.asarray(nib.load(str(dose_path)).get_fdata(dtype=np.float32))
    doses = {"predicted": dose}
    if case.dose_gy is not None:
        doses["reference"] = case.dose_gy
        body = case.body if case.body is not None else np.ones(dose.shape, bool)
        err = float(np.abs(dose - case.dose_gy).sum() / body.sum())
        print(f"[demo] against the reference plan: OpenKBP dose score {err:.2f} Gy")
    dvh = dvh_plot(case, doses, out / "dvh.png")
    overlay = dose_overlay(case, dose, out / "dose_overlay.png")
    print(f"[demo] DVH plot -> {dvh}")
    print(f"[demo] dose overlay -> {overlay}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
