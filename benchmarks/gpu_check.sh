#!/usr/bin/env bash
# benchmarks/gpu_check.py with what a lent device run needs: unbuffered output,
# the repo on PYTHONPATH, an 8-minute cap (the check's budget), and the JSON
# and the log written under $OUT (the device tool's folder that comes back)
# or the current folder. Extra arguments go to the script, e.g.
#   benchmarks/gpu_check.sh --install        benchmarks/gpu_check.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout "${GPU_CHECK_TIMEOUT:-480}" "${PYTHON:-python3}" benchmarks/gpu_check.py \
    --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
