"""README "Server" line, run as written: `monailabel start_server --app monailabel_app --studies sample-data`
(with the environment of docs/server.md and a free `--port`), from a folder laid out like the
repository: `monailabel_app` links to the app, `sample-data` is a copy, so the server's state
(`sample-data/.diffkt3d`) never lands in the repository.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from server_process import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_readme_start_server_command_serves_the_sample_cases(tmp_path: Path) -> None:
    (tmp_path / "monailabel_app").symlink_to(REPO / "monailabel_app")
    shutil.copytree(REPO / "sample-data", tmp_path / "sample-data")
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",  # as after `source .venv/bin/activate`
           "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_INFER_CONCURRENCY": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["monailabel", "start_server", "--app", "monailabel_app", "--studies", "sample-data", "--port", str(port)]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        info = None
        while time.time() < deadline and proc.poll() is None:
            try:
                r = requests.get(f"{url}/info/", timeout=5)
                if r.status_code == 200:
                    info = r.json()
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        assert info is not None, f"server did not start:\n{log_path.read_text()[-3000:]}"
        assert info["datastore"]["total"] == 3  # pt_201, pt_202, pt_205 (dicom/ is not a case folder)
        assert info["diffkt3d"]["model_version"].startswith("cpu-default@")
        assert {"dose", "impute_ct", "impute_ptv", "impute_oar"} <= set(info["models"])
        r = requests.post(f"{url}/infer/dose", params={"image": "pt_202", "output": "json"},
                          data={"params": '{"preview": true}'}, timeout=900)
        assert r.status_code == 200, r.text[:500]
        assert r.json()["scorecard"]["total"] >= 0
        assert (tmp_path / "sample-data" / ".diffkt3d").is_dir()  # state beside the studies, as documented
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
