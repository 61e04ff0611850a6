"""README quick start, command 1: `scripts/quickstart.sh` and `scripts/quickstart.sh --keep-server`, run
as written from the repository root (real server, shipped model, sample case pt_201).

In CI the venv is already installed by `scripts/test.sh` (the test profile also stamps the demo
profile), so the script's own `scripts/setup_env.sh demo` is a no-op here.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import nibabel as nib
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "demo-output" / "pt_201"
pytestmark = [pytest.mark.slow, pytest.mark.server]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _env(port: int) -> dict[str, str]:
    return {**os.environ, "PORT": str(port), "OMP_NUM_THREADS": "2"}


def test_quickstart_writes_the_documented_outputs_and_stops_its_server() -> None:
    port = _free_port()
    started = time.time()
    proc = subprocess.run(["scripts/quickstart.sh"], cwd=REPO, env=_env(port), capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Scorecard (template openkbp_hn), case pt_201:" in proc.stdout
    assert re.search(r"TOTAL \d+\.\d+ / \d+\.\d+", proc.stdout), proc.stdout[-2000:]
    assert "Connect from 3D Slicer" in proc.stdout
    for name in ("dose.nii.gz", "scorecard.json", "dvh.png", "dose_overlay.png"):
        path = OUT / name
        assert path.exists() and path.stat().st_mtime >= started - 1, f"{path} not written by this run"
    dose = nib.load(str(OUT / "dose.nii.gz"))
    assert dose.shape == nib.load(str(REPO / "sample-data" / "pt_201" / "ct.nii.gz")).shape
    assert not _port_open(port), "quickstart.sh without --keep-server left its server running"


def test_quickstart_keep_server_leaves_the_server_up_for_slicer() -> None:
    port = _free_port()
    proc = subprocess.Popen(["scripts/quickstart.sh", "--keep-server"], cwd=REPO, env=_env(port),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.time() + 3600
        while time.time() < deadline:
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)[-3000:]
                continue
            seen.append(line)
            if "server running (pid" in line:
                break
        else:
            pytest.fail("no 'server running' line:\n" + "".join(seen)[-3000:])
        time.sleep(2)
        assert proc.poll() is None, "quickstart.sh --keep-server exited"
        info = requests.get(f"http://127.0.0.1:{port}/info/", timeout=30)
        assert info.status_code == 200 and info.json()["diffkt3d"]["model_version"].startswith("cpu-default@")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the script and its server share the process group
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
