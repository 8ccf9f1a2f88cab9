#!/bin/sh
# The long CPU run: LoRA adaptation of SmolLM2-135M into the voice-turn diffusion model.
# One thread by default: on a CPU shared with other jobs two OpenMP threads stall each other
# (measured: 3.4 s a step alone, 15-21 s shared; set THREADS=2 on an idle machine).
# Survives the shell that starts it; resumes from runs/voice-v1 if started again.
set -e
cd "$(dirname "$0")/.."
mkdir -p runs/voice-v1
RESUME=""
[ -f runs/voice-v1/state.pt ] && RESUME="--resume"
PYTHONPATH=. setsid nohup python -m dllm.train --data data/train.jsonl --run runs/voice-v1 \
  --steps 1200 --batch 4 --lr 4e-4 --warmup 40 --rank 16 --alpha 32 --save-every 100 \
  --threads "${THREADS:-1}" --copy-to dllm/adapters/voice-smollm2 $RESUME > runs/voice-v1/stdout.log 2>&1 < /dev/null &
echo "started: tail -f runs/voice-v1/train.log"
