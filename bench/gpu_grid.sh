#!/usr/bin/env bash
# The GLUE grid on one GPU in about ten minutes: full and half data (the paper's protocol) on all
# four tasks with standard, guided, random_order and guided_unit over seeds 0-4, and the quick
# protocol's guided_unit pairing on STS-B and MRPC, in worker processes sharing the GPU.
#
#   python bench/gpu_carry.py                 # here, once: bench/carry/ (MiniLM fp16 + profile)
#   bench/gpu_grid.sh OUTDIR                  # there: JSONL files under OUTDIR
#
# Runs in priority order (what the study needs first): full-data STS-B and MRPC, then the quick
# guided_unit pairing, then half data on STS-B and MRPC, then CoLA and RTE. Every phase shares one
# deadline (GD_DEADLINE seconds from the start, default 420): after it no new run starts, runs
# going finish, and rerunning the same command resumes what is left. On a CPU, GD_DEVICE=cpu and
# GD_SMOKE=1 run the same script on the tiny random model (what the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_grid.sh OUTDIR [extra bench/glue.py flags]}
shift
mkdir -p "$out"
py=${PYTHON:-}
if [ -z "$py" ]; then  # the first interpreter that has torch
  for cand in python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import torch' 2>/dev/null; then py=$cand; break; fi
  done
fi
[ -n "$py" ] || { echo "gpu_grid.sh: no python with torch found; set PYTHON=..." >&2; exit 2; }
device=${GD_DEVICE:-cuda}
jobs=${GD_JOBS:-8}
deadline=${GD_DEADLINE:-420}
started=$(date +%s)
export GD_MINILM_PATH=${GD_MINILM_PATH:-$PWD/bench/carry/minilm-fp16}
if [ -z "${GD_DATA_DIR:-}" ] && [ ! -d ../shared/data/glue ] && [ -d bench/carry/data/glue ]; then
  export GD_DATA_DIR=$PWD/bench/carry/data  # ../shared does not travel to a lent machine
fi
export GD_COMMIT=${GD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
common=(--device "$device" --jobs "$jobs" --deadline "$deadline" --started "$started")
if [ -n "${GD_SMOKE:-}" ]; then
  unset GD_MINILM_PATH
  common+=(--smoke --seeds 0)
  methods_full=standard,guided_unit
else
  common+=(--profile bench/carry/minilm-wikitext2-contrastive-512x128.profile.npz --seeds 0-4)
  methods_full=standard,guided,random_order,guided_unit
fi
"$py" --version  # each bench/glue.py call logs its torch, transformers and CUDA availability
run() { echo "== $*"; "$py" bench/glue.py "${common[@]}" "$@"; }
run --tasks STS-B,MRPC --settings full --methods "$methods_full" --out "$out/glue-gpu.jsonl" "$@"
run --quick --jobs "$jobs" --tasks STS-B,MRPC --methods standard,guided,guided_unit \
  --out "$out/glue-gpu-quick.jsonl" "$@"
run --tasks STS-B,MRPC --settings half --methods "$methods_full" --out "$out/glue-gpu.jsonl" "$@"
run --tasks CoLA,RTE --settings full,half --methods "$methods_full" --out "$out/glue-gpu.jsonl" "$@"
echo "done in $(( $(date +%s) - started )) s"
