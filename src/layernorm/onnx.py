"""ONNX export of the operators as ONNX's own normalization nodes.

``torch.onnx.export(..., dynamo=True)`` keeps ``layernorm::*`` operators in the exported program; this
table tells it what each one is in ONNX: ``LayerNormalization`` (opset 17) and ``RMSNormalization``
(opset 23; below opset 23 the same maths from primitive nodes). The residual add of the fused ops is an
``Add`` before the norm.

Example::

    >>> import layernorm, layernorm.onnx
    >>> model = layernorm.patch(torch.nn.TransformerEncoderLayer(64, 4, batch_first=True).eval())
    >>> program = torch.onnx.export(model, (torch.randn(2, 5, 64),), dynamo=True, opset_version=23,
    ...                             custom_translation_table=layernorm.onnx.translation_table(23))

Needs ``onnxscript`` (a dependency of torch's dynamo ONNX exporter).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = ["translation_table"]


def translation_table(opset_version: Optional[int] = None) -> Dict[Callable, Callable]:
    """``custom_translation_table`` for :func:`torch.onnx.export` with ``dynamo=True``.

    ``opset_version`` must be the one given to the export (None: torch's default, 18). RMSNorm becomes
    an ``RMSNormalization`` node from opset 23 on, and ``Pow``/``ReduceMean``/``Sqrt``/``Div``/``Mul``
    below it.
    """
    from onnxscript import ir
    from onnxscript import opset18 as op18

    if opset_version is None:
        opset_version = 18
    if opset_version < 17:
        raise ValueError(f"opset_version must be >= 17 (ONNX LayerNormalization), but got {opset_version}")
    if opset_version >= 23:
        from onnxscript.onnx_opset import opset23 as op_rms
    else:
        op_rms = None
    from onnxscript.onnx_opset import opset17 as op17

    def ones_like_trailing(x, start_axis):
        return op18.Expand(op18.Constant(value=ir.tensor(1, dtype=x.dtype)), op18.Shape(x, start=start_axis))

    def layer_norm(input, normalized_shape: Sequence[int], weight=None, bias=None, eps: float = 1e-5):
        axis = -len(normalized_shape)
        if weight is None:
            weight = ones_like_trailing(input, axis)
        y, _, _ = op17.LayerNormalization(input, weight, bias, axis=axis, epsilon=eps)
        return y

    def rms_norm(input, normalized_shape: Sequence[int], weight=None, eps: Optional[float] = None,
                 offset: float = 0.0, round_normalized: bool = False):
        axis = -len(normalized_shape)
        if eps is None:  # torch's default: float32's machine epsilon (float64's for double input)
            eps = float(torch.finfo(torch.float64 if input.dtype == ir.DataType.DOUBLE else torch.float32).eps)
        scale = weight
        if scale is not None and offset != 0.0:
            scale = op18.Add(op18.Cast(scale, to=ir.DataType.FLOAT), op18.Constant(value_float=offset))
        if round_normalized and scale is not None:
            # Llama's casting: xhat rounded to the input dtype, then the weight multiply in that dtype
            xhat = _rms(input, ones_like_trailing(input, axis), axis, eps)
            return op18.Mul(xhat, op18.CastLike(scale, input))
        if scale is None:
            scale = ones_like_trailing(input, axis)
        if scale.dtype != input.dtype:
            y = _rms(op18.Cast(input, to=ir.DataType.FLOAT), scale, axis, eps)
            return op18.CastLike(y, input)
        return _rms(input, scale, axis, eps)

    def _rms(x, scale, axis, eps):
        if op_rms is not None:
            return op_rms.RMSNormalization(x, scale, axis=axis, epsilon=eps)
        xf = op18.Cast(x, to=ir.DataType.FLOAT) if x.dtype != ir.DataType.DOUBLE else x
        axes = op18.Constant(value_ints=list(range(axis, 0)))
        mean_sq = op18.ReduceMean(op18.Mul(xf, xf), axes, keepdims=1)
        eps_c = op18.CastLike(op18.Constant(value_float=eps), xf)
        y = op18.Div(xf, op18.Sqrt(op18.Add(mean_sq, eps_c)))
        return op18.Mul(op18.CastLike(y, x), op18.CastLike(scale, x))

    def add_layer_norm(input, residual, normalized_shape: Sequence[int], weight=None, bias=None, eps: float = 1e-5):
        total = op18.Add(input, residual)
        return layer_norm(total, normalized_shape, weight, bias, eps), total

    def add_rms_norm(input, residual, normalized_shape: Sequence[int], weight=None, eps: Optional[float] = None,
                     offset: float = 0.0, round_normalized: bool = False):
        total = op18.Add(input, residual)
        return rms_norm(total, normalized_shape, weight, eps, offset, round_normalized), total

    ops = torch.ops.layernorm
    return {
        ops.layer_norm.default: layer_norm,
        ops.rms_norm.default: rms_norm,
        ops.add_layer_norm.default: add_layer_norm,
        ops.add_rms_norm.default: add_rms_norm,
    }
