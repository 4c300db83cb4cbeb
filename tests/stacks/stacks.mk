# Separate venv running the RELEASED serving stacks (CPU only) for conformance tests
# (tests/stacks/). Never installs into the main .venv. Include from the Makefile:
#     include tests/stacks/stacks.mk
# and make the test target depend on $(STACKS_MARKER) where the stacks tests must run (CI).
#
# torch goes in FIRST, alone, pinned exactly (a range pulls a multi-GB CUDA build); the
# stacks themselves go in with --no-deps (their requirement lists pull CUDA wheels), then
# the packages their import paths need, from two exact freezes installed --no-deps together
# (one consistent set: where both stacks need a package the pins agree, inside vLLM's bounds).

STACKS_VENV   := .venv-stacks
STACKS_PY     := $(STACKS_VENV)/bin/python
STACKS_PIP    := $(STACKS_PY) -m pip
STACKS_MARKER := $(STACKS_VENV)/.installed
STACKS_TORCH  ?= torch==2.13.0
# a local wheel path works too: make SGLANG_SPEC=/path/sglang-0.5.23-...whl
SGLANG_SPEC   ?= sglang==0.5.23
VLLM_SPEC     ?= vllm==0.34.0

$(STACKS_MARKER): tests/stacks/requirements-sglang.txt tests/stacks/requirements-vllm.txt
	test -x $(STACKS_PY) || python3 -m venv $(STACKS_VENV)
	$(STACKS_PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
		|| $(STACKS_PIP) install $(STACKS_TORCH)
	$(STACKS_PIP) install --no-deps $(SGLANG_SPEC) $(VLLM_SPEC)
	$(STACKS_PIP) install --no-deps -r tests/stacks/requirements-sglang.txt -r tests/stacks/requirements-vllm.txt
	touch $@

.PHONY: stacks-venv
stacks-venv: $(STACKS_MARKER)
