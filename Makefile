# Quickstart: `make demo` trains the demo on 4 local CPU processes; `make test` runs the tests.
# Both create .venv when missing and are safe to repeat.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch (a plain `pip install torch` would pull a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test install prepare-demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

data/demo/meta.json: $(STAMP)
	$(VENV)/bin/feixing prepare --demo --out data/demo

prepare-demo: data/demo/meta.json

demo: $(STAMP) data/demo/meta.json
	rm -rf runs/demo  # the demo always starts fresh; your own runs resume with --resume auto
	OMP_NUM_THREADS=1 $(VENV)/bin/feixing train --config configs/demo.toml --nproc 4
	$(VENV)/bin/feixing generate --run runs/demo --prompt "def main(" --max-new-tokens 160

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs data/demo
