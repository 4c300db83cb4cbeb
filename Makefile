# Set-up is two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= demo-out

.PHONY: demo test install lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null

# torch first and pinned: any range that admits newer releases pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,profile,runtime,kernels]'
	@# Compile every numba kernel once (into its on-disk cache), so no run compiles inside a time limit.
	$(PY) -m placer._warm || echo "numba warm-up failed: the first runs compile their kernels"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/placer demo -o $(DEMO_DIR)

# The released serving stacks (SGLang 0.5.23, vLLM 0.34.0) in their own environment, for the
# conformance tests in tests/stacks/; the main .venv never imports them.
include tests/stacks/stacks.mk

test: install $(STACKS_MARKER)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed; the browser test will skip"
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check placer tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/bench_stats.py

clean:
	rm -rf $(VENV) $(STACKS_VENV) $(DEMO_DIR) .pytest_cache .hypothesis
