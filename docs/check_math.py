"""Checks the backward derived in docs/math.md against autograd, and prints the table shown there.

For LayerNorm and RMSNorm, with and without the fused residual, in float64 and float32, it compares
``layernorm.backends.reference.backward`` (the hand-derived formulas) with
``torch.autograd.grad`` of ``reference.forward`` (autograd differentiating the forward formulas) and
with autograd of torch.nn.functional's own layer_norm / rms_norm, on the same random rows.

Run:  python docs/check_math.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from layernorm.backends import reference

M, N, EPS = 64, 768, 1e-5


def one(rms: bool, residual: bool, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, r = mk(M, N).requires_grad_(), (mk(M, N).requires_grad_() if residual else None)
    w = (1 + 0.1 * mk(N)).requires_grad_()
    b = None if rms else (0.1 * mk(N)).requires_grad_()
    dy, dz = mk(M, N), (mk(M, N) if residual else None)
    leaves = [t for t in (x, w, b) if t is not None]

    # 1. our derived backward (the formulas of docs/math.md)
    y, z, mean, rstd = reference.forward(x, r, w, b, EPS, rms)
    h = (z if residual else x).detach()
    ours = reference.backward(dy, dz, h, w.detach(), None if b is None else b.detach(),
                              None if mean is None else mean.detach(), rstd.detach(), rms)
    ours = [t for t in ours if t is not None]

    # 2. autograd of our forward formulas
    outs, gouts = [y] + ([z] if residual else []), [dy] + ([dz] if residual else [])
    auto = torch.autograd.grad(outs, leaves, gouts)

    # 3. autograd of torch.nn.functional (torch's own backward kernels)
    hh = x + r if residual else x
    yt = TF.rms_norm(hh, (N,), w, EPS) if rms else TF.layer_norm(hh, (N,), w, b, EPS)
    outs_t = [yt] + ([hh] if residual else [])
    tgrads = torch.autograd.grad(outs_t, leaves, gouts)

    def err(a, e):
        a, e = a.double(), e.double()
        return (a - e).abs().max().item(), ((a - e).abs().max() / e.abs().max()).item()

    return {name: (err(o, a), err(o, t)) for name, o, a, t in zip(("dx", "dweight", "dbias"), ours, auto, tgrads)}


def main() -> None:
    print(f"Rows M={M}, columns N={N}, eps={EPS}; max |ours - other| (and relative to max |other|).\n")
    print("| norm | residual | dtype | grad | vs autograd of reference.forward | vs autograd of torch.nn.functional |")
    print("|---|---|---|---|---|---|")
    for rms in (False, True):
        for residual in (False, True):
            for dtype in (torch.float64, torch.float32):
                for name, ((aa, ar), (ta, tr)) in one(rms, residual, dtype).items():
                    print(f"| {'RMSNorm' if rms else 'LayerNorm'} | {'yes' if residual else 'no'} | "
                          f"{str(dtype).replace('torch.', '')} | {name} | {aa:.1e} ({ar:.1e}) | {ta:.1e} ({tr:.1e}) |")


if __name__ == "__main__":
    main()
