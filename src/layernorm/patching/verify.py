"""Every swap is checked before it is made: the replacement must give the original's output, dtype
and gradients on a probe input, or the module stays as it is and the report says why.

The probe is a copy of the module's state with *random* parameters of the same shapes, dtypes and
device (the real ones are often all ones or all zeros, under which a wrong casting or a missing
``1 +`` would go unseen), fed with rows at several scales, among them a row of zeros and a row at
1e-3 whose mean square is of the order of the eps of the Hugging Face classes, so that an eps read
from the wrong attribute shows. It runs in every input dtype the module can meet in practice (its
parameters' dtype, float32, bfloat16, float16: models keep some layers in float32, autocast feeds
bfloat16 into float32 modules) and under ``torch.autocast`` with bfloat16 (float64 modules: float64
only). Forward and backward (gradients of the input and of every parameter) are compared.

Tolerances per dtype (the coarsest of the compared tensor's, the input's, autocast's, and float32 for
the Hugging Face formulas, which compute in float32 even for float64 input: a value carries the
rounding of every dtype it went through), (rtol, atol): the numbers of the test-suite's table
(tests/tolerances.py), for the same reasons written there. atol is relative to a scale: the largest
magnitude of the output or of the weight (a norm's rows are all O(weight)), of a parameter gradient, and for an input
gradient, per row, the size of the terms it is computed from (|g| |w| rstd, estimated as
|g| |y| / rms(x)): those terms cancel, completely for a single column, and what is left is rounding.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Verification", "verify_swap", "verify_fused_add", "FORWARD_TOL", "BACKWARD_TOL"]

FORWARD_TOL: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 8e-3),
    torch.float16: (1e-3, 1e-3),
}
BACKWARD_TOL: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 5e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (1e-3, 2e-3),
}

_ROW_SCALES = (1.0, 3.0, 1e-3, 0.0, 40.0, 0.25)  # x rows: typical, offset mean, eps-sized, zero, large, small
_ROW_MEANS = (0.0, 2.0, 0.0, 0.0, 0.0, 0.1)
_SEED = 20240612


@dataclasses.dataclass
class Verification:
    """Outcome of a probe comparison. ``max_error`` maps each probe ("float32", "bfloat16",
    "autocast(bfloat16) float32", ...) to the largest error relative to its tolerance (<= 1 passes)."""

    ok: bool
    reason: str = ""
    max_error: Dict[str, float] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)


_COARSENESS = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _tol(table, *dtypes) -> Tuple[float, float]:
    """The tolerance of the coarsest dtype a value went through: a float32 output computed from
    bfloat16 input (Llama's float32 weight times a bfloat16 xhat) carries bfloat16 rounding, and a
    float32 weight gradient of float16 activations carries float16's."""
    coarsest = max((d for d in dtypes if d in _COARSENESS), key=_COARSENESS.__getitem__, default=torch.float32)
    return table[coarsest]


def _close(actual: Tensor, expected: Tensor, tol: Tuple[float, float], scale: Tensor) -> float:
    """Largest |actual - expected| / (rtol |expected| + atol * scale): <= 1 means within tolerance.
    Non-finite values must match exactly (NaN with NaN, inf with the same inf)."""
    rtol, atol = tol
    a, e = actual.detach().double(), expected.detach().double()
    if a.numel() == 0:
        return 0.0
    nonfinite = ~torch.isfinite(e)
    if bool((torch.isfinite(a) == nonfinite).any()):
        return float("inf")
    same_nonfinite = (a[nonfinite] == e[nonfinite]) | (torch.isnan(a[nonfinite]) & torch.isnan(e[nonfinite]))
    if not bool(same_nonfinite.all()):
        return float("inf")
    a, e = torch.where(nonfinite, 0.0, a), torch.where(nonfinite, 0.0, e)
    bound = rtol * e.abs() + atol * scale.double()
    diff = (a - e).abs()
    ratio = torch.where(bound > 0, diff / torch.where(bound > 0, bound, 1.0), torch.where(diff > 0, torch.inf, 0.0))
    return float(ratio.max())


def _tensor_scale(t: Tensor) -> Tensor:
    """The largest magnitude of ``t``: the scale of a norm's output (every row is O(weight)), and of a
    parameter gradient (a sum over rows)."""
    finite = torch.where(torch.isfinite(t), t.detach().double().abs(), 0.0)
    return finite.max() if finite.numel() else finite.new_zeros(())


def _input_grad_scale(grad: Tensor, x: Tensor, outs, gs) -> Tensor:
    """Per row, the magnitude of the terms an input gradient is made of. A norm's dx is
    rstd * (g*w - xhat * mean(g*w*xhat)) (minus mean(g*w) for LayerNorm): terms of size |g| |w| rstd,
    which cancel (fully for a single column, where dx is rounding noise around a value ~eps/x^2).
    |g| |y| / rms(x) estimates |g| |w| rstd from the outputs, for any norm; rows of zeros (rms 0)
    and the gradient's own magnitude keep their say."""
    gd = grad.detach().double().abs()
    scale = gd.amax(dim=-1, keepdim=True) if gd.dim() else gd
    xd = x.detach().double()
    rms = xd.square().mean(dim=-1, keepdim=True).sqrt() if xd.dim() else xd.abs()
    for o, g in zip(outs, gs):
        if o.shape != x.shape:
            continue
        od, g_d = o.detach().double(), g.double()
        term = g_d.abs().amax(dim=-1, keepdim=True) * torch.where(torch.isfinite(od), od.abs(), 0.0).amax(
            dim=-1, keepdim=True)
        scale = torch.maximum(scale, torch.where(rms > 0, term / torch.where(rms > 0, rms, 1.0), 0.0))
    return scale


def _generator_tensor(shape, gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _probe_input(shape, dtype, device, gen) -> Tensor:
    rows = len(_ROW_SCALES)
    base = _generator_tensor((rows,) + tuple(shape), gen)
    scale = torch.tensor(_ROW_SCALES, dtype=torch.float64).view((rows,) + (1,) * len(shape))
    mean = torch.tensor(_ROW_MEANS, dtype=torch.float64).view((rows,) + (1,) * len(shape))
    x = (base * scale + mean * (scale > 0)).view((2, rows // 2) + tuple(shape))
    return x.to(device=device, dtype=dtype).requires_grad_(True)


def _probe_state(module: nn.Module, device, gen) -> dict:
    """The module's instance state with random parameters (same shapes, dtypes) on ``device``."""
    state = dict(module.__dict__)
    params = {}
    for name, p in module._parameters.items():
        if p is None:
            params[name] = None
            continue
        values = 0.5 + 0.75 * _generator_tensor(tuple(p.shape), gen)  # mostly positive, some negative
        params[name] = nn.Parameter(values.to(device=device, dtype=p.dtype))
    state["_parameters"] = params
    buffers = {}
    for name, b in module._buffers.items():
        if b is None or b.device.type == "meta":
            buffers[name] = None if b is None else torch.zeros(b.shape, dtype=b.dtype, device=device)
        else:
            buffers[name] = b.detach().clone().to(device)
    state["_buffers"] = buffers
    for name, value in module.__dict__.items():  # the probe runs no hooks of the real module
        if "hooks" in name and isinstance(value, dict):
            state[name] = type(value)()
    return state


def _probe_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _probe_shape(module: nn.Module) -> Tuple[int, ...]:
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(s, int) for s in shape):
        return tuple(shape)
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() >= 1:
        return (weight.shape[-1],)
    raise ValueError("cannot tell the normalized shape")


def _param_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for p in module.parameters(recurse=False):
        return p.dtype
    return None


def _probe_cases(module: nn.Module, device: torch.device):
    """(label, input dtype, autocast dtype or None) for every probe: the parameters' dtype, and for
    float32/bfloat16/float16 parameters the other two of these (mixed precision meets all three:
    autocast feeds bfloat16 into float32 modules, models keep some layers in float32), plus autocast.
    A float64 module is probed in float64 only."""
    param_dtype = _param_dtype(module)
    dtypes = [param_dtype] if param_dtype is not None else []
    if param_dtype in (None, torch.float32, torch.bfloat16, torch.float16):
        dtypes += [dt for dt in (torch.float32, torch.bfloat16, torch.float16) if dt not in dtypes]
    cases = [(str(dt).replace("torch.", ""), dt, None) for dt in dtypes]
    if param_dtype != torch.float64:
        for dt in (torch.float32, torch.bfloat16):
            cases.append((f"autocast(bfloat16) {str(dt).replace('torch.', '')}", dt, torch.bfloat16))
    return cases


def _run(fn, inputs: Tuple[Tensor, ...], params: List[Tensor], grad_seed: int, autocast_dtype):
    """Outputs (a tuple), the gradients of inputs and params, and the random output gradients used."""
    ctx = torch.autocast(inputs[0].device.type, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    with torch.enable_grad(), ctx:
        out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        if not isinstance(o, Tensor):
            raise TypeError(f"returned {type(o).__name__}, not a tensor")
    gen = torch.Generator().manual_seed(grad_seed)
    gs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype) for o in outs]
    diff = [(o, g) for o, g in zip(outs, gs) if o.requires_grad]
    wrt = list(inputs) + params
    if not diff:
        return outs, [None] * len(wrt), gs
    grads = torch.autograd.grad([o for o, _ in diff], wrt, [g for _, g in diff], allow_unused=True)
    return outs, list(grads), gs


def _compare_calls(original_fn, patched_fn, input_names, param_names, params, make_inputs, cases,
                   computes_in: Optional[torch.dtype] = None) -> Verification:
    """Runs both callables on every probe case and compares outputs and gradients. ``computes_in``:
    a dtype the original computes in whatever the input (float32 for the Hugging Face formulas, which
    start from ``x.float()``), so float64 probes are judged at its precision."""
    result = Verification(ok=True)
    # a norm's output is O(weight) per row, also where a degenerate row (a single column of LayerNorm)
    # gives exactly 0 in one implementation and a few ulps of that scale in the other
    weight_scale = max((float(_tensor_scale(p)) for p in params), default=1.0)
    weight_scale = torch.tensor(weight_scale if weight_scale > 0 else 1.0, dtype=torch.float64)

    def refuse(reason):
        return Verification(False, reason, result.max_error, result.notes)

    for i, (label, dtype, autocast_dtype) in enumerate(cases):
        inputs = make_inputs(dtype, i)
        try:
            ref_outs, ref_grads, gs = _run(original_fn, inputs, params, i, autocast_dtype)
        except Exception as exc:  # noqa: BLE001 - the original cannot run this case: nothing to compare
            result.notes.append(f"{label}: the original raises {type(exc).__name__}, not compared")
            continue
        try:
            outs, grads, _ = _run(patched_fn, make_inputs(dtype, i), params, i, autocast_dtype)
        except Exception as exc:  # noqa: BLE001 - any failure of ours refuses the swap
            return refuse(f"on a {label} probe the replacement raises {type(exc).__name__}: {exc}")
        computed_in = tuple(d for d in (dtype, autocast_dtype, computes_in) if d is not None)
        if len(outs) != len(ref_outs):
            return refuse(f"on a {label} probe the replacement returns {len(outs)} tensors, the original {len(ref_outs)}")
        worst, what = 0.0, ""
        for k, (o, ref) in enumerate(zip(outs, ref_outs)):
            name = "output" if len(outs) == 1 else f"output {k}"
            if o.dtype != ref.dtype or o.shape != ref.shape:
                return refuse(f"on a {label} probe the {name} is {o.dtype} {tuple(o.shape)}, the original's "
                              f"{ref.dtype} {tuple(ref.shape)}")
            err = _close(o, ref, _tol(FORWARD_TOL, o.dtype, *computed_in), torch.maximum(_tensor_scale(ref), weight_scale))
            if err >= worst:
                worst, what = err, name
        names = [f"{n} gradient" for n in input_names + param_names]
        for j, (name, g, g_ref) in enumerate(zip(names, grads, ref_grads)):
            if (g is None) != (g_ref is None):
                return refuse(f"on a {label} probe the {name} is {'missing' if g is None else 'present'} "
                              "(the original's is not)")
            if g is None:
                continue
            scale = _input_grad_scale(g_ref, inputs[j], ref_outs, gs) if j < len(inputs) else _tensor_scale(g_ref)
            err = _close(g, g_ref, _tol(BACKWARD_TOL, g.dtype, *computed_in), scale)
            if err > worst:
                worst, what = err, name
        result.max_error[label] = worst
        if not worst <= 1.0:
            return refuse(f"on a {label} probe the {what} differs from the original's by {worst:.3g}x the tolerance")
    return result


def _probe_pair(module: nn.Module, new_cls: type, attributes: dict):
    """Two views of one random-parameter probe state: as the original class and as ``new_cls``."""
    device = _probe_device(module)
    state = _probe_state(module, device, torch.Generator().manual_seed(_SEED))
    original = type(module).__new__(type(module))
    original.__dict__.update(state)
    patched = new_cls.__new__(new_cls)
    patched.__dict__ = original.__dict__  # one state, two classes
    for name, value in attributes.items():
        object.__setattr__(patched, name, value)
    names = [n for n, p in state["_parameters"].items() if p is not None]
    return original, patched, names, [state["_parameters"][n] for n in names], device


def _meta_note(module: nn.Module, device: torch.device) -> List[str]:
    if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        return [f"parameters on meta: probed on {device.type}"]
    return []


def verify_swap(module: nn.Module, new_cls: type, attributes: dict,
                computes_in: Optional[torch.dtype] = None) -> Verification:
    """Compares ``type(module).forward`` with ``new_cls.forward`` on probes (see the module docstring);
    ``attributes`` are the instance attributes the swap adds; ``computes_in`` as in ``_compare_calls``."""
    try:
        shape = _probe_shape(module)
    except ValueError as exc:
        return Verification(False, str(exc))
    original, patched, names, params, device = _probe_pair(module, new_cls, attributes)

    def make_inputs(dtype, i):
        return (_probe_input(shape, dtype, device, torch.Generator().manual_seed(_SEED + 1 + i)),)

    result = _compare_calls(
        lambda x: type(module).forward(original, x), lambda x: new_cls.forward(patched, x),
        ["input"], names, params, make_inputs, _probe_cases(module, device), computes_in)
    result.notes += _meta_note(module, device)
    return result


def verify_fused_add(norm: nn.Module) -> Verification:
    """Compares the fused ``norm._layernorm_forward_add(x, residual)`` with the unfused code of the
    decoder layers (``total = residual + x; (norm(total), total)``) on probes. ``norm`` is already
    patched: its own forward was verified against the original's when it was swapped."""
    shape = _probe_shape(norm)
    _, probe, names, params, device = _probe_pair(norm, type(norm), {})

    def make_inputs(dtype, i):
        g = torch.Generator().manual_seed(_SEED + 1 + i)
        return _probe_input(shape, dtype, device, g), _probe_input(shape, dtype, device, g)

    def unfused(x, residual):
        total = residual + x
        return type(probe).forward(probe, total), total

    cases = [c for c in _probe_cases(norm, device) if c[2] is None]
    return _compare_calls(unfused, probe._layernorm_forward_add, ["input", "residual"], names, params,
                          make_inputs, cases, computes_in=torch.float32)
