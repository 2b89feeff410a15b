#!/usr/bin/env bash
# Checks of the triton backend on a CUDA GPU (H100/H200), < 4 minutes. Run from the repository root:
#     bash scripts/gpu_tests.sh
# Needs python3 with torch + triton (and CUDA). Part 1 needs pytest: if python3 lacks it, copy the
# pure-Python packages from .venv (carry: .venv/lib/python3.11/site-packages/{pytest,_pytest,pluggy,
# iniconfig,packaging,pygments,py.py}); without them part 1 is skipped and said so.
#   1. tests/test_backend_triton.py on cuda tensors, compiled kernels (no interpreter), trimmed matrix;
#      1b. tests/test_rnn_triton.py likewise (the fused LN-LSTM/GRU step kernels);
#   2. large shapes: widths 1024..262144 x (bf16, fp32), rows = 2^27 / width (2^26 for fp32), forward
#      and backward vs the reference, plus timings against the torch backend;
#   3. int64 addressing: a bf16 tensor of more than 2^31 elements, last rows checked.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1   # triton 3.9 warns when unset; keeps today's default
PY=${PYTHON:-python3}
status=0

echo "== device: $($PY -c 'import torch, triton; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__)')"

# --- 1. pytest on cuda --------------------------------------------------------------------------
if ! $PY -c "import pytest" 2>/dev/null; then
    site=$(ls -d .venv/lib/python3*/site-packages 2>/dev/null | head -1)
    if [ -n "$site" ] && [ -d "$site/_pytest" ]; then
        vend=$(mktemp -d)
        for p in pytest _pytest pluggy iniconfig packaging pygments py.py; do
            [ -e "$site/$p" ] && ln -s "$PWD/$site/$p" "$vend/$p"
        done
        export PYTHONPATH="$PYTHONPATH:$vend"
    fi
fi
if $PY -c "import pytest" 2>/dev/null; then
    echo "== 1. tests/test_backend_triton.py on cuda (LAYERNORM_TEST_QUICK=1)"
    t0=$(date +%s)
    # --noconftest: tests/conftest.py imports hypothesis, which the GPU image may lack; this file needs none
    LAYERNORM_TEST_DEVICE=cuda LAYERNORM_TEST_QUICK=1 timeout 95 $PY -m pytest tests/test_backend_triton.py \
        --noconftest -q -x -p no:cacheprovider -W ignore::RuntimeWarning 2>&1 | tail -15
    rc=${PIPESTATUS[0]}
    echo "   pytest exit code $rc ($(( $(date +%s) - t0 )) s; 124 = timed out)"
    [ "$rc" -ne 0 ] && status=1
    echo "== 1b. tests/test_rnn_triton.py on cuda (the LN-LSTM/GRU step kernels; never compiled for a GPU before)"
    t0=$(date +%s)
    LAYERNORM_TEST_DEVICE=cuda timeout 60 $PY -m pytest tests/test_rnn_triton.py \
        --noconftest -q -x -p no:cacheprovider -W ignore::RuntimeWarning 2>&1 | tail -15
    rc=${PIPESTATUS[0]}
    echo "   pytest exit code $rc ($(( $(date +%s) - t0 )) s; 124 = timed out)"
    [ "$rc" -ne 0 ] && status=1
else
    echo "== 1. SKIPPED: no pytest for $PY (see the header of this script)"
fi

# --- 2 + 3. large shapes, timings, int64 offsets ------------------------------------------------
echo "== 2. large shapes (max |error| relative to max |reference|; ms per call, GB/s = bytes moved / time)"
timeout 75 $PY - <<'EOF'
import sys, time
import torch
import torch.nn.functional as F
import layernorm
from layernorm.backends import reference, triton as tb

dev = "cuda"
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # relative to max |reference|
bad = []


def rel(a, e):
    if a is None:
        return 0.0
    e = e.float()
    return ((a.float() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def bench(fn, iters=10):
    fn()
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True); t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(iters):
        fn()
    t1.record(); torch.cuda.synchronize()
    return t0.elapsed_time(t1) / iters


def torch_forward(x, r, w, b, eps, rms):
    """torch's own kernels: the baseline."""
    h = x if r is None else x + r
    return F.rms_norm(h, (h.shape[-1],), w, eps) if rms else F.layer_norm(h, (h.shape[-1],), w, b, eps)


def torch_backward_fn(x, r, w, b, dy, eps, rms):
    """A callable timing torch's backward alone (graph built once)."""
    leaves = [t.detach().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    out = torch_forward(leaves[0], r, leaves[1], leaves[2] if b is not None else None, eps, rms)
    return lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True)


# the operators on CUDA tensors: layernorm.layer_norm dispatches to the Triton kernels registered in ops.py
xc = torch.randn(64, 1024, device=dev, requires_grad=True)
wc = torch.randn(1024, device=dev, requires_grad=True)
yc = layernorm.layer_norm(xc, (1024,), wc)
yt = F.layer_norm(xc, (1024,), wc)
gc = torch.autograd.grad(yc.square().sum(), [xc, wc])
gt = torch.autograd.grad(yt.square().sum(), [xc, wc])
op_err = max(rel(yc, yt), *(rel(a, e) for a, e in zip(gc, gt)))
print(f"== layernorm.layer_norm on cuda through the operator: max rel err vs torch {op_err:.1e}")
if op_err > 1e-4:
    bad.append(("operator on cuda", op_err))

start = time.time()
print(f"{'dtype':9s} {'op':14s} {'M':>7s} {'N':>7s} | {'err fwd':>8s} {'err bwd':>8s} | "
      f"{'fwd ms':>7s} {'GB/s':>6s} {'torch':>6s} | {'bwd ms':>7s} {'GB/s':>6s} {'torch':>6s}")
for dtype in (torch.bfloat16, torch.float32):
    for N in (1024, 4096, 8192, 16384, 65536, 262144):
        M = (2**27 if dtype == torch.bfloat16 else 2**26) // N
        g = torch.Generator(device=dev).manual_seed(N)
        x = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
        res = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
        w = torch.randn(N, device=dev, dtype=dtype, generator=g)
        b = torch.randn(N, device=dev, dtype=dtype, generator=g)
        dy = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
        for op, r, bb, rms in (("layer_norm", None, b, False), ("add_rms_norm", res, None, True)):
            ours = tb.forward(x, r, w, bb, 1e-5, rms)
            ref = reference.forward(x, r, w, bb, 1e-5, rms)
            ef = max(rel(a, e) for a, e in zip(ours, ref) if e is not None)
            h = ref[1] if r is not None else x
            dz = dy if r is not None else None
            gout = tb.backward(dy, dz, h, w, bb, ref[2], ref[3], rms)
            gref = reference.backward(dy, dz, h, w, bb, ref[2], ref[3], rms)
            eb = max(rel(a, e) for a, e in zip(gout, gref) if e is not None)
            del ours, ref, gout, gref
            e = x.element_size()
            nfwd = (2 + (2 if r is not None else 0)) * M * N * e   # x (+res) read, y (+z) written
            nbwd = (3 + (1 if r is not None else 0)) * M * N * e   # z, dy (+dz) read, dx written
            o = tb.forward(x, r, w, bb, 1e-5, rms)
            tf = bench(lambda: tb.forward(x, r, w, bb, 1e-5, rms))
            tbw = bench(lambda: tb.backward(dy, dz, h, w, bb, o[2], o[3], rms))
            try:  # the baseline; a failure here is not the triton backend's
                tt = bench(lambda: torch_forward(x, r, w, bb, 1e-5, rms))
                ttb = bench(torch_backward_fn(h, None, w, bb, dy, 1e-5, rms))
            except Exception as exc:  # noqa: BLE001
                print(f"   torch backend failed: {type(exc).__name__}: {exc}"[:200])
                tt = ttb = float("inf")
            del o
            ok = ef < TOL[dtype] and eb < TOL[dtype]
            if not ok:
                bad.append((dtype, op, M, N, ef, eb))
            print(f"{str(dtype)[6:]:9s} {op:14s} {M:7d} {N:7d} | {ef:8.1e} {eb:8.1e} | "
                  f"{tf:7.3f} {nfwd / tf / 1e6:6.0f} {nfwd / tt / 1e6:6.0f} | "
                  f"{tbw:7.3f} {nbwd / tbw / 1e6:6.0f} {nbwd / ttb / 1e6:6.0f}{'' if ok else '  <-- FAIL'}",
                  flush=True)
        del x, res, w, b, dy
        torch.cuda.empty_cache()

print(f"== 3. int64 offsets (> 2^31 elements)   [{time.time() - start:.0f} s so far]")
N = 4096
M = 2**31 // N + 8
x = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
w = torch.randn(N, device=dev, dtype=torch.bfloat16)
y, _, _, rstd = tb.forward(x, None, w, None, 1e-5, True)
tail = slice(M - 8, M)
ry, _, _, rrstd = reference.forward(x[tail], None, w, None, 1e-5, True)
e1 = rel(y[tail], ry)
dx, _, _ = tb.backward(x, None, x, w, None, None, rstd, True)   # dy = x: saves 4 GB
rdx, _, _ = reference.backward(x[tail], None, x[tail], w, None, None, rrstd, True)
e2 = rel(dx[tail], rdx)
ok = e1 < 2e-2 and e2 < 2e-2
print(f"bf16 rms_norm M={M} N={N} ({M * N} elements): last rows err fwd {e1:.1e} bwd {e2:.1e} "
      f"{'ok' if ok else 'FAIL'}")
if not ok:
    bad.append(("int64", e1, e2))
print(f"== large shapes: {'all ok' if not bad else f'{len(bad)} FAILED: {bad}'} ({time.time() - start:.0f} s)")
sys.exit(1 if bad else 0)
EOF
rc=$?
echo "   large-shape exit code $rc (124 = timed out)"
[ "$rc" -ne 0 ] && status=1
echo "== gpu_tests.sh: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
