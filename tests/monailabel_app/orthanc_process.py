"""Start/stop a real Orthanc (Debian packages `orthanc`, `orthanc-dicomweb`) for tests (no fixtures here).

Each call starts its own Orthanc on free ports with a temporary storage folder and a generated JSON
configuration (never the system service), optionally with HTTP basic auth, and uploads studies
over STOW-RS. `scripts/setup_env.sh test` installs the packages; without them the PACS tests are
skipped, except in CI (`CI` set), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from server_process import free_port

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)),
                                           None)


def dicomweb_plugin() -> str | None:
    for folder in PLUGIN_DIRS:
        found = sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []
        if found:
            return str(found[0])
    return None


def require_orthanc() -> tuple[str, str]:
    """(binary, DICOMweb plugin) or skip (fail in CI) naming what is missing and how to install it."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary and plugin:
        return binary, plugin
    missing = "Orthanc" if not binary else "its DICOMweb plugin"
    reason = (f"{missing} is not installed (scripts/setup_env.sh test installs it as root: "
              "apt-get install orthanc orthanc-dicomweb)")
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


class Orthanc:
    """One Orthanc process; `url` is its HTTP root, `dicomweb` its DICOMweb root."""

    def __init__(self, root: Path, users: dict[str, str] | None = None, timeout_s: float = 60.0):
        binary, plugin = require_orthanc()
        self.root = root
        self.users = users or {}
        port = free_port()
        storage = root / "orthanc-db"
        storage.mkdir(parents=True, exist_ok=True)
        config = {"Name": "diffkt3d-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
                  "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": bool(self.users), "RegisteredUsers": self.users,
                  "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                  "StableAge": 1, "HttpTimeout": 120}
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.log = root / "orthanc.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=root)
        self.url = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.url}/dicom-web"
        deadline = time.time() + timeout_s
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Orthanc did not start:\n{self.log.read_text()[-3000:]}")

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items()), None)

    def client(self):
        from dicomweb_client import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(*self.auth) if self.auth else None
        return DICOMwebClient(self.dicomweb, session=session)

    def upload(self, datasets: list[pydicom.Dataset]) -> None:
        self.client().store_instances(datasets)

    def upload_folder(self, folder: Path) -> list[pydicom.Dataset]:
        datasets = [pydicom.dcmread(str(p)) for p in sorted(folder.glob("*.dcm"))]
        self.upload(datasets)
        return datasets

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
