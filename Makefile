# mesa-seg: the two commands a newcomer runs are `make demo` and `make test`.
# Both create or reuse .venv/ (re-installed only when a requirements file changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast bench bench-ops memory-report clean-venv

setup: $(STAMP)

# torch goes in first and is pinned again in the second call, so no other
# requirement can pull a different (multi-GB) torch build.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" "setuptools<81" wheel
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -r requirements-dev.txt $(TORCH_PINS)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

# The strategy leaderboard, CPU-sized (both flagship models, all 8 strategies,
# 256x256, batch 2): reports/bench_256/leaderboard.md. One timed step per cell
# (plus the warm-up step, the allocator-traced step and the audited forward):
# the bf16 AMP cells are the slow ones on CPUs without native bf16 arithmetic.
bench: $(STAMP)
	$(PY) tools/benchmark.py --models upernet_swin fpn_pvt --size 256 256 --batch 2 \
		--steps 1 --warmup 1 --out reports/bench_256

# Per-op cost of Mesa vs torch (fwd+bwd time, saved bytes)
bench-ops: $(STAMP)
	$(PY) -m mesa_seg.benchmark.ops

clean-venv:
	rm -rf $(VENV)
