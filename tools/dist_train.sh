#!/usr/bin/env bash
# Distributed training with torchrun, mmseg's interface:
#   tools/dist_train.sh CONFIG NPROC [train.py args...]
# NPROC processes per node: one per GPU, or CPU processes on a machine
# without CUDA (gloo is picked automatically). Multi-node: set NNODES,
# NODE_RANK, MASTER_ADDR and PORT. PYTHON defaults to the repo's .venv.
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
