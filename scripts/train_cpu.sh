#!/bin/sh
# The long CPU run of the voice dLLM: LoRA on SmolLM2-135M, warm-started from the shipped
# adapter (the GPU run's), length-bucketed batches of up to 16 examples / 1600 tokens,
# both cores, float32 on CPUs without bf16 units. Survives the shell that starts it and
# resumes from $RUN (adapter + optimizer + step; commit it) when started again.
# runs/voice-v2 is the older CPU run, behind the shipped adapter: do not resume it.
# Pause it while benchmarking: kill -STOP <pid>, then kill -CONT <pid>.
set -e
cd "$(dirname "$0")/.."
[ -f data/train.jsonl ] || python -m dllm.training.data --out data/ --seed 0
RUN=${RUN:-runs/voice-v3}
mkdir -p "$RUN"
if [ -f "$RUN/state.pt" ]; then START="--resume"; else START="--init-adapter dllm/adapters/voice-smollm2"; fi
OMP_WAIT_POLICY=PASSIVE setsid nohup python -m dllm.training.train --data data/train.jsonl --run "$RUN" \
  --steps 12000 --batch 16 --batch-tokens 1600 --lr 3e-4 --warmup 50 --save-every 50 \
  --threads "${THREADS:-2}" $START > "$RUN/stdout.log" 2>&1 < /dev/null &
echo "started: tail -f $RUN/train.log"
