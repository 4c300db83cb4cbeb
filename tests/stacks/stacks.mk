# Separate venv running the RELEASED serving stacks, and megatron-core's MoE router, (CPU only)
# for conformance tests (tests/stacks/). Never installs into the main .venv. Include from the Makefile:
#     include tests/stacks/stacks.mk
# and make the test target depend on $(STACKS_MARKER) where the stacks tests must run (CI).
#
# torch goes in FIRST, alone, pinned exactly (a range pulls a multi-GB CUDA build); the
# stacks themselves go in with --no-deps (their requirement lists pull CUDA wheels), then
# the packages their import paths need, from exact freezes installed --no-deps together
# (one consistent set: where both stacks need a package the pins agree, inside vLLM's bounds;
# megatron-core 0.16.1 needs only torch, numpy and packaging, at the same pins).

STACKS_VENV   := .venv-stacks
STACKS_PY     := $(STACKS_VENV)/bin/python
STACKS_PIP    := $(STACKS_PY) -m pip
STACKS_MARKER := $(STACKS_VENV)/.installed
STACKS_TORCH  ?= torch==2.13.0
# a local wheel path works too: make SGLANG_SPEC=/path/sglang-0.5.23-...whl
SGLANG_SPEC   ?= sglang==0.5.23
VLLM_SPEC     ?= vllm==0.34.0
MEGATRON_SPEC ?= megatron-core==0.16.1
# vllm-ascend's sdist cannot be built here (Ascend toolchain): its pure-Python EPLB modules are
# loaded from the unpacked release source (tests/stacks/vllm_ascend_probe.py).
VLLM_ASCEND_VERSION := 0.23.0.post1
VLLM_ASCEND_SHA256  := a3b9f4a5dd7aa50c37e03d1f35937c4ae5aeacc49b734cac74d59ce5757738e1
VLLM_ASCEND_SRC     := $(STACKS_VENV)/src/vllm_ascend-$(VLLM_ASCEND_VERSION)

$(STACKS_MARKER): tests/stacks/requirements-sglang.txt tests/stacks/requirements-vllm.txt \
		tests/stacks/requirements-megatron.txt tests/stacks/fetch_sdist.py
	test -x $(STACKS_PY) || python3 -m venv $(STACKS_VENV)
	$(STACKS_PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
		|| $(STACKS_PIP) install $(STACKS_TORCH)
	$(STACKS_PIP) install --no-deps $(SGLANG_SPEC) $(VLLM_SPEC) $(MEGATRON_SPEC)
	$(STACKS_PIP) install --no-deps -r tests/stacks/requirements-sglang.txt -r tests/stacks/requirements-vllm.txt \
		-r tests/stacks/requirements-megatron.txt
	test -d $(VLLM_ASCEND_SRC) || $(STACKS_PY) tests/stacks/fetch_sdist.py vllm-ascend $(VLLM_ASCEND_VERSION) \
		$(VLLM_ASCEND_SHA256) $(STACKS_VENV)/src
	touch $@

.PHONY: stacks-venv
stacks-venv: $(STACKS_MARKER)
