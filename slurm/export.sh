#!/bin/bash
# Export a training checkpoint as a verified Hugging Face model directory (launch/export.py).
# One task, CPU only: DeepSpeed's zero_to_fp32 consolidation plus a logits check. Guide: docs/slurm.md.
#
#   sbatch [-p PARTITION] [-A ACCOUNT] [-t TIME] [--mem=...] \
#          slurm/export.sh --checkpoint RUN|CHECKPOINTS|STEP_DIR --output DIR [--dtype bf16] [--overwrite]
#
# Memory: about one fp32 copy of the model (4 bytes per parameter) plus the optimizer pages read.
#SBATCH --job-name=export
#SBATCH --nodes=1
#SBATCH --ntasks=1
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

pipeline_run export launch/export.py - "$@"
