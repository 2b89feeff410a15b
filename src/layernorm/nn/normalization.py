"""Drop-in modules: :class:`LayerNorm` and :class:`RMSNorm`, plus :func:`patch`.

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

__all__ = ["LayerNorm", "RMSNorm", "patch"]


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


def _convert(module: nn.Module, backend: Optional[str]) -> Optional[nn.Module]:
    if isinstance(module, (LayerNorm, RMSNorm)):
        if backend is not None:
            module.backend = backend
        return None
    if isinstance(module, nn.LayerNorm):
        new = LayerNorm.__new__(LayerNorm)
    elif isinstance(module, nn.RMSNorm):
        new = RMSNorm.__new__(RMSNorm)
    else:
        return None
    # Take over the instance state (parameters, buffers, hooks, training flag) without copying:
    # weights, device and dtype stay exactly as they were, and optimizers keep their references.
    new.__dict__.update(module.__dict__)
    new.backend = backend
    return new


def patch(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Replace every ``nn.LayerNorm`` / ``nn.RMSNorm`` inside ``model`` with ours, in place.

    Parameters are kept as the same tensor objects (device, dtype and optimizer state untouched).
    Returns ``model`` (or the replacement, when ``model`` itself is a norm layer).

    Example::

        >>> model = nn.TransformerEncoderLayer(256, 4)
        >>> patch(model)  # its norm1/norm2 now run layernorm's kernels
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    _check_backend_name(backend)
    top = _convert(model, backend)
    if top is not None:
        return top
    replaced = {}  # a norm shared by several parents is replaced by one shared module
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in replaced:
                replaced[id(child)] = _convert(child, backend)
            if replaced[id(child)] is not None:
                parent._modules[name] = replaced[id(child)]
    return model
