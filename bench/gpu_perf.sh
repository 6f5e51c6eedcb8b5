#!/usr/bin/env bash
# Guided dropout's cost on one GPU in under five minutes (issue 27): the guided/standard step-time
# ratio at site and unit level (MiniLM, batch 32, length 128, float32 and bfloat16 autocast),
# profile() per sample against a training step and the floor, and apply(model) with an empty cache.
#
#   python bench/gpu_carry.py                 # here, once: bench/carry/ (MiniLM fp16 + profile)
#   bench/gpu_perf.sh [OUTDIR]                # there: appends to OUTDIR/gpu-perf.jsonl
#   bench/gpu_perf.sh --smoke [OUTDIR]        # on a CPU: the tiny random model, seconds
#
# OUTDIR defaults to bench/results. GD_DEADLINE (seconds, default 270) bounds all sections: one
# that would start later is recorded as skipped. Extra flags after OUTDIR go to bench/gpu_perf.py.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
if [ "${1:-}" = "--smoke" ]; then smoke=(--smoke); shift; fi
out=${1:-bench/results}
[ $# -gt 0 ] && shift
mkdir -p "$out"
py=${PYTHON:-}
if [ -z "$py" ]; then  # the first interpreter that has torch
  for cand in python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import torch' 2>/dev/null; then py=$cand; break; fi
  done
fi
[ -n "$py" ] || { echo "gpu_perf.sh: no python with torch found; set PYTHON=..." >&2; exit 2; }
if [ ${#smoke[@]} -eq 0 ] && [ -d bench/carry/minilm-fp16 ]; then
  export GD_MINILM_PATH=${GD_MINILM_PATH:-$PWD/bench/carry/minilm-fp16}
fi
export GD_COMMIT=${GD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
started=$(date +%s)
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
"$py" bench/gpu_perf.py "${smoke[@]}" --out "$out" --deadline "${GD_DEADLINE:-270}" "$@"
echo "done in $(( $(date +%s) - started )) s"
