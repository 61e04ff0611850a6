#!/usr/bin/env bash
# Quick start: install, start the MONAI Label server on the sample data with the shipped model,
# predict a dose through the HTTP API as 3D Slicer would, print the Scorecard and write the dose,
# a DVH plot and a dose overlay into demo-output/. `--keep-server` leaves the server running for
# Slicer. PORT=8123 scripts/quickstart.sh picks another port.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep-server" ] && keep=1
scripts/setup_env.sh demo
PORT="${PORT:-8000}"
if .venv/bin/python -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $PORT)) != 0)"; then
  PORT=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  echo "[quickstart] port 8000 is busy; using $PORT"
fi
mkdir -p demo-output
rm -rf demo-output/studies && mkdir -p demo-output/studies
cp -r sample-data/pt_* demo-output/studies/   # the server writes its state beside the studies
export MONAI_LABEL_TRACKING_ENABLED=false MONAI_LABEL_INFER_CONCURRENCY=1
# the monailabel launcher runs the first `python` on PATH: make it the venv's
export PATH="$PWD/.venv/bin:$PATH"
echo "[quickstart] starting the MONAI Label server on http://127.0.0.1:$PORT (log: demo-output/server.log)"
.venv/bin/monailabel start_server --app monailabel_app --studies demo-output/studies --port "$PORT" \
  > demo-output/server.log 2>&1 &
server=$!
cleanup() { if [ "$keep" = 0 ] && kill -0 "$server" 2>/dev/null; then kill "$server"; wait "$server" 2>/dev/null || true; fi; }
trap cleanup EXIT
printf "[quickstart] waiting for the server"
for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$PORT/info/" >/dev/null 2>&1; then echo " ready"; break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo; echo "[quickstart] the server exited:"; tail -n 20 demo-output/server.log; exit 1; fi
  printf "."; sleep 1
done
curl -sf "http://127.0.0.1:$PORT/info/" >/dev/null || { echo; echo "[quickstart] server not ready after 180 s"; exit 1; }
.venv/bin/python scripts/demo.py --server "http://127.0.0.1:$PORT" --case sample-data/pt_201 --out demo-output
cat <<MSG

Connect from 3D Slicer: add slicer_extension/DiffKT3D to Edit > Application Settings > Modules >
Additional module paths, restart Slicer, open the DiffKT3D module and set the server URL to
http://127.0.0.1:$PORT (start it with: scripts/quickstart.sh --keep-server). See docs/slicer.md.
MSG
if [ "$keep" = 1 ]; then
  echo "[quickstart] server running (pid $server); Ctrl-C to stop"
  trap - EXIT
  wait "$server"
fi
