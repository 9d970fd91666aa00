#!/bin/bash
# Evaluate a model (launch/evaluate.py: perplexity, classification, generation). One GPU by
# default; a model that needs ZeRO-3 to fit: more GPUs and zero3=true. Guide: docs/slurm.md.
#
#   sbatch [--gpus-per-node=G] [-p PARTITION] [-A ACCOUNT] [-t TIME] \
#          slurm/evaluate.sh [RECIPE] [key=value ...]          # e.g. model=outputs/x/finetune data=outputs/x/data
#
# Defaults below; any sbatch option on the command line wins. Without GPUs: --gpus-per-node=0.
#SBATCH --job-name=evaluate
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=4:00:00
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

pipeline_run evaluate launch/evaluate.py configs/sample/evaluate.yaml "$@"
