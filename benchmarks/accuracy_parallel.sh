#!/usr/bin/env bash
# Accuracy sweep on one GPU with several configs at once: one `sparse-llm eval sweep` process per config, at most
# $PARALLEL at a time, each with a KV cache capped at what one task's samples need, so they share the GPU (SmolLM2 is tiny; one eval process leaves
# the GPU mostly idle on the host's Python work). Every process writes DIR/<config>/<task>/summary.json, which
# benchmarks/accuracy_table.py turns into the table of docs/algorithms.md; a process that passes its time limit
# loses only its own rows.
#
#   LENGTH=8150 SAMPLES=20 PARALLEL=6 LIMIT=540 OUTDIR=$OUT/acc/8150 \
#     benchmarks/accuracy_parallel.sh benchmarks/accuracy_configs/dense.yaml benchmarks/accuracy_configs/quest.yaml ...
set -u
TAR_TO=${TAR_TO:-}
SEED=${SEED:-}  # the samples' seed (eval --seed; unset: 0): another seed gives another, held-out set of samples
: "${LENGTH:?set LENGTH}" "${OUTDIR:?set OUTDIR}" "${MODEL:?set MODEL (benchmarks/gpu_env.sh does)}"
SAMPLES=${SAMPLES:-20}; PARALLEL=${PARALLEL:-6}; LIMIT=${LIMIT:-540}; TASKS=${TASKS:-"ruler_niah ruler_niah_multikey"}
MAX_LEN=$(( LENGTH + 256 > 8192 ? 8192 : LENGTH + 256 ))  # SmolLM2 stops at 8192 positions
KV_TOKENS=${KV_TOKENS:-$(( (LENGTH + 300) * SAMPLES ))}  # every sample of a task resident at once, no more
mkdir -p "$OUTDIR"
run_one() {
  local cfg=$1 name; name=$(basename "$cfg" .yaml)
  timeout "$LIMIT" python3 -m sparse_llm.cli eval sweep --model "$MODEL" --device "${DEVICE:-cuda}" --enforce-eager \
    --kv-max-tokens "$KV_TOKENS" --max-model-len "$MAX_LEN" --configs "$cfg" --tasks $TASKS \
    --max-input-length "$LENGTH" --num-samples "$SAMPLES" --no-progress --output-dir "$OUTDIR" ${SEED:+--seed "$SEED"} \
    > "$OUTDIR/log_$name.txt" 2>&1
  echo "$name: exit $? after $SECONDS s" >> "$OUTDIR/exits.txt"
  # TAR_TO: also pack this config's results into one file there (the device tool returns shallow files only)
  if [ -n "${TAR_TO:-}" ] && [ -d "$OUTDIR/$name" ]; then
    tar czf "$TAR_TO/acc_${LENGTH}_$name.tgz" -C "$OUTDIR" "$name" "log_$name.txt"
  fi
}
export -f run_one; export MAX_LEN LENGTH OUTDIR MODEL SAMPLES LIMIT TASKS KV_TOKENS TAR_TO SEED
printf '%s\n' "$@" | xargs -P "$PARALLEL" -I{} bash -c 'run_one "$@"' _ {}
