"""The implementations ``layernorm bench`` compares ("providers"), behind one calling convention.

A provider builds, for an op name and a device, a function ``fn(x, r, w, b) -> tuple of outputs``:
``(y,)`` for ``layer_norm``/``rms_norm`` and ``(y, z)`` with ``z = x + r`` for the fused
``add_*`` ops. ``r`` is None for the plain ops and ``b`` is None for RMSNorm. Every function is
differentiable with autograd in all its tensor inputs, unless the provider says ``fwd_only``.

Providers that cannot run an op raise :class:`Unsupported` from ``build``; the benchmark records the
reason instead of a number.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["Provider", "Unsupported", "OPS", "default_providers", "EPS"]

EPS = 1e-5

# op -> (rms, fused residual add)
OPS: Dict[str, Tuple[bool, bool]] = {
    "layer_norm": (False, False),
    "rms_norm": (True, False),
    "add_layer_norm": (False, True),
    "add_rms_norm": (True, True),
}


class Unsupported(Exception):
    """This provider has no implementation of the op (or not on this device / in this mode)."""


Fn = Callable[..., Tuple[torch.Tensor, ...]]


@dataclass
class Provider:
    """name: short label in tables; build(op, device) -> fn; fwd_only(op) -> no autograd backward."""

    name: str
    build: Callable[[str, torch.device], Fn]
    description: str = ""
    available: bool = True
    reason: str = ""
    version: Optional[str] = None
    fwd_only_ops: Tuple[str, ...] = ()
    notes: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- torch eager
def _eager_fn(op: str) -> Fn:
    rms, add = OPS[op]

    def norm(h, w, b):
        N = h.shape[-1]
        if rms:
            return F.rms_norm(h, (N,), w, EPS)
        return F.layer_norm(h, (N,), w, b, EPS)

    if add:
        def fn(x, r, w, b):
            z = x + r
            return norm(z, w, b), z
    else:
        def fn(x, r, w, b):
            return (norm(x, w, b),)
    return fn


def _eager_build(op: str, device: torch.device) -> Fn:
    return _eager_fn(op)


# ------------------------------------------------------------------------------------- torch.compile
_COMPILED: Dict[str, Fn] = {}


def _compile_build(op: str, device: torch.device) -> Fn:
    # one compiled callable per op; dynamo guards on shapes and recompiles per (shape, dtype, grad mode)
    if op not in _COMPILED:
        import torch._dynamo as dynamo

        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 512))
        try:  # donated buffers forbid the bwd mode's retain_graph=True; they only save memory
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
        except (ImportError, AttributeError):
            pass
        _COMPILED[op] = torch.compile(_eager_fn(op), dynamic=False)
    return _COMPILED[op]


# ------------------------------------------------------------------------------------------- ours
def _ours_build_for(backend: Optional[str]) -> Callable[[str, torch.device], Fn]:
    def build(op: str, device: torch.device) -> Fn:
        from .. import functional as LF
        from ..backends import BackendUnavailable, resolve_backend

        try:
            resolve_backend(backend, device, torch.float32)
        except BackendUnavailable as exc:
            raise Unsupported(str(exc)) from None
        rms, add = OPS[op]
        if add and rms:
            def fn(x, r, w, b):
                return LF.add_rms_norm(x, r, (x.shape[-1],), w, EPS, backend=backend)
        elif add:
            def fn(x, r, w, b):
                return LF.add_layer_norm(x, r, (x.shape[-1],), w, b, EPS, backend=backend)
        elif rms:
            def fn(x, r, w, b):
                return (LF.rms_norm(x, (x.shape[-1],), w, EPS, backend=backend),)
        else:
            def fn(x, r, w, b):
                return (LF.layer_norm(x, (x.shape[-1],), w, b, EPS, backend=backend),)
        return fn

    return build


# ----------------------------------------------------------------------------------------- Liger
def _liger_build(op: str, device: torch.device) -> Fn:
    if device.type != "cuda":
        raise Unsupported("Liger-Kernel runs on CUDA only")
    rms, add = OPS[op]
    if add and not rms:
        raise Unsupported("Liger-Kernel has no fused residual-add + LayerNorm")
    if add:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        # in_place=False: dY is not overwritten by dX, so repeated backward calls see the same dY
        def fn(x, r, w, b):
            return tuple(LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False))
        return fn
    if rms:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        def fn(x, r, w, b):
            return (LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False),)
        return fn
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    def fn(x, r, w, b):
        return (LigerLayerNormFunction.apply(x, w, b, EPS),)
    return fn


# ----------------------------------------------------------------------------------------- QuACK
def _quack_build(op: str, device: torch.device) -> Fn:
    if device.type != "cuda":
        raise Unsupported("QuACK runs on CUDA (sm90+) only")
    rms, add = OPS[op]
    if rms:
        import quack

        if add:
            def fn(x, r, w, b):
                y, z = quack.rmsnorm(x, w, residual=r, eps=EPS, prenorm=True)
                return y, z
        else:
            def fn(x, r, w, b):
                return (quack.rmsnorm(x, w, eps=EPS),)
        return fn
    if add:
        raise Unsupported("QuACK has no fused residual-add + LayerNorm")
    qrms = importlib.import_module("quack.rmsnorm")
    if not hasattr(qrms, "layernorm_fwd"):
        raise Unsupported("this QuACK has no layernorm")

    # forward only: QuACK exposes layernorm_fwd/layernorm_bwd but no autograd Function
    def fn(x, r, w, b):
        return (qrms.layernorm_fwd(x, w.float(), None if b is None else b.float(), EPS),)
    return fn


def _probe(module: str, dist: str) -> Tuple[bool, str, Optional[str]]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a CUDA-library load failure inside the import
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200], None
    from importlib import metadata

    try:
        return True, "", metadata.version(dist)
    except metadata.PackageNotFoundError:
        return True, "", None


def default_providers(device: torch.device, include_reference: bool = False) -> List[Provider]:
    """Every provider, available or not (unavailable ones carry their reason), in table order.

    ``ours`` is what a user gets: the operators of :mod:`layernorm.ops`, their kernel chosen by device
    (the C++ kernels on CPU, Triton on CUDA). ``ours:torch`` and ``ours:reference`` are the backend
    overrides (torch's kernels through our API; the plain-PyTorch spec, with ``--all``)."""
    from ..backends import choose_backend

    out = [
        Provider("eager", _eager_build, "torch.nn.functional (x + r then the norm for add ops)",
                 version=torch.__version__),
        Provider("compile", _compile_build, "torch.compile(eager function, dynamic=False); functorch donated_buffer=False",
                 version=torch.__version__),
    ]
    kernel = choose_backend(device, torch.float32)
    ours = Provider("ours", _ours_build_for(None), f"layernorm.functional, automatic choice ({kernel} kernels here)")
    if kernel == "torch":
        ours.available, ours.reason = False, "the operators' kernels cannot run here (see `layernorm info`)"
    out.append(ours)
    ref = Provider("ours:reference", _ours_build_for("reference"), "layernorm.functional with backend='reference'")
    if not include_reference:
        ref.available, ref.reason = False, "slow spec implementation; pass --all to time it"
    out.append(ref)
    for name, module, dist, build, desc in (
        ("liger", "liger_kernel.ops.layer_norm", "liger-kernel", _liger_build,
         "Liger-Kernel autograd Functions (RMS: casting_mode='llama', in_place=False)"),
        ("quack", "quack", "quack-kernels", _quack_build, "QuACK (CuTe DSL); LayerNorm forward only"),
    ):
        if device.type != "cuda":
            out.append(Provider(name, build, desc, available=False, reason="CUDA only"))
            continue
        ok, why, ver = _probe(module, dist)
        out.append(Provider(name, build, desc, available=ok, reason=why, version=ver,
                            fwd_only_ops=("layer_norm",) if name == "quack" else ()))
    return out
