# Quickstart: `make demo` trains the demo on 4 local CPU processes; `make test` runs the tests.
# Both create .venv when missing and are safe to repeat.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch (a plain `pip install torch` would pull a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test install prepare-demo lint clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.base

data/demo/meta.json: $(VENV)/.base
	$(VENV)/bin/feixing prepare --demo --out data/demo

prepare-demo: data/demo/meta.json

demo: $(VENV)/.base data/demo/meta.json
	rm -rf runs/demo  # the demo always starts fresh; your own runs continue with --resume auto
	OMP_NUM_THREADS=1 $(VENV)/bin/feixing train --config configs/demo.toml --nproc 4
	$(VENV)/bin/feixing generate --run runs/demo --prompt "def main(" --max-new-tokens 200

test: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs data/demo
