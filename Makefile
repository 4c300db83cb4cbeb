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
	$(PIP) install -e '.[dev,profile,runtime]'
	touch $@

install: $(VENV)/.installed

demo: install
	@mkdir -p $(DEMO_DIR)
	$(VENV)/bin/placer synth --model mixtral-8x7b --tokens 20000 --seed 0 -o $(DEMO_DIR)/train.npz
	$(VENV)/bin/placer synth --model mixtral-8x7b --tokens 20000 --seed 1 --perturb 0.3 -o $(DEMO_DIR)/holdout.npz
	$(VENV)/bin/placer stats $(DEMO_DIR)/train.npz -o $(DEMO_DIR)/train-stats.npz
	$(VENV)/bin/placer solve $(DEMO_DIR)/train.npz --gpus 4 --method contiguous \
		-o $(DEMO_DIR)/contiguous.json --export sglang=$(DEMO_DIR)/contiguous-sglang.json
	$(VENV)/bin/placer solve $(DEMO_DIR)/train.npz --gpus 4 --method round-robin \
		-o $(DEMO_DIR)/round-robin.json --export sglang=$(DEMO_DIR)/round-robin-sglang.json
	$(VENV)/bin/placer evaluate $(DEMO_DIR)/contiguous.json $(DEMO_DIR)/holdout.npz
	$(VENV)/bin/placer evaluate $(DEMO_DIR)/round-robin.json $(DEMO_DIR)/holdout.npz
	@echo "demo outputs in $(DEMO_DIR)/ (synthetic data)"

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check placer tests benchmarks

bench: install
	$(PY) benchmarks/bench_stats.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .hypothesis
