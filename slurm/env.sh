# The environment hook: sourced by every script in slurm/ at the start of the job, on its first
# node, before anything runs; srun passes the resulting environment on to every task.
#
# This is the one place for your site's setup. Either edit this file, or keep your own file
# elsewhere and submit with PIPELINE_ENV_HOOK=/path/to/hook.sh in the environment (then this
# file is not read). By default it does nothing: the job runs in the environment `sbatch` was
# called from (sbatch exports it), e.g. an activated venv.
#
# Examples:
#   module purge && module load cuda/12.4 nccl/2.21
#   source /shared/venvs/pipeline/bin/activate        # or: eval "$(conda shell.bash hook)"; conda activate pipeline
#   export PIPELINE_PYTHON=/shared/venvs/pipeline/bin/python   # default: python3 on PATH
#   export HF_HOME=/scratch/$USER/hf                   # caches on a filesystem every node sees
#   export NCCL_SOCKET_IFNAME=ib0                      # NCCL's network interface
#   export MASTER_ADDR=$MASTER_ADDR-ib                 # rendezvous over another interface (set before this hook)
#   export OMP_NUM_THREADS=4                           # default: --cpus-per-task
