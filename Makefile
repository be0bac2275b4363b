# mesa-seg: the two commands a newcomer runs are `make demo` and `make test`.
# Both create or reuse .venv/ (re-installed only when a requirements file changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast bench memory-report clean-venv

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

bench: $(STAMP)
	$(PY) -m mesa_seg.benchmarks.ops

clean-venv:
	rm -rf $(VENV)
