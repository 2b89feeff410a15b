#!/usr/bin/env bash
# Full CUDA norm benchmark (torch eager, torch.compile, our backends, Liger-Kernel and QuACK when
# importable) plus the in-context block, in under 5 minutes on one H100/H200.
#
#   bash scripts/gpu_bench.sh [extra `layernorm bench` args...]
#
# Extra wheels (Liger-Kernel, pure Python) are installed from ./.whl when present, into /tmp/site,
# with no network and no dependencies. QuACK is not carried: its CUDA libraries
# (nvidia-cutlass-dsl-libs-cu12/cu13) are ~92 MB wheels, over the 45 MB budget; it is benchmarked
# only where it is already installed.
# Results: benchmarks/results/norm-cuda-<tag>.{json,csv,png} and a copy of them (and the log) in
# $OUT when that is set. One provider failing is recorded in the JSON; it does not stop the run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TAG=${TAG:-gpu-$(date +%Y%m%d-%H%M%S)}
OUT_DIR=${OUT:-}
LOG=${OUT_DIR:-/tmp}/gpu_bench.log

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "warning: installing .whl/*.whl failed; continuing without them" >&2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# inductor compiles in parallel worker processes; keep its cache inside the run
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  $PY -m layernorm.cli info || echo "layernorm info failed (rc=$?)"
  # TIME_LIMIT: the bench is stopped past this many seconds (SIGTERM, then SIGKILL 15 s later); the
  # JSON is rewritten after every case, so the cases it finished are kept (with "partial": true).
  # Default grid (issue 4): 7 widths x rows*cols = 2^27, fp32 + bf16, layer_norm + rms_norm, 3 modes:
  # 28 cases; a first H200 run took ~10 s per case (mostly torch.compile and Triton JIT per width,
  # and host-side input generation since moved to the GPU), so expect 4-5 minutes. The fused
  # residual ops add as much again: `TIME_LIMIT=560 bash scripts/gpu_bench.sh --op all`.
  timeout -k 15 "${TIME_LIMIT:-285}" $PY -m layernorm.cli bench --device cuda --plot --block \
      --tag "$TAG" --out benchmarks/results "$@"
  echo "bench rc=$?"
} 2>&1 | tee "$LOG"

if [ -n "$OUT_DIR" ]; then
  cp benchmarks/results/norm-cuda-"$TAG".* "$OUT_DIR"/ 2>/dev/null || echo "no result files to copy" >&2
fi
