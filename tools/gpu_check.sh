#!/usr/bin/env bash
# GPU check, one script, <= 10 minutes on one GPU:
#   1. the CUDA tests (pytest -m cuda: every strategy trains, fp16 AMP's loss
#      scaler steps, Mesa's compiled kernels compile, every Mesa op's forward is
#      bit-exact against torch);
#   2. the strategy leaderboard of UperNet-Swin-T and Semantic FPN + PVT-Tiny at
#      512x512, batch 2, all 8 strategies, --device cuda, with the batch sweep
#      for fp32 and the Mesa strategies.
# Usage: tools/gpu_check.sh [OUT_DIR]   (default: reports/gpu_512)
# Exit code: non-zero if the tests or any leaderboard cell failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/gpu_512}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
START=$SECONDS

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to torch" >&2
    exit 2
fi
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)'

echo "== 1/2 CUDA tests"
# SIGINT on timeout: Python unwinds and stops its child processes.
timeout -s INT 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
tests_rc=$?

echo "== 2/2 strategy leaderboard, 512x512, batch 2 ($((SECONDS - START)) s so far)"
# Whatever is left of the 10 minutes; the leaderboard files are rewritten after
# every cell, so a run cut short still leaves the cells it measured.
left=$((590 - (SECONDS - START)))
timeout -s INT "$left" "$PY" tools/benchmark.py --models upernet_swin fpn_pvt \
    --size 512 512 --batch 2 --device cuda --steps 5 --warmup 2 \
    --sweep batch --sweep-strategies fp32 mesa mesa_amp mesa_cp --max-probes 3 \
    --timeout 240 --out "$OUT"
bench_rc=$?

echo
echo "CUDA tests: exit $tests_rc; leaderboard: exit $bench_rc ($((SECONDS - START)) s in all)"
echo "report: $OUT/leaderboard.md (+ leaderboard.json, pareto_*.png, logs/)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
