#!/usr/bin/env bash
# Distributed training with torchrun, mmseg's interface:
#   tools/dist_train.sh CONFIG NPROC [train.py args...]
# NPROC processes per node: one per GPU, or CPU processes on a machine
# without CUDA (gloo is picked automatically). Multi-node: set NNODES,
# NODE_RANK, MASTER_ADDR and PORT. PYTHON defaults to the repo's .venv.
#
# Faults: torchrun exits with 1 whenever a worker fails; its summary names
# each rank with its exit code (tools/train.py: 1 NaN/Inf loss or a data file
# that stopped loading, 2 bad input, 3 lost another rank, 4 a checkpoint could
# not be written, 75 stopped on SIGTERM after saving the iteration) and the
# root cause (e.g. "exitcode: -9 (SIGKILL)" for a killed rank). A SIGTERM to
# torchrun reaches every worker, which saves and stops (resume with
# --resume); torchrun SIGKILLs workers still running after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30): raise it if saving a
# checkpoint takes longer.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NPROC [train.py args...]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python
    [ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "${@:3}"
