"""Concurrency benchmark of the DiffKT3D MONAI Label server: N clients sending 1-step previews.

Starts a real server (unless --url is given) on a copy of one OpenKBP validation case, lets
`--clients` threads each send `POST /infer/dose` with `{"preview": true}` (multipart response, the
dose NIfTI included, as the Slicer module receives it) back to back for `--seconds`, and reports
throughput, latency percentiles, errors and the server's memory (RSS of the server process tree:
at start, peak, and at the end). For a soak, the RSS is also sampled every `--sample-every` seconds
into a time series; the leak judgement uses the second half of that series only (the first half
holds the warm-up: model load, allocator pools, torch caches), as a least-squares slope in MB/min.
Writes a Markdown report (the series included) and, with `--json`, the raw numbers.

    nice -n 15 python benchmarks/server_concurrency.py --seconds 120
    nice -n 15 python benchmarks/server_concurrency.py --seconds 900 \
        --out benchmarks/results/server_concurrency_soak.md --json benchmarks/results/server_concurrency_soak.json
    python benchmarks/server_concurrency.py --seconds 20 --tiny     # random tiny model: checks the harness only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASE = REPO / "sample-data" / "pt_201"  # an OpenKBP validation case, shipped
log = logging.getLogger("server_concurrency")
# A second-half RSS slope above this counts as a leak. 2 MB/min is ~120 MB/h: small against the
# ~1.3 GB working set, but it would exhaust a 16 GB node within days of continuous use.
LEAK_SLOPE_MB_PER_MIN = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(case: Path, workdir: Path, model_env: str | None) -> tuple[subprocess.Popen, str]:
    studies = workdir / "studies"
    shutil.copytree(case, studies / case.name, ignore=shutil.ignore_patterns("dose.nii.gz"))
    port = _free_port()
    env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_INFER_CONCURRENCY": "1",
           "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions")}
    if model_env:
        env["DIFFKT3D_MODEL"] = model_env
    proc = subprocess.Popen([sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "monailabel_app"), "--studies",
                             str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "model_dir",
                             str(workdir / "model"), "--conf", "state_dir", str(workdir / "state")],
                            stdout=open(workdir / "server.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/info/", timeout=5).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server did not start; log: {workdir / 'server.log'}")


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and its children (the uvicorn server runs under the monailabel launcher)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def leak_analysis(series: list[dict], seconds: float) -> dict:
    """Judge leak vs plateau from the RSS time series (`t_s`, `rss_mb`, `requests_ok` rows).

    Only the second half of the run is fitted: the first half holds the warm-up growth (allocator
    pools, torch caches, the first multipart buffers) that a steady server stops doing. RSS saw-tooths
    by tens of MB per request, so the slope comes with a 95 % interval and the verdict is "leak" only
    when the whole interval lies above LEAK_SLOPE_MB_PER_MIN, "plateau" when it lies below, else
    "inconclusive". Samples are autocorrelated, so the interval is optimistic; the per-quarter
    medians and the slope per request (independent of how loaded the machine was) are reported too.
    """
    second_half = [row for row in series if row["t_s"] >= seconds / 2]
    out: dict = {"slope_second_half_mb_per_min": None, "rss_at_minute_mb": {}, "verdict": "too few samples"}
    for minute in (1, 5, 10, 15, 20, 30, 60):
        if series and series[-1]["t_s"] >= 60 * minute - 5:
            row = min(series, key=lambda r: abs(r["t_s"] - 60 * minute))
            out["rss_at_minute_mb"][minute] = row["rss_mb"]
    if series:
        t_end = series[-1]["t_s"]
        out["quarter_median_mb"] = [float(np.median([r["rss_mb"] for r in series if q * t_end / 4 <= r["t_s"] <= (q + 1) * t_end / 4]
                                                    or [np.nan])) for q in range(4)]
    if len(second_half) >= 5:
        t_min = np.asarray([r["t_s"] for r in second_half]) / 60.0
        rss = np.asarray([r["rss_mb"] for r in second_half])
        (slope, _), cov = np.polyfit(t_min, rss, 1, cov=True)
        half_width = 1.96 * float(np.sqrt(cov[0, 0]))
        out["slope_second_half_mb_per_min"] = float(slope)
        out["slope_ci95_mb_per_min"] = [float(slope) - half_width, float(slope) + half_width]
        out["second_half_min_max_mb"] = [float(rss.min()), float(rss.max())]
        n_req = np.asarray([r["requests_ok"] for r in second_half], dtype=float)
        if n_req.max() - n_req.min() >= 5:
            out["slope_second_half_mb_per_request"] = float(np.polyfit(n_req, rss, 1)[0])
            out["requests_in_second_half"] = int(n_req.max() - n_req.min())
        lo, hi = out["slope_ci95_mb_per_min"]
        out["verdict"] = "leak" if lo > LEAK_SLOPE_MB_PER_MIN else "plateau" if hi < LEAK_SLOPE_MB_PER_MIN else "inconclusive"
    return out


def run(url: str, case_id: str, clients: int, seconds: float, server_pid: int | None,
        sample_every: float = 10.0) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    rss_samples: list[int] = []
    series: list[dict] = []
    done = threading.Event()

    def monitor() -> None:
        next_sample = time.monotonic()
        while not done.is_set():
            if server_pid is not None:
                rss_samples.append(tree_rss_bytes(server_pid))
                now = time.monotonic()
                if now >= next_sample:
                    with lock:
                        n_ok = len(latencies)
                    series.append({"t_s": round(now - t_start, 1), "rss_mb": round(rss_samples[-1] / 2**20, 1),
                                   "requests_ok": n_ok, "load_avg_1min": round(os.getloadavg()[0], 2)})
                    next_sample += sample_every
            done.wait(0.5)

    def client(k: int) -> None:
        session = requests.Session()
        n = 0
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                r = session.post(f"{url}/infer/dose", params={"image": case_id, "output": "all"},
                                 data={"params": json.dumps({"preview": True, "seed": 1000 * k + n})}, timeout=900)
                ok = r.status_code == 200 and len(r.content) > 1000
                msg = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
            except requests.RequestException as exc:
                msg = f"{type(exc).__name__}: {exc}"
            with lock:
                if msg is None:
                    latencies.append(time.monotonic() - t0)
                else:
                    errors.append(msg)
            n += 1

    load_start = os.getloadavg()[0]
    rss_start = tree_rss_bytes(server_pid) if server_pid else 0
    t_start = time.monotonic()
    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start
    done.set()
    mon.join()
    alive = requests.get(f"{url}/info/", timeout=60).ok
    rss_end = tree_rss_bytes(server_pid) if server_pid else 0
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"clients": clients, "seconds_requested": seconds, "seconds": round(elapsed, 1),
            "load_avg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)], "requests_ok": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "throughput_rps": len(latencies) / elapsed,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p90_s": float(np.percentile(lat, 90)),
            "latency_p99_s": float(np.percentile(lat, 99)), "latency_max_s": float(np.max(lat)),
            "rss_start_mb": rss_start / 2**20, "rss_peak_mb": max(rss_samples, default=0) / 2**20,
            "rss_end_mb": rss_end / 2**20, "server_alive_after": alive,
            "rss_series": series, "leak": leak_analysis(series, seconds)}


def write_report(path: Path, res: dict, model_version: str, note: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Server concurrency benchmark",
        "",
        f"Date (UTC): {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}  ",
        f"Machine: {platform.node()}, {platform.machine()}, {psutil.cpu_count(logical=True)} logical CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.1f} GB RAM, Python {platform.python_version()}, "
        f"torch {torch.__version__} (CPU threads {torch.get_num_threads()})  ",
        f"Model: `{model_version}`  ",
        f"Command: `python benchmarks/server_concurrency.py {' '.join(sys.argv[1:])}`  ",
        f"Note: {note}",
        "",
        "Workload: each client sends `POST /infer/dose?image=<case>&output=all` with "
        "`{\"preview\": true}` (1 sampling step, Scorecard + DVH, dose NIfTI in the response), back to back. "
        "Server: `MONAI_LABEL_INFER_CONCURRENCY=1` (one inference worker thread).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| clients | {res['clients']} |",
        f"| duration | {res['seconds']} s (new requests for {res['seconds_requested']:.0f} s, then the in-flight ones finish) |",
        f"| machine load average (1 min) at start / end | {res['load_avg_1min_start_end'][0]} / "
        f"{res['load_avg_1min_start_end'][1]} (shared machine: other jobs ran at the same time) |",
        f"| successful requests | {res['requests_ok']} |",
        f"| errors | {res['errors']} |",
        f"| throughput | {res['throughput_rps']:.3f} requests/s |",
        f"| latency p50 / p90 / p99 / max | {res['latency_p50_s']:.1f} / {res['latency_p90_s']:.1f} / "
        f"{res['latency_p99_s']:.1f} / {res['latency_max_s']:.1f} s |",
        f"| server RSS start / peak / end | {res['rss_start_mb']:.0f} / {res['rss_peak_mb']:.0f} / "
        f"{res['rss_end_mb']:.0f} MB |",
        f"| server alive after the run | {res['server_alive_after']} |",
        "",
    ]
    if res["error_examples"]:
        lines += ["Error examples:", "", *[f"- `{e}`" for e in res["error_examples"]], ""]
    leak = res["leak"]
    if leak["slope_second_half_mb_per_min"] is not None:
        at_minute = ", ".join(f"min {m}: {v:.0f} MB" for m, v in leak["rss_at_minute_mb"].items())
        lo, hi = leak["second_half_min_max_mb"]
        ci_lo, ci_hi = leak["slope_ci95_mb_per_min"]
        per_request = (f"; {leak['slope_second_half_mb_per_request']:+.2f} MB per request over its "
                       f"{leak['requests_in_second_half']} requests" if "slope_second_half_mb_per_request" in leak else "")
        lines += [
            "## Memory over time (leak check)",
            "",
            f"- RSS at {at_minute}",
            "- median RSS per quarter of the run: " + " / ".join(f"{m:.0f}" for m in leak["quarter_median_mb"]) + " MB",
            f"- second half of the run: RSS between {lo:.0f} and {hi:.0f} MB, least-squares slope "
            f"{leak['slope_second_half_mb_per_min']:+.2f} MB/min (95 % interval {ci_lo:+.2f} .. {ci_hi:+.2f}){per_request}",
            f"- verdict: **{leak['verdict']}** (leak: the whole interval above {LEAK_SLOPE_MB_PER_MIN} MB/min; "
            "plateau: the whole interval below it; else inconclusive)",
            "",
            "| t (s) | server RSS (MB) | requests done | load avg (1 min) |",
            "| ---: | ---: | ---: | ---: |",
            *[f"| {r['t_s']:.0f} | {r['rss_mb']:.0f} | {r['requests_ok']} | {r['load_avg_1min']} |" for r in res["rss_series"]],
            "",
        ]
    path.write_text("\n".join(lines))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder to serve (default OpenKBP pt_201)")
    ap.add_argument("--url", help="use a running server instead of starting one (its memory is then not measured)")
    ap.add_argument("--case-id", default=None, help="with --url: datastore case id to request")
    ap.add_argument("--tiny", action="store_true", help="serve a random tiny model (harness check, not a result)")
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS time-series samples")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "server_concurrency.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers (RSS series included) here")
    ap.add_argument("--note", default="", help="context for the report, e.g. what else loaded the machine")
    args = ap.parse_args()
    torch.set_num_threads(1)

    workdir = Path(tempfile.mkdtemp(prefix="diffkt3d-bench-"))
    proc = None
    model_env = None
    note = "shipped model" + (f"; {args.note}" if args.note else "")
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests" / "monailabel_app"))
        from tiny_model import write_tiny_checkpoint

        model_env = str(write_tiny_checkpoint(workdir / "tiny.pt"))
        note = "RANDOM TINY MODEL (--tiny): checks the harness; latencies are not those of the shipped model"
    try:
        if args.url:
            url, case_id, pid = args.url.rstrip("/"), args.case_id or args.case.name, None
        else:
            proc, url = start_server(args.case, workdir, model_env)
            case_id, pid = args.case.name, proc.pid
        info = requests.get(f"{url}/info/", timeout=60).json()
        model_version = (info.get("diffkt3d") or {}).get("model_version") or "none"
        log.info("server %s, model %s; %d clients for %.0f s", url, model_version, args.clients, args.seconds)
        res = run(url, case_id, args.clients, args.seconds, pid, args.sample_every)
        log.info("result: %s", json.dumps({k: v for k, v in res.items() if k != "rss_series"}))
        write_report(args.out, res, model_version, note)
        if args.json:
            args.json.write_text(json.dumps({"model_version": model_version, "note": note, **res}, indent=1))
        log.info("wrote %s", args.out)
        return 0 if res["server_alive_after"] and res["errors"] == 0 else 1
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
