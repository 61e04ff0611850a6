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
