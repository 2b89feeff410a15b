"""Drop-in modules: :class:`LayerNorm` and :class:`RMSNorm` (:func:`layernorm.patch` swaps them into models).

They subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` so the constructor arguments, parameter
names and ``state_dict`` keys are torch's own: checkpoints load both ways, and ``isinstance`` checks in
user code keep working. The only addition is ``backend=``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from ..backends import BACKENDS

__all__ = ["LayerNorm", "RMSNorm"]


def _check_backend_name(backend: Optional[str]) -> Optional[str]:
    """None for the automatic choice ("auto" included), else a known backend name."""
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS) + ['auto']} or None, but got {backend!r}")
    return None if backend == "auto" else backend


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization over the last ``len(normalized_shape)`` dimensions.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Mean and (biased) variance are computed per sample over the normalized dimensions, in float32
    (float64 for float64 input), the same way in training and evaluation.

    Args:
        normalized_shape: int or tuple, the trailing shape to normalize over.
        eps: added to the variance for numerical stability. Default: 1e-5.
        elementwise_affine: learnable per-element gain (ones) and, if ``bias``, shift (zeros).
        bias: whether to learn the shift. Default: True.
        backend: ``"reference"``, ``"cpu"``, ``"torch"``, ``"triton"``, or None for automatic choice.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`
        - Output: same shape as the input.

    Example::

        >>> ln = LayerNorm(512)
        >>> y = ln(torch.randn(8, 20, 512))
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = _check_backend_name(backend)

    def forward(self, input: Tensor) -> Tensor:
        # TorchScript compiles this call to the operator layernorm::layer_norm (a backend override is
        # an eager-mode choice: a scripted module always runs the operator)
        if self.backend is None or torch.jit.is_scripting():
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._forward_with_backend(input)

    @torch.jit.unused
    def _forward_with_backend(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend or 'auto'}"


class RMSNorm(nn.RMSNorm):
    r"""Root-mean-square normalization over the last ``len(normalized_shape)`` dimensions.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} * \gamma

    Args:
        normalized_shape: int or tuple, the trailing shape to normalize over.
        eps: added inside the square root; None means torch's default (the machine epsilon of
            float32, float64's for float64 input).
        elementwise_affine: learnable per-element gain initialised to ones.
        backend: ``"reference"``, ``"cpu"``, ``"torch"``, ``"triton"``, or None for automatic choice.

    Example::

        >>> norm = RMSNorm(512)
        >>> y = norm(torch.randn(8, 20, 512))
    """

    def __init__(
        self,
        normalized_shape,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.backend = _check_backend_name(backend)

    def forward(self, input: Tensor) -> Tensor:
        if self.backend is None or torch.jit.is_scripting():  # scripted: the operator layernorm::rms_norm
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return self._forward_with_backend(input)

    @torch.jit.unused
    def _forward_with_backend(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend or 'auto'}"
