"""Running the four ops through ours or torch.nn.functional, with gradients, on the same inputs."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as TF

import layernorm

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
EPS = 1e-5


def is_rms(op: str) -> bool:
    return "rms" in op


def is_fused(op: str) -> bool:
    return op.startswith("add_")


@dataclass
class Case:
    """Inputs of one call, plus the upstream gradients dy (and dz for the fused ops)."""

    op: str
    x: torch.Tensor
    nshape: Sequence[int]
    residual: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    dy: Optional[torch.Tensor] = None
    dz: Optional[torch.Tensor] = None
    eps: float = EPS

    def to(self, dtype: torch.dtype, param_dtype: Optional[torch.dtype] = None) -> "Case":
        pd = param_dtype or dtype
        cv = lambda t, d: None if t is None else t.detach().to(d)  # noqa: E731
        return replace(
            self, x=cv(self.x, dtype), residual=cv(self.residual, dtype), weight=cv(self.weight, pd),
            bias=cv(self.bias, pd), dy=cv(self.dy, dtype), dz=cv(self.dz, dtype),
        )


def make_case(op, shape, nshape, dtype=torch.float32, param_dtype=None, weight=True, bias=True, transform=None):
    """Random inputs rounded to ``dtype`` (so every implementation sees the same values).

    ``transform`` maps the fp32 draw of x (e.g. to a non-contiguous view) before rounding."""
    pd = param_dtype or dtype
    x = torch.randn(shape)
    if transform is not None:
        x = transform(x)
    x = x.to(dtype)
    shape = x.shape
    residual = torch.randn(shape).to(dtype) if is_fused(op) else None
    w = (1 + 0.5 * torch.randn(nshape)).to(pd) if weight else None
    b = (0.5 * torch.randn(nshape)).to(pd) if (bias and not is_rms(op)) else None
    dy = torch.randn(shape).to(dtype)
    dz = torch.randn(shape).to(dtype) if is_fused(op) else None
    return Case(op, x, list(nshape), residual, w, b, dy, dz)


def run(case: Case, impl: str = "ours", backend: Optional[str] = None, grads: bool = True) -> Dict[str, torch.Tensor]:
    """Forward (y, z) and the gradient of every tensor input. impl: "ours" or "torch" (torch.nn.functional)."""
    leaves = {}
    for name in ("x", "residual", "weight", "bias"):
        t = getattr(case, name)
        if t is not None:
            # keep x's (possibly non-contiguous) layout: clone would not, detach does
            leaves[name] = t.detach().requires_grad_(grads)
    x, r, w, b = (leaves.get(k) for k in ("x", "residual", "weight", "bias"))
    op, ns, eps = case.op, case.nshape, case.eps
    z = None
    if impl == "ours":
        if op == "layer_norm":
            y = layernorm.layer_norm(x, ns, w, b, eps, backend=backend)
        elif op == "rms_norm":
            y = layernorm.rms_norm(x, ns, w, eps, backend=backend)
        elif op == "add_layer_norm":
            y, z = layernorm.add_layer_norm(x, r, ns, w, b, eps, backend=backend)
        else:
            y, z = layernorm.add_rms_norm(x, r, ns, w, eps, backend=backend)
    else:
        h = x
        if is_fused(op):
            z = x + r
            h = z
        y = TF.rms_norm(h, ns, w, eps) if is_rms(op) else TF.layer_norm(h, ns, w, b, eps)
    out = {"y": y.detach()}
    if z is not None:
        out["z"] = z.detach()
    if grads:
        loss_terms = [(y, case.dy)] + ([(z, case.dz)] if z is not None else [])
        outs = [t for t, _ in loss_terms]
        gs = [g for _, g in loss_terms]
        got = torch.autograd.grad(outs, list(leaves.values()), gs, allow_unused=True)
        for name, g in zip(leaves, got):
            out["d" + name] = g if g is not None else torch.zeros_like(leaves[name])
    return out
