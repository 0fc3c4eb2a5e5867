#!/usr/bin/env bash
# Every check that needs a GPU, in one short run (about 10 minutes on an H100/H200):
# the gpu-marked tests (bf16 autocast, compiled training, CUDA-graph decoding), training throughput and
# MFU for 125m, and decoding speed with the share of memory bandwidth used. Figures go to BENCHMARKS.md.
#
#   bash benchmarks/gpu_checks.sh [peak bf16 TFLOP/s, default 989 (H100/H200 SXM)] [peak GB/s, default 3350]
set -euo pipefail
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || make venv  # with CUDA present, the venv reuses the machine's torch
PEAK_TFLOPS=${1:-989}
PEAK_GBS=${2:-3350}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -m pytest -q -m gpu tests/test_gpu.py
$PY benchmarks/train_step.py --device cuda --dtype bfloat16 --compile --benchmarks throughput \
    --preset 125m --tp-vocab-size 32000 --tp-seq-len 2048 --tp-batch-size 16 --repeats 20 --peak-tflops "$PEAK_TFLOPS"
$PY benchmarks/decode.py --device cuda --dtype bfloat16 --compile --preset 125m --n-future 4 --head-style linear \
    --vocab-size 32000 --batch-sizes 1,8 --hf-batch-sizes 1,8 --max-new-tokens 128 --repeats 5 \
    --peak-bandwidth-gbs "$PEAK_GBS"
