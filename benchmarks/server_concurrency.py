"""Concurrency benchmark of the DiffKT3D MONAI Label server: N clients sending 1-step previews.

Starts a real server (unless --url is given) on a copy of one OpenKBP validation case, lets
`--clients` threads each send `POST /infer/dose` with `{"preview": true}` (multipart response, the
dose NIfTI included, as the Slicer module receives it) back to back for `--seconds`, and reports
throughput, latency percentiles, errors and the server's memory (RSS of the server process tree:
at start, peak, and at the end, to spot a leak). Writes a Markdown report.

    nice -n 15 python benchmarks/server_concurrency.py --seconds 120
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
DEFAULT_CASE = (Path(__file__).resolve().parents[1].parent / "shared" / "datasets/openkbp/validation/pt_201")
log = logging.getLogger("server_concurrency")


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


def run(url: str, case_id: str, clients: int, seconds: float, server_pid: int | None) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    rss_samples: list[int] = []
    done = threading.Event()

    def monitor() -> None:
        while not done.is_set():
            if server_pid is not None:
                rss_samples.append(tree_rss_bytes(server_pid))
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
    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    t_start = time.monotonic()
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
            "rss_end_mb": rss_end / 2**20, "server_alive_after": alive}


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
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "server_concurrency.md")
    args = ap.parse_args()
    torch.set_num_threads(1)

    workdir = Path(tempfile.mkdtemp(prefix="diffkt3d-bench-"))
    proc = None
    model_env = None
    note = "shipped model"
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
        res = run(url, case_id, args.clients, args.seconds, pid)
        log.info("result: %s", json.dumps(res))
        write_report(args.out, res, model_version, note)
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
