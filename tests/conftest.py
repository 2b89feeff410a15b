"""Shared fixtures: the backends to test, seeded inputs, hypothesis profile."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Without CUDA the Triton backend is tested through its interpreter (tests/test_backend_triton.py).
# The interpreter is chosen when triton is first imported, and `import layernorm` imports it (through
# torch._dynamo), so the variable must be set here, before that import. `import torch` alone does not.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import layernorm  # noqa: E402

# Every backend that runs on CPU tensors here. Triton under TRITON_INTERPRET=1 is slow and has its
# own test file, so it is left out of this (broad) suite.
CPU_BACKENDS = [b for b in layernorm.available_backends("cpu") if b != "triton"]

settings.register_profile("fast", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    # Tests choose backends explicitly; an exported LAYERNORM_BACKEND must not change what they test.
    monkeypatch.delenv("LAYERNORM_BACKEND", raising=False)
    torch.manual_seed(0)
    yield
