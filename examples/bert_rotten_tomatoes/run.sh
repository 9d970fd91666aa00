#!/usr/bin/env bash
# The seed example, end to end: BERT + linear head on Rotten Tomatoes reviews, 2 CPU ranks, ZeRO-3.
#
#   bash examples/bert_rotten_tomatoes/run.sh [finetune key=value ...]
#
# prepare -> evaluate the base classifier ("before") -> fine-tune (deepspeed, 2 ranks, ZeRO-3)
# -> export -> evaluate the export against the base ("after" vs "before") -> print the figures.
#
# Environment (all optional):
#   WORK=outputs/examples/bert_rt   where everything is written (recipes' paths are overridden to it)
#   TRAIN_SIZE=3000 TEST_SIZE=0     reviews kept for training / testing (0: all the held-out movies' reviews)
#   RANKS=2                         deepspeed ranks (CPU processes here)
#   PIPELINE_CACHE                  cache root of the downloaded wheels (default ~/.cache/pipeline)
#   FRESH=1                         delete WORK's fine-tune, export and evaluations first (else: resume / reuse)
# Extra arguments are overrides of the fine-tune recipe, e.g. train.max_steps=12.
# Exit codes: 0 done, 2 the package index is unreachable or a stage refused its input, else the failing stage's.
set -euo pipefail

cd "$(dirname "$0")/../.."
HERE=examples/bert_rotten_tomatoes
WORK=${WORK:-outputs/examples/bert_rt}
TRAIN_SIZE=${TRAIN_SIZE:-3000}
TEST_SIZE=${TEST_SIZE:-0}
RANKS=${RANKS:-2}
PY=${PYTHON:-python}
CORES=$(nproc)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${FRESH:-0}" == 1 ]]; then
  rm -rf "$WORK/finetune" "$WORK/export" "$WORK/eval_base" "$WORK/eval"
fi
declare -A SECS
stage() {  # stage NAME CMD...: run, time, stop the script on failure
  local name=$1; shift
  echo "=== $name: $*"
  local t0; t0=$(date +%s.%N)
  "$@"
  SECS[$name]=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  echo "=== $name: ${SECS[$name]} s"
}

# 1. Data and the base classifier (BERT + a seeded fresh head). Exit code 2: no package index.
stage prepare "$PY" "$HERE/prepare.py" --work "$WORK" --train-size "$TRAIN_SIZE" --test-size "$TEST_SIZE"

EVAL=(--config "$HERE/evaluate.yaml" "data=$WORK/test.jsonl" overwrite=true)
# 2. Before: the base classifier alone (one process, every core).
stage eval_base env OMP_NUM_THREADS="$CORES" "$PY" launch/evaluate.py "${EVAL[@]}" \
  "model=$WORK/base" name=base compare_to= "output=$WORK/eval_base"

# 3. Fine-tune on RANKS CPU processes under ZeRO-3 (one thread each: the ranks share the cores).
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stage finetune env OMP_NUM_THREADS=$(( CORES / RANKS > 0 ? CORES / RANKS : 1 )) \
  deepspeed --num_gpus "$RANKS" --master_port "$PORT" launch/finetune.py --config "$HERE/finetune.yaml" \
  "output=$WORK/finetune" "model.path=$WORK/base" "classification.train=$WORK/train.jsonl" "$@"

# 4. Consolidate the ZeRO-3 shards into a verified Hugging Face directory.
stage export env OMP_NUM_THREADS="$CORES" "$PY" launch/export.py --checkpoint "$WORK/finetune" --output "$WORK/export" --overwrite

# 5. After vs before on the same held-out reviews.
stage eval env OMP_NUM_THREADS="$CORES" "$PY" launch/evaluate.py "${EVAL[@]}" \
  "model=$WORK/export" "compare_to=$WORK/base" "output=$WORK/eval"

# 6. The figures (also written to $WORK/summary.json).
"$PY" - "$WORK" "$CORES" "$RANKS" "${SECS[prepare]}" "${SECS[eval_base]}" "${SECS[finetune]}" "${SECS[export]}" "${SECS[eval]}" <<'EOF'
import json, sys
from pathlib import Path

work, cores, ranks = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
secs = dict(zip(["prepare", "eval_base", "finetune", "export", "eval"], map(float, sys.argv[4:])))
report = json.loads((work / "eval" / "report.json").read_text())
before_alone = json.loads((work / "eval_base" / "report.json").read_text())["models"][0]["metrics"]
after, before = (m["metrics"] for m in report["models"])
prep = json.loads((work / "prepare.json").read_text())
losses = json.loads((work / "finetune" / "losses.json").read_text())["losses"]
summary = {
    "train_examples": prep["train"]["examples"], "test_examples": after["examples"],
    "before": {k: before[k] for k in ("accuracy", "macro_f1")}, "after": {k: after[k] for k in ("accuracy", "macro_f1")},
    "before_evaluated_alone": {k: before_alone[k] for k in ("accuracy", "macro_f1")},
    "majority_class_accuracy": max(prep["test"].get(l, 0) for l in ("fresh", "rotten")) / prep["test"]["examples"],
    "steps": len(losses), "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
    "seconds": {**secs, "total": round(sum(secs.values()), 1)}, "cores": cores, "ranks": ranks,
}
(work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\nBERT on Rotten Tomatoes: {summary['train_examples']} train reviews, {summary['test_examples']} test reviews "
      f"(movies not seen in training), {summary['steps']} steps on {ranks} ranks / {cores} cores")
print(f"  accuracy before {before['accuracy']:.4f}  after {after['accuracy']:.4f}  "
      f"(majority class {summary['majority_class_accuracy']:.4f})")
print(f"  macro-F1 before {before['macro_f1']:.4f}  after {after['macro_f1']:.4f}")
print("  wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()))
EOF
