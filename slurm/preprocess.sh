#!/bin/bash
# Preprocess corpora into token shards (launch/preprocess.py), split across the tasks of this
# one job: tokenizer in one task, shards in every task, merge in one task. Guide: docs/slurm.md.
#
#   sbatch [--nodes=N] [--ntasks-per-node=T] [--cpus-per-task=C] [-p PARTITION] [-A ACCOUNT] \
#          slurm/preprocess.sh [RECIPE] [key=value ...]        # RECIPE: configs/sample/preprocess.yaml
#
# Each task tokenizes with its --cpus-per-task threads (workers=0: the CPUs it may use).
# A rerun of the same command resumes (each step picks up where it stopped).
#SBATCH --job-name=preprocess
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Find the project, then load what every stage shares. Slurm runs a spooled copy of this file, so
# look at PIPELINE_ROOT, else where the submitted script lives (scontrol's Command), this file's
# directory (run outside sbatch), the submit directory. The same lines in every stage script.
[ -n "${PIPELINE_ROOT:-}" ] || for PIPELINE_ROOT in "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null |
    sed -n 's|^ *Command=\([^ ]*\)/slurm/[^/ ]*\.sh\( .*\)\{0,1\}$|\1|p')" "$(dirname "$0")/.." "${SLURM_SUBMIT_DIR:-.}"; do
    [ -f "$PIPELINE_ROOT/slurm/common.sh" ] && break; done
[ -f "$PIPELINE_ROOT/slurm/common.sh" ] || { echo "pipeline: cannot find the project: submit from its root, or export PIPELINE_ROOT=/path/to/it" >&2; exit 2; }
# shellcheck source=common.sh
source "$PIPELINE_ROOT/slurm/common.sh"

pipeline_preprocess configs/sample/preprocess.yaml "$@"
