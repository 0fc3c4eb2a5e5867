#!/usr/bin/env bash
# Every check that needs a GPU: the gpu-marked tests (bf16 autocast, compiled training, CUDA-graph
# decoding, fused attention kernels), training throughput and MFU for 125m, decoding speed with the
# share of memory bandwidth used, and what a speculative step costs against a plain one on the demo
# model's shape (the step table; random weights, which do not change a step's cost). Figures go to
# BENCHMARKS.md.
#
#   bash benchmarks/gpu_checks.sh [peak bf16 TFLOP/s, default 989 (H100/H200 SXM)] [peak GB/s, default 3350]
#
# STEPS picks the steps (default all: tests,train,decode,steps), so that each can run as its own command
# where one command has a time limit: STEPS=tests bash benchmarks/gpu_checks.sh. A failing step does
# not stop the later ones; the script exits non-zero if any failed.
set -uo pipefail
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || make venv || exit 1  # with CUDA present, the venv reuses the machine's torch
PEAK_TFLOPS=${1:-989}
PEAK_GBS=${2:-3350}
STEPS=${STEPS:-tests,train,decode,steps}
failed=()
step() {  # step NAME COMMAND...: run it if STEPS names it
    [[ ",$STEPS," == *",$1,"* ]] || return 0
    echo "== $1"
    "${@:2}" || failed+=("$1")
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step tests $PY -m pytest -q -m gpu tests/test_gpu.py
step train $PY benchmarks/train_step.py --device cuda --dtype bfloat16 --compile --benchmarks throughput \
    --preset 125m --tp-vocab-size 32000 --tp-seq-len 2048 --tp-batch-size 16 --repeats 20 --peak-tflops "$PEAK_TFLOPS"
step decode $PY benchmarks/decode.py --device cuda --dtype bfloat16 --compile --preset 125m --n-future 4 \
    --head-style linear --vocab-size 32000 --batch-sizes 1,8 --hf-batch-sizes 1,8 --max-new-tokens 128 \
    --repeats 5 --peak-bandwidth-gbs "$PEAK_GBS"
step steps $PY benchmarks/decode.py --device cuda --preset tiny --vocab-size 4096 --n-future 4 \
    --head-style conditioned --batch-sizes 1,8 --max-new-tokens 128 --repeats 5 --no-hf
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
