#!/usr/bin/env bash
# Run the full test suite (unit + integration with a real MONAI Label server + Slicer logic on a
# real MRML scene). Installs the test profile into .venv first. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
export MONAI_LABEL_TRACKING_ENABLED=false
.venv/bin/ruff check diffkt3d monailabel_app infer_tasks train_tasks slicer_extension tests benchmarks scripts
exec .venv/bin/python -m pytest "$@"
