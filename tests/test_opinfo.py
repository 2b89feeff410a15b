"""torch's own test material for these ops (OpInfo): every sample input of ``nn.functional.layer_norm``,
``nn.functional.rms_norm`` and ``native_layer_norm`` on CPU in float32/float64/bfloat16/float16, forward
and gradients, and every error input.

A sample passes when ours equals torch's result within ``torch.testing``'s default tolerance for the
dtype, or is at least as close as torch's to the same op evaluated in float64 (torch's low-precision
kernels are not the truth either). Error inputs must raise torch's exception type, matching its regex.
"""
from __future__ import annotations

import pytest
import torch

import layernorm

pytest.importorskip("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

OURS = {
    "nn.functional.layer_norm": layernorm.layer_norm,
    "nn.functional.rms_norm": layernorm.rms_norm,
    "native_layer_norm": layernorm.ops.native_layer_norm,
}
OPINFOS = {o.name: o for o in op_db if o.name in OURS and not o.variant_test_name}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _outputs(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _as_float64(sample):
    def up(t):
        return t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
    return up(sample.input), [up(a) for a in sample.args], {k: up(v) for k, v in sample.kwargs.items()}


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def _close_or_closer(ours, theirs, ref64, what):
    """torch.testing's default closeness to torch, or an error vs float64 no larger than torch's."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    try:
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    except AssertionError:
        ours_err, torch_err = _max_err(ours, ref64), _max_err(theirs, ref64)
        assert ours_err <= torch_err * (1 + 1e-6) + 1e-12, (
            f"{what}: differs from torch beyond torch.testing's defaults, and its error vs float64 "
            f"({ours_err:.3g}) exceeds torch's ({torch_err:.3g})")


def _grads(outs, leaves, seed):
    diff = [o for o in outs if o.requires_grad]
    if not diff or not leaves:
        return None
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in diff]
    return torch.autograd.grad(diff, leaves, cot, allow_unused=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OURS))
def test_every_sample_input(name, dtype):
    op = OPINFOS[name]
    ours_fn = OURS[name]
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples, f"no OpInfo samples for {name}"
    for i, sample in enumerate(samples):
        leaves = [t for t in [sample.input, *sample.args, *sample.kwargs.values()]
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        ours = _outputs(ours_fn(sample.input, *sample.args, **sample.kwargs))
        theirs = _outputs(op.op(sample.input, *sample.args, **sample.kwargs))
        x64, args64, kwargs64 = _as_float64(sample)
        ref = _outputs(op.op(x64, *args64, **kwargs64))
        assert len(ours) == len(theirs), name
        for k, (a, b, r) in enumerate(zip(ours, theirs, ref)):
            _close_or_closer(a, b, r.detach(), f"{name} sample {i} output {k}: {sample.summary()}")
        # gradients of the differentiable output (the normalized tensor)
        g_ours, g_theirs = _grads(ours[:1], leaves, i), _grads(theirs[:1], leaves, i)
        leaves64 = [t for t in [x64, *args64, *kwargs64.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
        g_ref = _grads(ref[:1], leaves64, i)
        if g_theirs is None:
            continue
        for k, (a, b, r) in enumerate(zip(g_ours, g_theirs, g_ref)):
            if b is None:
                continue
            _close_or_closer(a, b, r, f"{name} sample {i} grad of input {k}: {sample.summary()}")


# nn.functional.layer_norm's OpInfo has no error inputs; native_layer_norm's take the same arguments
ERROR_SOURCE = {"nn.functional.layer_norm": "native_layer_norm"}


@pytest.mark.parametrize("name", list(OURS))
def test_every_error_input(name):
    op = OPINFOS[ERROR_SOURCE.get(name, name)]
    errors = list(op.error_inputs("cpu"))
    assert errors, f"no OpInfo error inputs for {name}"
    for err in errors:
        s = err.sample_input
        with pytest.raises(err.error_type, match=err.error_regex):
            OURS[name](s.input, *s.args, **s.kwargs)
