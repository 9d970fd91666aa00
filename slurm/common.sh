# What every launcher in slurm/ shares; sourced, never run. Guide: docs/slurm.md.
#
# A launcher finds the project (PIPELINE_ROOT), sources this file, then calls one of
#   pipeline_train  STAGE LAUNCH_SCRIPT DEFAULT_RECIPE [RECIPE] [key=value ...]
#   pipeline_run    STAGE LAUNCH_SCRIPT DEFAULT_RECIPE [RECIPE] [key=value ...]
#   pipeline_preprocess DEFAULT_RECIPE [RECIPE] [key=value ...]
# Lines written here start with "pipeline:", so `grep ^pipeline: logs/JOB.out` tells a job's story.

set -euo pipefail

pipeline_log() { printf 'pipeline: %s\n' "$*" >&2; }
pipeline_die() { pipeline_log "error: $*"; exit 2; }

[ -f "$PIPELINE_ROOT/launch/train.py" ] ||
    pipeline_die "PIPELINE_ROOT=$PIPELINE_ROOT is not this project (no launch/train.py); export PIPELINE_ROOT=/path/to/project"
PIPELINE_ROOT=$(cd "$PIPELINE_ROOT" && pwd)
export PIPELINE_ROOT
[ -n "${SLURM_JOB_ID:-}" ] ||
    pipeline_die "not inside a Slurm job: submit with \`sbatch $0 ...\` (or run it inside an salloc allocation)"

# Rendezvous: rank 0 runs on the first node; the port follows from the job id (the formula of
# pipeline.rendezvous.slurm_port), so two jobs of this project sharing a node do not collide
# and a requeued job keeps its port. Set here, before the hook, so that the hook can change
# them (another interface); stepped past a busy port below.
mapfile -t _pipeline_hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ ${#_pipeline_hosts[@]} -gt 0 ] || pipeline_die "\`scontrol show hostnames $SLURM_JOB_NODELIST\` gave no host"
export MASTER_ADDR=${_pipeline_hosts[0]}
_pipeline_derived_port=$((10000 + SLURM_JOB_ID % 20000))
export MASTER_PORT=$_pipeline_derived_port

# The environment hook, the one place for modules and venv/conda activation (slurm/env.sh,
# or the file PIPELINE_ENV_HOOK names). srun passes the resulting environment to every task.
PIPELINE_ENV_HOOK=${PIPELINE_ENV_HOOK:-$PIPELINE_ROOT/slurm/env.sh}
[ -f "$PIPELINE_ENV_HOOK" ] || pipeline_die "PIPELINE_ENV_HOOK=$PIPELINE_ENV_HOOK does not exist"
set +eu  # module and conda scripts use unset variables and failing commands
# shellcheck source=/dev/null
source "$PIPELINE_ENV_HOOK"
set -eu
PIPELINE_PYTHON=${PIPELINE_PYTHON:-python3}
command -v "$PIPELINE_PYTHON" >/dev/null ||
    pipeline_die "$PIPELINE_PYTHON not found: activate the environment in $PIPELINE_ENV_HOOK or set PIPELINE_PYTHON"
# Another process on this node (another job's rank 0, any server) may hold the derived port.
# This shell runs on the job's first node, where rank 0 listens, so it can look: the first
# free port from the derived one, stepping by one (the same busy ports give the same answer;
# a requeued job starts from the same port). The ranks cannot do this themselves: they share
# no channel before the rendezvous. A port taken between here and rank 0's start still fails,
# with a message from rank 0 that says so. A MASTER_PORT the hook set is kept as it is.
if [ "$MASTER_PORT" = "$_pipeline_derived_port" ]; then
    MASTER_PORT=$("$PIPELINE_PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from pipeline.rendezvous import main; sys.exit(main(sys.argv[2:]))' \
        "$PIPELINE_ROOT" slurm-port "$SLURM_JOB_ID") ||
        pipeline_die "no free rendezvous port near $_pipeline_derived_port on $(hostname -s) (message above)"
    if [ "$MASTER_PORT" != "$_pipeline_derived_port" ]; then
        pipeline_log "rendezvous port $_pipeline_derived_port (from the job id) is in use on $(hostname -s): using $MASTER_PORT"
    fi
fi
# One thread per allocated CPU (torch would otherwise start one per core of the node, per rank).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------- arguments

# pipeline_recipe_args DEFAULT_RECIPE [RECIPE] [key=value ...] -> PIPELINE_ARGS
# The first argument is the recipe when it is neither key=value nor an --option (a relative
# path: from the job's working directory, else from the project); else the default recipe
# when the project has it. Everything else passes through.
pipeline_recipe_args() {
    local default=$1
    shift
    PIPELINE_ARGS=()
    if [ $# -gt 0 ] && [[ $1 != *=* && $1 != -* ]]; then
        if [ -f "$1" ]; then
            PIPELINE_ARGS=(--config "$1")
        elif [[ $1 != /* ]] && [ -f "$PIPELINE_ROOT/$1" ]; then
            PIPELINE_ARGS=(--config "$PIPELINE_ROOT/$1")
        else
            pipeline_die "recipe $1 not found (in $(pwd), the job's working directory, nor in $PIPELINE_ROOT)"
        fi
        shift
    elif [ -n "$default" ] && [ -f "$PIPELINE_ROOT/$default" ]; then
        PIPELINE_ARGS=(--config "$PIPELINE_ROOT/$default")
    fi
    PIPELINE_ARGS+=("$@")
}

# ---------------------------------------------------------------------------- layout

# GPUs allocated per node (0 without GPUs).
pipeline_gpus_per_node() {
    local g=${SLURM_GPUS_ON_NODE:-}
    if [ -z "$g" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then g=${SLURM_GPUS_PER_NODE##*:}; fi  # "a100:4" -> 4
    if [ -z "$g" ] && [ -n "${SLURM_JOB_GPUS:-}" ]; then g=$(($(tr -cd , <<<"$SLURM_JOB_GPUS" | wc -c) + 1)); fi
    [[ ${g:-0} =~ ^[0-9]+$ ]] || pipeline_die "cannot read the GPU count per node from Slurm (SLURM_GPUS_PER_NODE=$SLURM_GPUS_PER_NODE)"
    echo "${g:-0}"
}

# Tasks per node: one per GPU when the job has GPUs, else the job's tasks per node.
pipeline_tasks_per_node() {
    local gpus alloc
    gpus=$(pipeline_gpus_per_node)
    alloc=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}
    if [ "$gpus" -eq 0 ]; then
        echo "$alloc"
    elif [ "$gpus" -le "$alloc" ]; then
        echo "$gpus"
    else
        pipeline_die "the job has $gpus GPUs per node but $alloc tasks per node; one task per GPU needs sbatch --ntasks-per-node=$gpus"
    fi
}

# srun options shared by every step: CPUs per task (srun >= 22.05 no longer inherits them).
pipeline_srun_opts() {
    PIPELINE_SRUN=(srun --export=ALL)
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then PIPELINE_SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
}

# ---------------------------------------------------------------------------- signals

# The stop request the batch shell received: USR1 (Slurm's --signal=B:USR1@T warning before
# the time limit, or `scancel -b -s USR1`): checkpoint and requeue; TERM (scancel, the time
# limit itself, preemption): the job is ending, the ranks got SIGTERM themselves and save;
# no requeue (`scontrol requeue` would resurrect even a cancelled job).
PIPELINE_STOP=""
_pipeline_srun_pid=""
_pipeline_on_signal() {
    if [ "$PIPELINE_STOP" != TERM ]; then PIPELINE_STOP=$1; fi
    pipeline_log "batch shell got SIG$1 at $(date +%T): asking every rank to checkpoint and stop"
    # srun relays SIGUSR1 to every task of its step. Never TERM: srun answers TERM by
    # killing its tasks ("forcing job termination").
    if [ -n "$_pipeline_srun_pid" ]; then kill -USR1 "$_pipeline_srun_pid" 2>/dev/null || true; fi
}
trap '_pipeline_on_signal USR1' USR1
trap '_pipeline_on_signal TERM' TERM

# pipeline_srun SRUN_ARGS... -> PIPELINE_RC. srun runs in the background because bash runs a
# trap only between commands: `wait` returns early when a signal arrives, the trap forwards
# it, and we wait again until srun has really finished. Once a stop was requested, the
# request is repeated every 3 s: a rank still starting up (importing, before its handler
# exists) ignores SIGUSR1 (slurm/rank.sh) and gets the next one. A rank that has its
# handler only records the first; after the loop it ignores USR1 again (rank.sh), so a
# repeat during its checkpoint or exit changes nothing.
pipeline_srun() {
    "$@" &
    _pipeline_srun_pid=$!
    local ticks=0
    while kill -0 "$_pipeline_srun_pid" 2>/dev/null; do
        if [ -z "$PIPELINE_STOP" ]; then
            wait "$_pipeline_srun_pid" || true
        else
            sleep 1
            ticks=$((ticks + 1))
            if [ $((ticks % 3)) -eq 0 ]; then kill -USR1 "$_pipeline_srun_pid" 2>/dev/null || true; fi
        fi
    done
    PIPELINE_RC=0
    wait "$_pipeline_srun_pid" || PIPELINE_RC=$?  # bash keeps the status of a reaped child
    _pipeline_srun_pid=""
}

_pipeline_banner() {  # STAGE TASKS_PER_NODE
    pipeline_log "$1: job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST:" \
        "$SLURM_NNODES node(s) x $2 task(s), $(pipeline_gpus_per_node) GPU(s) per node, rendezvous $MASTER_ADDR:$MASTER_PORT," \
        "project $PIPELINE_ROOT, $(command -v "$PIPELINE_PYTHON"), working dir $(pwd)"
}

_pipeline_failed() {  # STAGE RC
    pipeline_log "$1 FAILED: srun exited with code $2 (a 'pipeline: rank N ... failed' line above names the first rank that failed)"
    exit "$2"
}

# ---------------------------------------------------------------------------- stages

# pipeline_train STAGE LAUNCH_SCRIPT DEFAULT_RECIPE [RECIPE] [key=value ...]
# One task per GPU on every node. Exit code 75 from the ranks means "checkpoint saved after a
# stop request": the job requeues itself and resumes from that checkpoint (the stage's
# checkpoint.resume=auto default). A rank that fails stops all the others at once.
pipeline_train() {
    local stage=$1 script=$2
    shift 2
    pipeline_recipe_args "$@"
    local tpn
    tpn=$(pipeline_tasks_per_node)
    _pipeline_banner "$stage" "$tpn"
    pipeline_srun_opts
    # --kill-on-bad-exit=0: with 1, the first rank to exit 75 would kill the others while they
    # leave (srun then reports 143, not 75); slurm/rank.sh stops the step on real failures.
    pipeline_srun "${PIPELINE_SRUN[@]}" --kill-on-bad-exit=0 --nodes="$SLURM_NNODES" --ntasks-per-node="$tpn" \
        --ntasks=$((tpn * SLURM_NNODES)) bash "$PIPELINE_ROOT/slurm/rank.sh" --training \
        "$PIPELINE_PYTHON" "$PIPELINE_ROOT/$script" "${PIPELINE_ARGS[@]}"
    case $PIPELINE_RC in
    0)
        pipeline_log "$stage finished"
        ;;
    75)
        if [ "$PIPELINE_STOP" = TERM ]; then
            pipeline_log "$stage stopped after a checkpoint; the job is ending (SIGTERM: scancel, time limit or preemption)," \
                "so it is not requeued here; submit the same command again to resume"
            exit 75
        fi
        pipeline_log "$stage stopped after a checkpoint (exit 75): requeueing job $SLURM_JOB_ID; the next run resumes from it"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0  # Slurm ends this run now; the job pends, then starts again
        fi
        pipeline_log "scontrol requeue refused (submitted with --no-requeue, or Requeue=0); submit the same command again to resume"
        exit 75
        ;;
    *)
        _pipeline_failed "$stage" "$PIPELINE_RC"
        ;;
    esac
}

# pipeline_run STAGE LAUNCH_SCRIPT DEFAULT_RECIPE|- [RECIPE] [args ...]
# One task per GPU (or per allocated task without GPUs), no requeue. DEFAULT_RECIPE "-": the
# script takes plain options (export), passed through untouched.
pipeline_run() {
    local stage=$1 script=$2 default=$3
    shift 3
    if [ "$default" = - ]; then PIPELINE_ARGS=("$@"); else pipeline_recipe_args "$default" "$@"; fi
    local tpn
    tpn=$(pipeline_tasks_per_node)
    _pipeline_banner "$stage" "$tpn"
    pipeline_srun_opts
    pipeline_srun "${PIPELINE_SRUN[@]}" --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node="$tpn" \
        --ntasks=$((tpn * SLURM_NNODES)) bash "$PIPELINE_ROOT/slurm/rank.sh" \
        "$PIPELINE_PYTHON" "$PIPELINE_ROOT/$script" "${PIPELINE_ARGS[@]}"
    [ "$PIPELINE_RC" -eq 0 ] || _pipeline_failed "$stage" "$PIPELINE_RC"
    pipeline_log "$stage finished"
}

# pipeline_preprocess DEFAULT_RECIPE [RECIPE] [key=value ...]
# One task: the whole stage. N tasks (any number of nodes): the tokenizer in one task, the
# shards split across all N tasks (each takes the documents whose content hash falls to its
# SLURM_PROCID), then the merge in one task. A rerun of the job resumes every step.
pipeline_preprocess() {
    pipeline_recipe_args "$@"
    local n=${SLURM_NTASKS:-1} py=("$PIPELINE_PYTHON" "$PIPELINE_ROOT/launch/preprocess.py" "${PIPELINE_ARGS[@]}")
    _pipeline_banner preprocess "$((n / SLURM_NNODES))"
    pipeline_srun_opts
    local one=("${PIPELINE_SRUN[@]}" --kill-on-bad-exit=1 --nodes=1 --ntasks=1)
    if [ "$n" -le 1 ]; then
        pipeline_srun "${one[@]}" bash "$PIPELINE_ROOT/slurm/rank.sh" "${py[@]}"
        [ "$PIPELINE_RC" -eq 0 ] || _pipeline_failed preprocess "$PIPELINE_RC"
        pipeline_log "preprocess finished"
        return
    fi
    local tokenizer_path
    # The resolved config says whether a tokenizer must be trained (also checks every key once).
    tokenizer_path=$("${py[@]}" --print-config | "$PIPELINE_PYTHON" -c \
        'import sys, yaml; print((yaml.safe_load(sys.stdin).get("tokenizer") or {}).get("path") or "")') ||
        pipeline_die "the preprocess config is invalid (message above)"
    if [ -z "$tokenizer_path" ]; then
        pipeline_log "preprocess step 1/3: train the tokenizer (1 task)"
        pipeline_srun "${one[@]}" bash "$PIPELINE_ROOT/slurm/rank.sh" "${py[@]}" step=tokenizer
        [ "$PIPELINE_RC" -eq 0 ] || _pipeline_failed "preprocess (tokenizer)" "$PIPELINE_RC"
    fi
    pipeline_log "preprocess step 2/3: shards in $n tasks"
    pipeline_srun "${PIPELINE_SRUN[@]}" --kill-on-bad-exit=1 --ntasks="$n" bash "$PIPELINE_ROOT/slurm/rank.sh" "${py[@]}" step=shards
    [ "$PIPELINE_RC" -eq 0 ] || _pipeline_failed "preprocess (shards)" "$PIPELINE_RC"
    pipeline_log "preprocess step 3/3: merge (1 task)"
    pipeline_srun "${one[@]}" bash "$PIPELINE_ROOT/slurm/rank.sh" "${py[@]}" step=merge
    [ "$PIPELINE_RC" -eq 0 ] || _pipeline_failed "preprocess (merge)" "$PIPELINE_RC"
    pipeline_log "preprocess finished"
}
