"""Kernel tests: torch is required; Triton runs under its interpreter on machines without CUDA.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set here, at
collection, when no CUDA device is present (on a GPU machine the kernels run compiled).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("torch") is None:  # the whole directory needs torch
    collect_ignore = ["test_kernel_ops.py", "test_kernel_triton.py"]
else:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def torch_gen():
    return torch.Generator().manual_seed(0)
