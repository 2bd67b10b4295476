#!/usr/bin/env bash
# The accelerator measurements of docs/performance.md, prepared as two runs of under 10 minutes
# each for a lent GPU (one H100 or H200; 15 minutes of device time in all, start included):
#   a  pallas_gpu compiled by Triton and checked against float32 xla, the attention
#      implementations' speed and memory at 2048 and 8192 positions, and Gemma-2-2B training
#      throughput against the PyTorch peer at 2048 positions (auto, then pallas_gpu without the
#      peer);
#   b  Gemma-2-2B at 4096 and 8192 positions (does 8192 fit?) and the NUCL overhead.
#   smoke  every step of a and b on tiny shapes on whatever backend is present (a 2-core CPU: about
#      a minute), to check this script, not to measure.
#
# Usage, from the repository root:  bash benchmarks/gpu_session.sh a|b|smoke
# Writes $OUT (default /tmp/gpu_session): log.txt with every step's output and one JSON per step.
# Each step has its own time limit; a step that fails or times out is logged and the next runs.
# On a GPU machine with jax, flax, optax, orbax, torch and transformers but no package index, put
# gin-config's wheel in .whl first (docs/performance.md gives the command): this script installs
# the wheels it finds there.
set -uo pipefail
part="${1:-}"
case "$part" in a|b|smoke) ;; *) echo "usage: $0 a|b|smoke" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_session_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/gpu_session_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, go on whatever happens
  local name=$1 limit=$2 rc
  shift 2
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S)): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc$([ $rc = 124 ] && echo ' (timed out)') at $(date -u +%H:%M:%S)" \
    | tee -a "$LOG"
}

step environment 60 python3 -c "
import platform, jax, flax, optax, maxnucl.train
print('python', platform.python_version(), 'jax', jax.__version__, 'flax', flax.__version__,
      'optax', optax.__version__)
print(jax.devices())"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv >> "$LOG" 2>&1

if [ "$part" = smoke ]; then
  tiny='{"num_layers": 2, "vocab_size": 512, "d_model": 64, "num_heads": 2, "num_kv_heads": 1,
         "head_dim": 32, "query_pre_attn_scalar": 32, "ffn_dim": 128, "sliding_window": 32}'
  step attention 300 python3 benchmarks/attention_check.py --impls xla chunked pallas_gpu \
    --lengths 128 --heads 4 --kv_heads 2 --head_dim 32 --window 48 --repeats 1 \
    --json "$OUT/attention.json"
  step train_auto 300 python3 benchmarks/train_throughput.py --overrides "$tiny" --seq_lens 64 \
    --batches 2 --steps 2 --warmup 1 --remat full --json "$OUT/train_auto.json"
  step nucl_overhead 300 python3 benchmarks/nucl_overhead.py --preset gemma2_tiny --batch 2 \
    --seq_len 64 --steps 2 --warmup 1 --json "$OUT/nucl_overhead.json"
elif [ "$part" = a ]; then
  step attention 150 python3 benchmarks/attention_check.py --impls xla chunked pallas_gpu \
    --lengths 2048 8192 --json "$OUT/attention.json"
  step train_2048_auto 240 python3 benchmarks/train_throughput.py --preset gemma2_2b \
    --overrides '{}' --seq_lens 2048 --batches 4 2 --remat full --attention_impl auto \
    --json "$OUT/train_2048_auto.json"
  step train_2048_pallas_gpu 150 python3 benchmarks/train_throughput.py --preset gemma2_2b \
    --overrides '{}' --seq_lens 2048 --batches 4 --remat full --attention_impl pallas_gpu \
    --no_peer --json "$OUT/train_2048_pallas_gpu.json"
else
  step train_long 300 python3 benchmarks/train_throughput.py --preset gemma2_2b --overrides '{}' \
    --seq_lens 4096 8192 --batches 2 1 --remat full --attention_impl auto --no_peer \
    --json "$OUT/train_long.json"
  step nucl_overhead 240 python3 benchmarks/nucl_overhead.py --preset gemma2_2b --batch 2 \
    --seq_len 2048 --dtype bfloat16 --remat full --steps 10 --warmup 2 --json "$OUT/nucl_overhead.json"
fi
# the figures, without the steps' other output
grep -E "^(device|model|maxnucl |transformers |seq |gemma2| +[0-9]+ )" "$LOG" || true
