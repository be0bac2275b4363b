#!/usr/bin/env bash
# Training on a Slurm cluster, mmseg's interface:
#   [GPUS=8] [GPUS_PER_NODE=8] tools/slurm_train.sh PARTITION JOB_NAME CONFIG [train.py args...]
# One task per GPU; CPUS_PER_TASK, SRUN_ARGS and PYTHON can be set too.
#
# Preemption and requeue. On SIGTERM every task finishes the iteration in
# flight, rank 0 saves it (WORK_DIR/iter_N.pth, atomically) and every task
# exits with code 75. Slurm sends SIGTERM before it preempts a job (SIGKILL
# follows after the partition's GraceTime) and, with --signal=TERM@SECONDS,
# that many seconds before the time limit; the save must fit in that time.
# Submit through sbatch, so that the job can be requeued, and pass --resume,
# so that every start continues from the newest checkpoint in the work dir
# (the first start, which has none, trains from scratch):
#
#   sbatch -p PARTITION -J JOB --requeue --signal=TERM@120 --gres=gpu:8 \
#       --ntasks=8 --ntasks-per-node=8 --cpus-per-task=5 \
#       --wrap "REQUEUE=1 tools/slurm_train.sh PARTITION JOB CONFIG --resume"
#
# Slurm requeues a preempted job by itself (PreemptMode=REQUEUE). With
# REQUEUE=1 this script also requeues the job (scontrol requeue) when
# training stopped on a SIGTERM from elsewhere (the time-limit signal, an
# administrator): exit code 75. Other exit codes (tools/train.py): 1 NaN/Inf
# loss or a data file that stopped loading, 2 bad input, 3 a rank died or
# hung, 4 a checkpoint could not be written.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG [train.py args...]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python
    [ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
fi
# SRUN_ARGS is a list of extra srun options: split on purpose
# shellcheck disable=SC2206
CMD=(srun -p "$PARTITION"
    --job-name="$JOB_NAME"
    --gres=gpu:"$GPUS_PER_NODE"
    --ntasks="$GPUS"
    --ntasks-per-node="$GPUS_PER_NODE"
    --cpus-per-task="$CPUS_PER_TASK"
    --kill-on-bad-exit=1
    ${SRUN_ARGS:-}
    "$PYTHON" -u "$ROOT/tools/train.py" "$CONFIG" --launcher slurm "${@:4}")
if [ "${REQUEUE:-0}" != 1 ]; then
    exec "${CMD[@]}"
fi
rc=0
"${CMD[@]}" || rc=$?
if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "$0: training stopped on SIGTERM (exit 75), checkpoint saved:" \
        "requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
