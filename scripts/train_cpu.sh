#!/bin/sh
# The long CPU run of the voice dLLM (round two): LoRA on SmolLM2-135M, warm-started
# from the first adapter, length-bucketed batches of up to 16 examples / 1600 tokens,
# both cores, float32 on CPUs without bf16 units. Survives the shell that starts it and
# resumes from runs/voice-v2 (adapter + optimizer + step, committed) when started again.
# Pause it while benchmarking: kill -STOP <pid>, then kill -CONT <pid>.
set -e
cd "$(dirname "$0")/.."
[ -f data/train.jsonl ] || python -m dllm.training.data --out data/ --seed 0
mkdir -p runs/voice-v2
if [ -f runs/voice-v2/state.pt ]; then START="--resume"; else START="--init-adapter dllm/adapters/voice-smollm2"; fi
OMP_WAIT_POLICY=PASSIVE setsid nohup python -m dllm.training.train --data data/train.jsonl --run runs/voice-v2 \
  --steps 12000 --batch 16 --batch-tokens 1600 --lr 3e-4 --warmup 50 --save-every 50 \
  --threads "${THREADS:-2}" $START > runs/voice-v2/stdout.log 2>&1 < /dev/null &
echo "started: tail -f runs/voice-v2/train.log"
