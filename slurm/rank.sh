# One task of an srun step (run by slurm/common.sh as `srun ... bash slurm/rank.sh [--training] CMD...`).
#
# Runs CMD and, when it fails, names the rank, its node and its exit code in the job's log.
# With --training, exit code 75 (checkpoint saved after a stop request, pipeline.training.preemption)
# is not a failure, and a real failure stops every other rank of the step at once (the
# training steps run srun with --kill-on-bad-exit=0, which would treat 75 as a failure).

training=0
if [ "${1:-}" = --training ]; then
    training=1
    shift
fi

# Slurm signals every process of a task (this shell and CMD). Keep this shell alive to report,
# and pass the signal on in case only this shell got it (CMD latches the first stop signal).
# The stage's completion marker (pipeline.dist.finish writes its exit code there once the
# stage has returned and its process group is gone): lets a rank that dies at interpreter
# exit after finishing its work count as done.
export PIPELINE_RANK_DONE="${TMPDIR:-/tmp}/pipeline-rank-done.${SLURM_JOB_ID:-0}.${SLURM_STEP_ID:-0}.${SLURM_PROCID:-0}.$$"
rm -f "$PIPELINE_RANK_DONE"

child=""
trap '[ -n "$child" ] && kill -USR1 "$child" 2>/dev/null' USR1
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM
if [ "$training" -eq 1 ]; then
    # SIGUSR1 ignored until the rank installs its own handler (pipeline.training.preemption, after the
    # imports): a stop request that comes earlier is dropped instead of killing the rank, and
    # the batch script repeats it until the ranks stop.
    (trap '' USR1 && exec "$@") &
else
    "$@" &  # a command started by bash gets the default handlers back, not these traps
fi
child=$!
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
done
wait "$child"
rc=$?
done_code=""
if [ -f "$PIPELINE_RANK_DONE" ]; then done_code=$(tr -cd 0-9 <"$PIPELINE_RANK_DONE"); fi
rm -f "$PIPELINE_RANK_DONE"
# SIGABRT (134) after the marker: the abort happened in the process's exit, after the stage
# had written its outputs (pipeline.dist.finish's docstring has the case). Take the stage's own code.
if [ "$rc" -eq 134 ] && [ -n "$done_code" ]; then
    echo "pipeline: rank ${SLURM_PROCID:-?} of ${SLURM_NTASKS:-?} (node ${SLURMD_NODENAME:-$(hostname -s)}) was killed by" \
        "SIGABRT while exiting, after its stage had finished with code $done_code (completion marker written):" \
        "counted as exit code $done_code" >&2
    rc=$done_code
fi

if [ "$rc" -eq 0 ] || { [ "$training" -eq 1 ] && [ "$rc" -eq 75 ]; }; then
    exit "$rc"
fi
if [ "$rc" -gt 128 ]; then
    how="was killed by signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null || echo '?'))"
else
    how="failed with exit code $rc"
fi
echo "pipeline: rank ${SLURM_PROCID:-?} of ${SLURM_NTASKS:-?} (node ${SLURMD_NODENAME:-$(hostname -s)}, local rank ${SLURM_LOCALID:-?}) $how" \
    "in step ${SLURM_JOB_ID:-?}.${SLURM_STEP_ID:-?} (${2##*/})" >&2
if [ "$training" -eq 1 ]; then
    echo "pipeline: stopping every rank of step ${SLURM_JOB_ID:-?}.${SLURM_STEP_ID:-?}" >&2
    scancel --signal=KILL "${SLURM_JOB_ID}.${SLURM_STEP_ID}" || true
fi
exit "$rc"
