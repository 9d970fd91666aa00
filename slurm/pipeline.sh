#!/bin/bash
# Submit the whole pipeline as a chain of Slurm jobs; each starts only when the one before it
# succeeded (--dependency=afterok). Run it on the login node (not with sbatch). Guide: docs/slurm.md.
#
#   slurm/pipeline.sh [options] RECIPE_DIR
#
# RECIPE_DIR (relative: from the current directory, else from the project) holds the stage
# recipes: preprocess.yaml, pretrain.yaml, finetune.yaml, evaluate.yaml. Each one present is a
# stage, in that order; then export publishes the output of the last training stage
# (finetune, else pretrain) as a Hugging Face model.
# Prints one "STAGE JOBID" line per job. A failing stage cancels the jobs after it.
#
# Options (quote multi-word values):
#   --stages a,b,...         run these stages only, in this order (preprocess pretrain finetune evaluate export)
#   --sbatch "ARGS"          sbatch options for every job, e.g. "-p gpu -A myproject"
#   --sbatch-STAGE "ARGS"    sbatch options for one stage, e.g. --sbatch-pretrain "--nodes=4 -t 2-00:00:00"
#   --STAGE "k=v ..."        overrides for one stage's recipe; for export: export.py options
#                            (default "--checkpoint <last training output> --output <it>/export")
#   --after JOBID            the first job also waits for JOBID to succeed
#   --dry-run                print the sbatch commands instead of submitting
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STAGES=(preprocess pretrain finetune evaluate export)
declare -A SBATCH_STAGE=() OVERRIDES=()
SBATCH_ALL="" AFTER="" DRY=0 ONLY="" RECIPES=""

die() { echo "pipeline.sh: error: $*" >&2; exit 2; }
is_stage() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }

while [ $# -gt 0 ]; do
    case $1 in
    --stages) ONLY=$2; shift 2 ;;
    --sbatch) SBATCH_ALL=$2; shift 2 ;;
    --sbatch-*) is_stage "${1#--sbatch-}" || die "unknown stage in $1"; SBATCH_STAGE[${1#--sbatch-}]=$2; shift 2 ;;
    --after) AFTER=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*) is_stage "${1#--}" || die "unknown option $1 (see --help)"; OVERRIDES[${1#--}]=$2; shift 2 ;;
    *) [ -z "$RECIPES" ] || die "one RECIPE_DIR only (got $RECIPES and $1)"; RECIPES=$1; shift ;;
    esac
done
[ -n "$RECIPES" ] || die "give the recipe directory, e.g. slurm/pipeline.sh configs/sample (see --help)"
# Resolved as the batch scripts resolve a recipe: from here, else from the project.
if [ ! -d "$RECIPES" ] && [[ $RECIPES != /* ]] && [ -d "$ROOT/$RECIPES" ]; then RECIPES=$ROOT/$RECIPES; fi
[ -d "$RECIPES" ] || die "recipe directory $RECIPES not found (in $(pwd), nor in the project $ROOT)"
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node"

if [ -n "$ONLY" ]; then
    IFS=, read -r -a CHAIN <<<"$ONLY"
    for s in "${CHAIN[@]}"; do is_stage "$s" || die "unknown stage '$s' in --stages (${STAGES[*]})"; done
else
    CHAIN=()
    for s in preprocess pretrain finetune evaluate; do [ -f "$RECIPES/$s.yaml" ] && CHAIN+=("$s"); done
    [ -f "$RECIPES/pretrain.yaml" ] || [ -f "$RECIPES/finetune.yaml" ] && CHAIN+=(export)
fi
[ ${#CHAIN[@]} -gt 0 ] || die "no stage recipe (preprocess.yaml, pretrain.yaml, finetune.yaml, evaluate.yaml) in $RECIPES"

# export: what the last training stage writes (`output` of its recipe or overrides), unless given.
if [[ " ${CHAIN[*]} " == *" export "* ]] && [ -z "${OVERRIDES[export]:-}" ]; then
    train=""
    for s in pretrain finetune; do [[ " ${CHAIN[*]} " == *" $s "* ]] && train=$s; done
    [ -n "$train" ] || die "export needs --export \"--checkpoint RUN --output DIR\" when no training stage is in the chain"
    # Read, not resolved by the stage (that checks paths the chain has not made yet).
    # shellcheck disable=SC2086  # overrides are words on purpose
    out=$("${PIPELINE_PYTHON:-python3}" - "$RECIPES/$train.yaml" ${OVERRIDES[$train]:-} <<'PY'
import sys, yaml
out = (yaml.safe_load(open(sys.argv[1])) or {}).get("output") if __import__("os").path.exists(sys.argv[1]) else None
for item in sys.argv[2:]:
    key, _, value = item.partition("=")
    if key.strip() == "output":
        out = yaml.safe_load(value)
print(out or "")
PY
) || die "cannot read the $train recipe (message above)"
    [ -n "$out" ] || die "the $train recipe sets no output; set it, or pass --export \"--checkpoint RUN --output DIR\""
    OVERRIDES[export]="--checkpoint $out --output $out/export"
fi

mkdir -p logs  # the jobs' --output=logs/%x-%j.out: Slurm does not create directories
prev=$AFTER
for s in "${CHAIN[@]}"; do
    args=(--parsable --kill-on-invalid-dep=yes)
    [ -z "$prev" ] || args+=(--dependency=afterok:"$prev")
    # shellcheck disable=SC2206  # sbatch options and overrides are words on purpose
    args+=($SBATCH_ALL ${SBATCH_STAGE[$s]:-} "$ROOT/slurm/$s.sh")
    [ "$s" = export ] || [ ! -f "$RECIPES/$s.yaml" ] || args+=("$RECIPES/$s.yaml")
    # shellcheck disable=SC2206
    args+=(${OVERRIDES[$s]:-})
    if [ "$DRY" = 1 ]; then
        echo "sbatch ${args[*]}"
        prev="<$s>"
        continue
    fi
    id=$(PIPELINE_ROOT=$ROOT sbatch "${args[@]}") || die "sbatch refused the $s job (message above); jobs already submitted: ${prev:-none}"
    id=${id%%;*}
    echo "$s $id"
    prev=$id
done
[ "$DRY" = 1 ] || echo "watch: squeue -u ${USER:-$(id -un)}; logs: logs/<stage>-<jobid>.out" >&2
