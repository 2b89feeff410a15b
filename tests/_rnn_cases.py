"""Recurrence inputs shared by the implementation tests (test_rnn_native.py, test_rnn_triton.py): random
arguments of ``lstm_recurrence`` / ``gru_recurrence`` with every option, one run with all gradients, and
a cast of the arguments to another dtype."""
from __future__ import annotations

from typing import Optional

import torch

from layernorm import rnn


def recurrence_args(mode: str, T: int, B: int, H: int, P: Optional[int], options: bool, dtype: torch.dtype,
                    device="cpu", seed: int = 0):
    """(args, kwargs) for one layer and direction: xw (T, B, G), lengths, h0, [c0], weights, gains, bias.

    ``P``: the LSTM's projection size (None: no projection). ``options``: lengths below T, a recurrent
    dropout mask and zoneout of h (and c). Values drawn in float64, then cast, so every dtype sees the
    same numbers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0, offset=0.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
                                           + offset).to(dtype=dtype, device=device).requires_grad_(True)
    G = (4 if mode == "lstm" else 3) * H
    R = P or H
    masks = torch.Generator().manual_seed(seed + 1)
    mask = lambda p, *s: (torch.rand(*s, generator=masks) < p).to(dtype=dtype, device=device)  # noqa: E731
    lengths = torch.tensor([T - (b % 3) for b in range(B)]) if options else None
    kw = dict(recurrent_mask=mask(0.7, B, R) / 0.7 if options else None,
              zoneout_h=mask(0.2, T, B, R) if options else None)
    common = [r(T, B, G), lengths, r(B, R, scale=0.5)]
    if mode == "lstm":
        args = common + [r(B, H, scale=0.5), r(G, R, scale=R ** -0.5), r(G, scale=0.2, offset=1), r(G, scale=0.3),
                         r(G, scale=0.2, offset=1), r(H, scale=0.2, offset=1), r(H, scale=0.3)]
        kw.update(w_hr=r(R, H, scale=H ** -0.5) if P else None, zoneout_c=mask(0.3, T, B, H) if options else None)
    else:
        args = common + [r(G, H, scale=H ** -0.5), r(G, scale=0.2, offset=1), r(G, scale=0.3), r(G, scale=0.3),
                         r(G, scale=0.2, offset=1)]
    return args, kw


def run_recurrence(mode: str, args, kw, backend: str):
    """The outputs, then the gradient of a fixed random projection of them for every leaf."""
    fn = rnn.lstm_recurrence if mode == "lstm" else rnn.gru_recurrence
    res = fn(*args, **kw, backend=backend)
    g = torch.Generator().manual_seed(9)
    loss = sum((x.double() * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device)).sum() for x in res)
    leaves = [a for a in list(args) + list(kw.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    return list(res) + list(torch.autograd.grad(loss, leaves))


def cast(args, kw, dtype: torch.dtype):
    """The same arguments in another floating dtype (leaves again)."""
    conv = lambda a: (a.detach().to(dtype).requires_grad_(a.requires_grad)  # noqa: E731
                      if isinstance(a, torch.Tensor) and a.is_floating_point() else a)
    return [conv(a) for a in args], {k: conv(v) for k, v in kw.items()}
