"""The backend choice as a constant for ``torch.compile``: imported only while dynamo traces, because
``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (about a second), which a plain
``import layernorm`` must not pay."""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import resolve


@torch.compiler.assume_constant_result
def resolve_constant(backend: Optional[str], device_type: str, dtype: torch.dtype) -> str:
    return resolve(backend, device_type, dtype)
