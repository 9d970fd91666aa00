#!/bin/bash
# Fine-tune (launch/finetune.py: chat SFT, preference tuning (DPO) or classification): one task per GPU on every node,
# requeued after a checkpoint when stopped (preemption warning, time limit). Guide: docs/slurm.md.
#
#   sbatch [--nodes=N] [--gpus-per-node=G] [-p PARTITION] [-A ACCOUNT] [-t TIME] \
#          slurm/finetune.sh [RECIPE] [key=value ...]          # RECIPE: configs/sample/finetune.yaml, configs/sample/dpo.yaml
#
# Defaults below; any sbatch option on the command line wins. Without GPUs: --gpus-per-node=0.
#SBATCH --job-name=finetune
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
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

pipeline_train finetune launch/finetune.py configs/sample/finetune.yaml "$@"
