r"""How each Hugging Face norm's forward maps onto :func:`layernorm.rms_norm` / :func:`layernorm.layer_norm`.

A *recipe* is one family's formula, written out for every dtype combination it can meet (input dtype
``X``, weight dtype ``W``), so that the replacement returns the dtype and the values the original
class returns. All the Hugging Face forwards below start from ``h = x.float()`` (statistics in
float32, even for float64 input) and differ in where they round and in what dtype they multiply:

==========  ==================================================================  ========================
recipe      the original forward (transformers 5.x)                             output dtype
==========  ==================================================================  ========================
llama       ``w * xhat32.to(X)``                                                promote(W, X)
gemma       ``(xhat32 * (1 + w.float())).to(X)``                                X
olmo2       ``(w * xhat32).to(X)``                                              X
t5          ``xhat = x * rstd32`` (float32); ``xhat.to(W)`` if W is half;       promote(W, xhat)
            ``w * xhat``
cohere      LayerNorm without bias: ``(w.float() * xhat32).to(X)``              X
olmo-ln     ``layer_norm(x.float(), shape, None, None, 1e-5).to(X)``            X
==========  ==================================================================  ========================

Each recipe takes the one fused call that reproduces the formula when the dtypes allow it (the common
cases: ``W == X``, or float32 weights with bfloat16/float16 input where the formula multiplies in
float32), and otherwise an exact decomposition: the weight-free op (statistics and ``xhat`` rounded
once, as the formula does) followed by the formula's own multiply in torch. Combinations no
decomposition covers exactly (float64 weights, T5 with float64 input) run the original class's
forward, so the output is the original's by construction.

Our ops compute statistics in float32 for float32/bfloat16/float16 input and round once; with
``casting_mode="llama"`` they round ``xhat`` to the input dtype before the weight multiply. Those
two facts are what every fast path below rests on.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..functional import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["Recipe", "RECIPES", "recipe_by_key"]

_F32 = torch.float32
_HALF = (torch.float16, torch.bfloat16)
# input dtypes our ops compute in float32 and round once: the precision of the formulas' x.float()
_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _op_weight(weight: Tensor, x_dtype: torch.dtype) -> Tensor:
    """The weight as our op accepts it (the input's dtype, or float32): exact, since a formula that
    multiplies in float32 reads ``w.float()`` and every half value is exactly a float32 value."""
    if weight.dtype == x_dtype or weight.dtype == _F32:
        return weight
    return weight.to(_F32)


def _as_f32(x: Tensor) -> Tensor:
    """float32 view of the input as the formulas' ``x.float()`` (a no-op for float32)."""
    return x if x.dtype == _F32 else x.to(_F32)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One family's norm formula: how a class maps onto layernorm's ops.

    Attributes:
        key: short name used in reports and docs ("llama", "gemma", ...).
        kind: "rms" or "layer".
        offset: added to the weight (Gemma stores ``w`` and multiplies by ``1 + w``).
        casting_mode: the ``casting_mode`` of the fused call when weight and input dtypes agree.
        eps_attr: the instance attribute holding eps, or None when the forward uses a constant.
        eps_constant: that constant (only when ``eps_attr`` is None).
        formula: the original forward in one line, for reports.
        sources: the original ``forward`` (and helper methods it calls) as found in transformers,
            the text the generic source rule compares a class against (see ``registry``).
    """

    key: str
    kind: str
    offset: float
    casting_mode: str
    eps_attr: Optional[str]
    formula: str
    sources: Tuple[str, ...]
    _forward: Callable = dataclasses.field(repr=False, compare=False, default=None)
    eps_constant: Optional[float] = None
    has_weight: bool = True

    def eps(self, module) -> float:
        return self.eps_constant if self.eps_attr is None else getattr(module, self.eps_attr)

    def check(self, module) -> Optional[str]:
        """Why this module's state cannot be mapped (None when it can)."""
        if self.eps_attr is not None:
            eps = getattr(module, self.eps_attr, None)
            if isinstance(eps, bool) or not isinstance(eps, (int, float)):
                return f"its eps attribute {self.eps_attr!r} is {eps!r}, not a number"
        if not self.has_weight:
            shape = getattr(module, "normalized_shape", None)
            if not isinstance(shape, (tuple, list, torch.Size)) or not all(isinstance(s, int) for s in shape):
                return f"its normalized_shape is {shape!r}, not a tuple of ints"
            return None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            return "it has no weight tensor"
        if weight.dim() != 1:
            return (
                f"its weight has shape {tuple(weight.shape)}: a per-head weight over a last dimension of "
                f"{weight.shape[-1]} is not a weight of the normalized shape, which is what our ops take"
            )
        if not weight.dtype.is_floating_point:
            return f"its weight has dtype {weight.dtype}"
        return None

    def describe(self) -> str:
        """The mapping in one line: the call we make and where eps comes from."""
        op = "rms_norm" if self.kind == "rms" else "layer_norm"
        args = []
        if self.offset:
            args.append(f"offset={self.offset:g}")
        if self.casting_mode != "torch":
            args.append(f"casting_mode={self.casting_mode!r}")
        eps = f"eps=.{self.eps_attr}" if self.eps_attr else f"eps={self.eps_constant:g}"
        return f"{op}({', '.join(args + [eps])})"

    def forward(self, module, x: Tensor, backend: Optional[str]) -> Tensor:
        """The original class's output for ``x`` through our ops, or ``NotImplemented`` for a dtype
        combination no exact decomposition covers (the caller then runs the original forward)."""
        return self._forward(self, module, x, backend)

    def forward_add(self, module, x: Tensor, residual: Tensor, backend: Optional[str]) -> Tuple[Tensor, Tensor]:
        """``(norm(residual + x), residual + x)``, in one fused op when that is exact (``norm`` may be
        ``NotImplemented``, as for :meth:`forward`).

        The fused ops round the sum to the input dtype before normalizing it, as ``residual + x``
        does, so the fused call is the plain one applied to the same rounded sum: it is taken exactly
        when the plain forward's fast path is (same dtypes, W == X)."""
        if x.dtype == residual.dtype and x.device == residual.device and x.dtype in _OP_DTYPES:
            eps = self.eps(module)
            w = module.weight if self.has_weight else None
            if self.kind == "rms" and w is not None and w.dtype == x.dtype:
                return add_rms_norm(
                    x, residual, w.shape, w, eps, offset=self.offset, casting_mode=self.casting_mode, backend=backend
                )
            if self.kind == "layer" and (w is None or w.dtype == x.dtype):
                shape = w.shape if w is not None else tuple(module.normalized_shape)
                return add_layer_norm(x, residual, shape, w, None, eps, backend=backend)
        total = residual + x
        return self.forward(module, total, backend), total


# --- the formulas, one function each: NotImplemented means "run the original forward" -------------


def _llama(recipe: Recipe, m, x: Tensor, backend):
    w, eps = m.weight, recipe.eps(m)
    shape = w.shape
    if x.dtype in _OP_DTYPES and w.dtype == x.dtype:
        return rms_norm(x, shape, w, eps, casting_mode="llama", backend=backend)
    if w.dtype == torch.float64:
        return NotImplemented
    if x.dtype in _OP_DTYPES:
        # xhat rounded once to X (what ``.to(input_dtype)`` does), then the formula's multiply,
        # whose result has promote(W, X): e.g. float32 weights with bfloat16 input give float32.
        return w * rms_norm(x, shape, None, eps, backend=backend)
    if x.dtype == torch.float64:  # the formula computes in float32 and converts back
        return w * rms_norm(x.to(_F32), shape, None, eps, backend=backend).to(x.dtype)
    return NotImplemented


def _scale_fp32(recipe: Recipe, m, x: Tensor, backend):
    """gemma and olmo2: xhat32 times the weight in float32, rounded once to X."""
    w, eps = m.weight, recipe.eps(m)
    if w.dtype == torch.float64:  # olmo2 would multiply in float64
        return NotImplemented
    if x.dtype in _OP_DTYPES:
        return rms_norm(x, w.shape, _op_weight(w, x.dtype), eps, offset=recipe.offset, backend=backend)
    if x.dtype == torch.float64:
        y = rms_norm(x.to(_F32), w.shape, w.to(_F32), eps, offset=recipe.offset, backend=backend)
        return y.to(x.dtype)
    return NotImplemented


def _t5(recipe: Recipe, m, x: Tensor, backend):
    w, eps = m.weight, recipe.eps(m)
    if x.dtype not in _OP_DTYPES:  # float64 input: x64 * rstd32 has no float32-op equivalent
        return NotImplemented
    if w.dtype in _HALF:
        if w.dtype == x.dtype:
            # xhat rounded to W (== X), times w: a half x half product is exact in float32, so the
            # op's float32 multiply rounded once equals torch's half multiply
            return rms_norm(x, w.shape, w, eps, casting_mode="llama", backend=backend)
        return w * rms_norm(_as_f32(x), w.shape, None, eps, backend=backend).to(w.dtype)
    if w.dtype == _F32:  # xhat in float32 times a float32 weight: a float32 result
        return rms_norm(_as_f32(x), w.shape, w, eps, backend=backend)
    return NotImplemented


def _cohere(recipe: Recipe, m, x: Tensor, backend):
    w, eps = m.weight, recipe.eps(m)
    if x.dtype in _OP_DTYPES:
        return layer_norm(x, w.shape, _op_weight(w, x.dtype), None, eps, backend=backend)
    if x.dtype == torch.float64:
        return layer_norm(x.to(_F32), w.shape, w.to(_F32), None, eps, backend=backend).to(x.dtype)
    return NotImplemented


def _olmo_ln(recipe: Recipe, m, x: Tensor, backend):
    shape = tuple(m.normalized_shape)
    if x.dtype in _OP_DTYPES:
        return layer_norm(x, shape, None, None, recipe.eps_constant, backend=backend)
    if x.dtype == torch.float64:
        return layer_norm(x.to(_F32), shape, None, None, recipe.eps_constant, backend=backend).to(x.dtype)
    return NotImplemented


# --- the original sources (transformers 5.24), as the source rule compares them --------------------
# Annotations, docstrings and comments are ignored by the comparison, and the class's own name is
# replaced by CLS, so these cover the classes that are copies of one another ("Copied from Llama").

_LLAMA_SRC = '''
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
'''

_GEMMA_SRC = '''
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)

def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
'''

_OLMO2_SRC = '''
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight * hidden_states).to(input_dtype)
'''

_T5_SRC = '''
def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
'''

_COHERE_SRC = '''
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    mean = hidden_states.mean(-1, keepdim=True)
    variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
    hidden_states = (hidden_states - mean) * torch.rsqrt(variance + self.variance_epsilon)
    hidden_states = self.weight.to(torch.float32) * hidden_states
    return hidden_states.to(input_dtype)
'''

_OLMO_LN_SRC = '''
def forward(self, hidden_states):
    orig_dtype = hidden_states.dtype
    return F.layer_norm(hidden_states.to(dtype=torch.float32), self.normalized_shape, None, None, eps=1e-05).to(orig_dtype)
'''

RECIPES: Tuple[Recipe, ...] = (
    Recipe("llama", "rms", 0.0, "llama", "variance_epsilon", "w * xhat32.to(X)", (_LLAMA_SRC,), _llama),
    Recipe("gemma", "rms", 1.0, "torch", "eps", "(xhat32 * (1 + w.float())).to(X)", (_GEMMA_SRC,), _scale_fp32),
    Recipe("olmo2", "rms", 0.0, "torch", "variance_epsilon", "(w * xhat32).to(X)", (_OLMO2_SRC,), _scale_fp32),
    Recipe("t5", "rms", 0.0, "llama", "variance_epsilon", "w * (x * rstd32).to(W if W is half)", (_T5_SRC,), _t5),
    Recipe("cohere", "layer", 0.0, "torch", "variance_epsilon", "(w.float() * xhat32).to(X), no bias",
           (_COHERE_SRC,), _cohere),
    Recipe("olmo-ln", "layer", 0.0, "torch", None, "layer_norm(x.float(), no weight, eps 1e-5).to(X)",
           (_OLMO_LN_SRC,), _olmo_ln, eps_constant=1e-5, has_weight=False),
)

_BY_KEY = {r.key: r for r in RECIPES}


def recipe_by_key(key: str) -> Recipe:
    try:
        return _BY_KEY[key]
    except KeyError:
        raise ValueError(f"recipe must be one of {sorted(_BY_KEY)}, but got {key!r}") from None
