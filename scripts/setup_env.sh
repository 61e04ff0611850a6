#!/usr/bin/env bash
# Create/refresh the project venv (.venv) from the project's own files; idempotent and quick when
# nothing changed. Usage: scripts/setup_env.sh [demo|test]
#   demo: the package + the lean MONAI Label server set (what quick-start command 1 needs)
#   test: demo + dev tools and test references (pytest, ruff, slicer-core, pymedphys, ...) + transfer
#         extras (diffusers, peft)
# torch is the CPU build 2.13.0 pinned in pyproject.toml (a bare `torch` would pull a multi-GB CUDA
# build); GPU nodes: see docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-demo}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
extras=""
[ "$profile" = "test" ] && extras="[dev,transfer]"
# The PACS tests start their own Orthanc (Debian packages orthanc + orthanc-dicomweb; docs/pacs.md).
orthanc_missing() {
  if { command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } \
      && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1; then
    return 1
  fi
  return 0
}
if [ "$profile" = "test" ] && orthanc_missing; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Orthanc and its DICOMweb plugin (apt-get) for the PACS tests"
    # the package's own service is not used (tests start Orthanc on free ports); no restart in containers
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends orthanc orthanc-dicomweb >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends orthanc orthanc-dicomweb >/dev/null; }
  else
    echo "[setup] Orthanc is not installed and this is not root: the PACS tests will be skipped" \
         "(sudo apt-get install orthanc orthanc-dicomweb)"
  fi
fi
stamp=".venv/.diffkt3d-setup-$profile"
digest=$(cat pyproject.toml requirements-server.txt requirements-server-nodeps.txt | sha1sum | cut -c1-12)
for done_stamp in "$stamp" .venv/.diffkt3d-setup-test; do   # the test profile includes demo
  if [ -f "$done_stamp" ] && [ "$(cat "$done_stamp")" = "$digest" ]; then
    echo "[setup] .venv is up to date ($profile)"
    exit 0
  fi
done
echo "[setup] installing DiffKT3D ($profile profile) into .venv -- the first run takes a few minutes"
.venv/bin/python -m pip install --upgrade --progress-bar on pip >/dev/null
.venv/bin/python -m pip install --progress-bar on "torch==2.13.0"
.venv/bin/python -m pip install --progress-bar on -e ".$extras"
echo "[setup] installing the lean MONAI Label server set (requirements-server*.txt)"
.venv/bin/python -m pip install --progress-bar on -r requirements-server.txt
.venv/bin/python -m pip install --progress-bar on --no-deps -r requirements-server-nodeps.txt
echo "$digest" > "$stamp"
echo "[setup] done"
