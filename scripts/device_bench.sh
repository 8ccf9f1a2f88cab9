#!/usr/bin/env bash
# Everything the GPU issue measures, in one call on a lent GPU machine.
#   REFERENCE=path/to/LLaDA/generate.py bash scripts/device_bench.sh
# Writes logs and tables under $OUT (or ./bench-out). The device image has
# torch, triton and transformers; carry wheels for gguf, tokenizers,
# safetensors, faster-whisper, piper-tts, webrtcvad-wheels and websockets
# (see the device tool's README) for the default model and the voice bench.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
ref=${REFERENCE:+--reference $REFERENCE}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -m pytest tests/test_kernels.py tests/test_engine.py -q 2>&1 | tee "$out/tests.log"
python3 -m kernels.bench 2>&1 | tee "$out/kernels_bench.txt"
python3 -m dllm.bench --device cuda --canvas 64 256 --batch 1 16 $ref 2>&1 | tee "$out/dllm_default.txt"
python3 -m dllm.bench --device cuda --model llada-8b --canvas 64 256 --batch 1 16 $ref 2>&1 | tee "$out/dllm_llada8b.txt"
python3 -m voice.bench --n 10 --device cuda 2>&1 | tee "$out/voice_bench.txt"
