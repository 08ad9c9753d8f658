#!/usr/bin/env bash
# The body of the sbatch templates (train/estimate/sample/selftest.sbatch):
# srun starts one torchrun per node, torchrun one process per GPU (or
# ADPM_NPROC_PER_NODE processes on CPU), each running `python -m adpm_dist.STAGE ARGS` (selftest: adpm_dist.stages.selftest).
#
#   exec bash "$SLURM_SUBMIT_DIR/slurm/run-stage.sh" STAGE [ARGS...]    (from a batch script)
#
# Requeue: the templates ask for `--signal=B:USR1@120`, so this shell hears of the
# time limit two minutes early. It then sends SIGTERM to the job step; torchrun
# passes it to the workers, the stage checkpoints and exits, and this shell
# requeues the job (`scontrol requeue`): the same script and arguments run
# again and the stage resumes from its checkpoint.
#
# Settings (environment): ADPM_PYTHON (default <submit dir>/.venv/bin/python, else
# python3), ADPM_NPROC_PER_NODE (default: GPUs on the node, else 1), MASTER_PORT
# (default 20000 + job id mod 20000, as adpm_dist.dist uses).
set -uo pipefail

STAGE="${1:?usage: run-stage.sh STAGE [ARGS...]}"
shift
[ -n "${SLURM_JOB_ID:-}" ] || { echo "run-stage.sh: run me inside a SLURM allocation" >&2; exit 2; }
REPO="${SLURM_SUBMIT_DIR:-$PWD}"
PYTHON="${ADPM_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
NPROC="${ADPM_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT PYTHONUNBUFFERED=1
cd "$REPO"
# train/estimate/sample/evaluate are entry points of their own; selftest lives with the stages.
case "$STAGE" in
    selftest) MODULE=adpm_dist.stages.selftest ;;
    *) MODULE="adpm_dist.$STAGE" ;;
esac

preempted=0
on_time_limit() {
    preempted=1
    echo "[run-stage] time limit near: asking $STAGE to checkpoint (SIGTERM to the step)"
    # Without --batch/--full, scancel --signal reaches the job steps, not this shell.
    scancel --signal=TERM "$SLURM_JOB_ID"
}
trap on_time_limit USR1

echo "[run-stage] $STAGE on $SLURM_JOB_NUM_NODES node(s) × $NPROC, master $MASTER_ADDR:$MASTER_PORT" \
    "(restart ${SLURM_RESTART_COUNT:-0})"
# $SLURM_NODEID differs per node, so it is expanded by the shell srun starts on each node.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec "$0" -m torch.distributed.run --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
        --nproc-per-node "$1" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        -m "$2" "${@:3}"' "$PYTHON" "$NPROC" "$MODULE" "$@" &
step=$!
# `wait` returns early when the trap runs; keep waiting while srun lives.
while true; do
    wait "$step"
    rc=$?
    kill -0 "$step" 2>/dev/null || break
done

if [ "$preempted" = 1 ]; then
    echo "[run-stage] $STAGE stopped (status $rc) after the time-limit signal: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
