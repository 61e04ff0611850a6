"""Start/stop a real MONAI Label server with the DiffKT3D app for tests (no fixtures here)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, studies: Path, conf: dict[str, str], env: dict[str, str] | None = None,
                 timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start the server (nice'd, own process group) and wait until /info/ answers (200, or 401 when
    authentication is on).

    Raises:
        RuntimeError: with the end of the server log if it does not come up.
    """
    port = free_port()
    # The server imports this checkout's packages (diffkt3d, infer_tasks, train_tasks, monailabel_app)
    # whether or not it is the one installed in the environment.
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_INFER_CONCURRENCY": "1",
                "MONAI_LABEL_SESSION_PATH": str(root / "sessions"), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": python_path, **(env or {})}
    args = [a for k, v in conf.items() for a in ("--conf", k, str(v))]
    log_path = root / f"server-{port}.log"
    # `python -m monailabel.main`, not the `monailabel` wrapper, which runs whatever `python` is on PATH
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["nice", "-n", "15", sys.executable, "-m", "monailabel.main", "start_server",
                                 "--app", str(REPO / "monailabel_app"), "--studies", str(studies),
                                 "--host", "127.0.0.1", "--port", str(port), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code in (200, 401):
                return proc, url
        except requests.ConnectionError:
            time.sleep(1)
    stop_server(proc, signal.SIGKILL)
    raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server's process group (launcher + uvicorn) and wait for it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
