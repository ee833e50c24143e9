#!/usr/bin/env bash
# GPU figures in one run (about 5-8 minutes on an H100/H200-class GPU); one ratio per line.
#
#   bash bench/gpu.sh                 # on a CUDA machine (the device tool: run 'bash bench/gpu.sh')
#   TINY=1 bash bench/gpu.sh          # the same benches at tiny size on the CPU (tests/test_benches.py)
#
# 1. SAE training at d_in 896 / d_sae 16384 / k 64, batch 4096, bf16 autocast: saediff against
#    SAELens and sparsify in the same run (bench/sae_train.py; targets >= 2x SAELens tokens/s and
#    >= 3M tokens/s), then saediff's sparse vs dense decode, eager and compiled (bench/sae_decode.py);
# 2. BLOCK-EM on a random Qwen2.5-0.5B-shaped model in bf16: per-step overhead and peak memory
#    against a plain step, base codes per step and cached, and a whole sweep against 5 plain runs
#    (bench/blocking_overhead.py);
# 3. the streaming diff of a random 0.5B-shaped pair: peak GPU memory at 25k vs 100k answer
#    tokens and throughput against two plain forwards (bench/diff_memory.py);
# 4. the model side at bf16 autocast against fp32 in the same run: pair scoring, collection, a
#    rank-1 LoRA step (also over a bf16 base) and a full step, on a random Qwen2-shaped chat model
#    (d_model 896, 24 blocks; a GPU has no SmolLM2) (bench/model_side.py).
# Full logs go to $OUT (the device tool's output folder) or bench/gpu_logs/.
set -euo pipefail
cd "$(dirname "$0")"
LOGS=${OUT:-gpu_logs}
mkdir -p "$LOGS"
if [[ "${TINY:-0}" == 1 ]]; then
  DEV="--device cpu"
  SAE="--d-in 32 --d-sae 128 --k 8 --batch 128 --steps 8 --eval-every 4 --repeats 1"
  DEC="--d-in 32 --d-sae 256 --k 8 --batch 128 --steps 3 --repeats 1"
  COMPILE=""
  BLOCK="--shape tiny --seq 32 --batch 2 --steps 4 --warmup 1 --repeats 1 --rows 8 --epochs 1 --d-sae 256 --latents 4"
  DIFF="--tokens 192 --d-model 64 --d-mlp 128 --layers 2 --d-sae 256 --repeats 1"
  MODEL="--random 32,2 --repeats 1 --pairs 2 --convs 4 --batch 2 --seq 160"
else
  DEV="--device cuda"
  SAE="--d-in 896 --d-sae 16384 --k 64 --batch 4096 --steps 300 --eval-every 25 --repeats 3 --autocast"
  DEC="--d-in 896 --d-sae 16384 --k 64 --batch 4096 --steps 100 --repeats 3 --autocast"
  COMPILE="--compile"
  BLOCK="--shape 0.5b --seq 256 --batch 8 --steps 30 --repeats 2 --rows 64 --epochs 3"
  DIFF="--tokens 25000 --d-model 896 --d-mlp 4864 --layers 24 --vocab 151936 --batch 32 --repeats 1"
  MODEL="--random 896,24 --repeats 3 --pairs 64 --convs 128 --batch 8 --seq 256"
fi
ratios() {  # the bench's 'name: X' lines, prefixed with the bench
  grep -E '^[a-z0-9_]+: [0-9.inf-]+$' "$LOGS/$1.log" | sed "s/^/$1./"
}
python sae_train.py $SAE $DEV > "$LOGS/sae_train.log" 2>&1 || { tail -20 "$LOGS/sae_train.log"; exit 1; }
grep -E '^repeat 0|^data ' "$LOGS/sae_train.log"
ratios sae_train
python sae_decode.py $DEC $DEV > "$LOGS/sae_decode.log" 2>&1 || { tail -20 "$LOGS/sae_decode.log"; exit 1; }
head -n -1 "$LOGS/sae_decode.log" | tail -1
ratios sae_decode
if [[ -n "$COMPILE" ]]; then
  python sae_decode.py $DEC $DEV $COMPILE > "$LOGS/sae_decode_compile.log" 2>&1 || tail -5 "$LOGS/sae_decode_compile.log"
  head -n -1 "$LOGS/sae_decode_compile.log" | tail -1 || true
  ratios sae_decode_compile || true
fi
python blocking_overhead.py $BLOCK $DEV > "$LOGS/blocking_overhead.log" 2>&1 || { tail -20 "$LOGS/blocking_overhead.log"; exit 1; }
grep -E 'ms/step|s \(5 runs' "$LOGS/blocking_overhead.log"
ratios blocking_overhead
python diff_memory.py $DIFF $DEV > "$LOGS/diff_memory.log" 2>&1 || { tail -20 "$LOGS/diff_memory.log"; exit 1; }
grep -E 'response tokens' "$LOGS/diff_memory.log"
ratios diff_memory
python model_side.py $MODEL $DEV --no-layout > "$LOGS/model_side.log" 2>&1 || { tail -20 "$LOGS/model_side.log"; exit 1; }
grep -E '^(cpu|cuda) |: fp32 ' "$LOGS/model_side.log"
ratios model_side
