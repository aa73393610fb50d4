"""Test set-up: Triton kernels run under the interpreter where there is no CUDA GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before
any lmforge module is imported by a test.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
