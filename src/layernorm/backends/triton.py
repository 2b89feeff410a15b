"""The ``triton`` backend: fused LayerNorm / RMSNorm (+ residual add) kernels for CUDA tensors.

Same contract as :mod:`layernorm.backends.reference` (read it for shapes and dtypes):

``forward(x, residual, weight, bias, eps, rms) -> (y, z, mean, rstd)``
``backward(dy, dz, z, weight, bias, mean, rstd, rms) -> (dx, dweight, dbias)``

How it works (kernels in :mod:`._triton_kernels`):

* Statistics are computed in float32 (float64 for float64 input). Narrow rows are held whole in
  registers (the *fused* kernels, several rows per program); wide rows loop over column blocks (the
  *wide* kernels), merging per-block (count, mean, M2) with Chan's formula, so any width works
  without register spills. Which kernel, and its tile, comes from the launch table below.
* Rows whose sum of squares overflows (|x| ~ 1e20 in float32) are rescued by pre-scaling with the
  row's largest magnitude, the rule of :func:`reference.row_rstd`; normal rows pay one comparison.
* Backward: a persistent grid (a few programs per SM) in which each program owns a contiguous
  range of rows and keeps dweight/dbias partial sums in registers; the partials, one row per
  program of a (programs, N) float32 buffer, are summed by ``torch.sum(dim=0)``. No atomics, so
  results are bitwise reproducible run to run.

Launch table
------------
Every launch is described by a :class:`Launch`, looked up per direction (``fwd``/``bwd``), input
dtype and *width bucket* ``next_pow2(N)``. Where the table has no entry, the built-in rule
(:func:`builtin_launch`) gives today's choice: forward fused up to 8192 columns (tile ~4096 elements),
backward fused up to 4096 (tile ~2048), ``num_warps = clamp(tile / 256, 4, 16)`` (8 elements per
thread), backward ``32 // num_warps`` programs per SM; wider rows take the wide kernels with 4096-
column blocks and 16 warps (backward: 2 programs per SM, shared among the column blocks).

The table in use, first found of:

1. :func:`use_table` (a context manager; the tuner and the tests use it);
2. ``LAYERNORM_TRITON_TABLE=/path/file.json`` (environment, read at each launch, file cached);
3. the packaged ``triton_tables/<device>.json`` next to this module, ``<device>`` being
   :func:`device_table_name` of ``torch.cuda.get_device_name()`` (e.g. ``nvidia-h100-80gb-hbm3``);
   CUDA tensors only;
4. the built-in rule alone.

JSON schema (``layernorm-triton-table/1``; ``layernorm bench --tune`` writes it)::

    {
      "schema": "layernorm-triton-table/1",       optional; if present it must be this
      "device": "NVIDIA H100 80GB HBM3",          optional, informational
      "created": "...", "notes": ..., "tuner": {...}   optional, informational
      "fwd": {"<bucket>": ENTRY, ...},           every dtype
      "bwd": {"<bucket>": ENTRY, ...},
      "dtypes": {"bfloat16": {"fwd": {...}, "bwd": {...}}, "float32": {...}}   per input dtype
    }

``<bucket>`` is a power of two (the padded width ``next_pow2(N)``, as a string). An ENTRY has
any of these keys; missing keys come from the built-in choice for that bucket and kernel:

* ``kernel``: ``"fused"`` (whole rows in registers) or ``"wide"`` (column-block loop);
* ``num_warps``: 1, 2, 4, 8, 16 or 32;
* ``rows`` (fused only): rows per program ``BLOCK_M``, a power of two <= 64 with
  ``rows * bucket <= 65536``; for tensors with fewer rows it is cut to ``next_pow2(M)`` and
  ``num_warps`` scaled down with it (same elements per thread, never below ``min(4, num_warps)``);
* ``block`` (wide only): column block, a power of two in [16, 65536];
* ``programs_per_sm`` (``bwd`` only, 1..64): persistent programs per SM; the wide backward's
  row groups are ``ceil(SMs * programs_per_sm / column blocks)``.

Lookup: ``dtypes[dtype][dir][bucket]``, else ``dir[bucket]``, else the built-in rule. A bad file is
an error (:class:`TableError`, naming the file and the key) at the first launch that reads it.

Importing this module imports Triton; the registry imports it lazily, only for CUDA tensors or under
``TRITON_INTERPRET=1`` (Triton's CPU interpreter, which the test-suite uses on CPU tensors).

Example::

    >>> from layernorm.backends import triton as tb
    >>> x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    >>> y, z, mean, rstd = tb.forward(x, None, None, None, 1e-5, False)
    >>> with tb.use_table({"fwd": {"4096": {"rows": 2, "num_warps": 8}}}):
    ...     y2 = tb.forward(x, None, None, None, 1e-5, False)[0]
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

import triton
import triton.language as tl

from . import reference
from ._triton_kernels import _bwd_fused, _bwd_wide_cols, _bwd_wide_rows, _fwd_fused, _fwd_wide

__all__ = [
    "forward", "backward", "Launch", "LaunchTable", "TableError", "BUILTIN", "builtin_launch",
    "load_table", "table_from_dict", "use_table", "active_table", "table_info", "device_table_name",
    "TABLE_ENV", "TABLES_DIR", "TABLE_SCHEMA",
]

TABLE_SCHEMA = "layernorm-triton-table/1"
TABLE_ENV = "LAYERNORM_TRITON_TABLE"
TABLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_tables")

# Built-in rule. Register budgets were checked with ptxas for sm_90 (`ptxas -v`, fp32 and bf16,
# residual + weight + bias): about 8 (backward) to 16 (forward) row elements per thread fit without
# spills; above that ptxas spills (forward 16384 x 16 warps: 112 B; backward 8192 x 16 warps: 196 B).
_FWD_MAX_BLOCK = 8192    # widest row the built-in forward keeps whole in registers
_BWD_MAX_BLOCK = 4096    # the backward holds ~8 row-sized values per row (z, dy, dz, w, xhat, ...)
_WIDE_BLOCK = 4096       # column block of the looping (wide-row) kernels
_FWD_TILE = 4096         # fused: rows per program = _TILE // next_pow2(N), at most _MAX_ROWS
_BWD_TILE = 2048
_WAVES = 32              # fused backward: programs per SM = _WAVES // num_warps (several CTAs in flight)
_CPU_SMS = 4             # "SM count" on the CPU interpreter: small, but > 1 to exercise the partials

# Legal values of a table entry (checked when a table is built, so every entry is a legal launch).
_NUM_WARPS = (1, 2, 4, 8, 16, 32)
_MAX_ROWS = 64
_MAX_TILE = 65536        # elements of a fused tile, rows * bucket (Triton's own cap is 2^20)
_MIN_BLOCK, _MAX_BLOCK = 16, 65536
_MAX_PROGRAMS_PER_SM = 64
_KERNELS = ("fused", "wide")
_DIRECTIONS = ("fwd", "bwd")
_ENTRY_KEYS = {"fwd": ("kernel", "rows", "num_warps", "block"),
               "bwd": ("kernel", "rows", "num_warps", "block", "programs_per_sm")}
_INFO_KEYS = ("schema", "device", "created", "notes", "tuner", "source")
_DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


class TableError(ValueError):
    """A launch-table JSON file (or dict) that does not follow the schema of this module's docstring."""


@dataclass(frozen=True)
class Launch:
    """One launch choice. ``rows``: fused rows per program (1 for wide); ``block``: wide column block
    (0 for fused); ``programs_per_sm``: backward persistent programs per SM (0 for the forward)."""

    kernel: str
    num_warps: int
    rows: int = 1
    block: int = 0
    programs_per_sm: int = 0

    def to_json(self, direction: str) -> Dict[str, Any]:
        d: Dict[str, Any] = {"kernel": self.kernel, "num_warps": self.num_warps}
        if self.kernel == "fused":
            d["rows"] = self.rows
        else:
            d["block"] = self.block
        if direction == "bwd":
            d["programs_per_sm"] = self.programs_per_sm
        return d


def _warps_for(tile: int) -> int:
    # 8 elements per thread (two 16-byte fp32 vectors), between 4 and 16 warps
    return max(4, min(16, tile // 256))


def _kernel_default(direction: str, kernel: str, bucket: int) -> Launch:
    """The built-in choice for ``bucket`` had it taken ``kernel``."""
    if kernel == "fused":
        tile = _FWD_TILE if direction == "fwd" else _BWD_TILE
        rows = max(1, min(tile // bucket, _MAX_ROWS))
        warps = _warps_for(rows * bucket)
        pps = max(1, _WAVES // warps) if direction == "bwd" else 0
        return Launch("fused", warps, rows=rows, programs_per_sm=pps)
    warps = _warps_for(_WIDE_BLOCK)
    pps = max(1, _WAVES // warps) if direction == "bwd" else 0
    return Launch("wide", warps, rows=1, block=_WIDE_BLOCK, programs_per_sm=pps)


@functools.lru_cache(maxsize=None)
def builtin_launch(direction: str, bucket: int) -> Launch:
    """The built-in launch for a width bucket (``next_pow2(N)``): what runs without a table entry."""
    limit = _FWD_MAX_BLOCK if direction == "fwd" else _BWD_MAX_BLOCK
    return _kernel_default(direction, "fused" if bucket <= limit else "wide", bucket)


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def _check_launch(direction: str, bucket: int, e: Launch, where: str) -> None:
    def bad(key, msg):
        raise TableError(f"{where}.{key}: {msg}")

    if e.kernel not in _KERNELS:
        bad("kernel", f"{e.kernel!r} is not one of {list(_KERNELS)}")
    if e.num_warps not in _NUM_WARPS:
        bad("num_warps", f"{e.num_warps!r} is not one of {list(_NUM_WARPS)}")
    if e.kernel == "fused":
        if not (_is_pow2(e.rows) and e.rows <= _MAX_ROWS):
            bad("rows", f"{e.rows!r} is not a power of two in [1, {_MAX_ROWS}]")
        if e.rows * bucket > _MAX_TILE:
            bad("rows", f"rows * bucket = {e.rows} * {bucket} > {_MAX_TILE} elements per program")
    else:
        if e.rows != 1:
            bad("rows", f"the wide kernels take one row at a time (got {e.rows!r}); leave rows out")
        if not (_is_pow2(e.block) and _MIN_BLOCK <= e.block <= _MAX_BLOCK):
            bad("block", f"{e.block!r} is not a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}]")
    if direction == "bwd" and not (1 <= e.programs_per_sm <= _MAX_PROGRAMS_PER_SM):
        bad("programs_per_sm", f"{e.programs_per_sm!r} is not in [1, {_MAX_PROGRAMS_PER_SM}]")


def _entry(direction: str, bucket: int, spec: Any, where: str) -> Launch:
    """A validated Launch from a JSON entry (missing keys from the built-in choice)."""
    if isinstance(spec, Launch):
        _check_launch(direction, bucket, spec, where)
        return spec
    if not isinstance(spec, Mapping):
        raise TableError(f"{where}: expected an object with keys {list(_ENTRY_KEYS[direction])}, "
                         f"got {type(spec).__name__}")
    for k, v in spec.items():
        if k not in _ENTRY_KEYS[direction]:
            raise TableError(f"{where}.{k}: unknown key; {direction} entries take {list(_ENTRY_KEYS[direction])}")
        if k == "kernel":
            if not isinstance(v, str):
                raise TableError(f"{where}.kernel: {v!r} is not one of {list(_KERNELS)}")
        elif not (isinstance(v, int) and not isinstance(v, bool)):
            raise TableError(f"{where}.{k}: expected an integer, got {v!r}")
    base = builtin_launch(direction, bucket)
    kernel = spec.get("kernel", base.kernel)
    if kernel == "fused" and "block" in spec:
        raise TableError(f"{where}.block: the fused kernels hold whole rows (no column block); use rows")
    if kernel != base.kernel and kernel in _KERNELS:
        base = _kernel_default(direction, kernel, bucket)
    fields = {k: spec[k] for k in ("kernel", "num_warps", "rows", "block", "programs_per_sm") if k in spec}
    if kernel == "wide" and "rows" not in spec:
        fields["rows"] = 1
    e = replace(base, **fields)
    _check_launch(direction, bucket, e, where)
    return e


def _bucket_key(key: Any, where: str) -> int:
    try:
        b = int(key)
    except (TypeError, ValueError):
        b = 0
    if not _is_pow2(b) or str(b) != str(key).strip():
        raise TableError(f"{where}[{key!r}]: width buckets are powers of two (next_pow2 of the width), "
                         f"written as strings of digits, e.g. \"4096\"")
    return b


class LaunchTable:
    """Entries keyed by (direction, dtype name or "*", bucket); anything missing: the built-in rule."""

    def __init__(self, entries: Optional[Mapping[Tuple[str, str, int], Launch]] = None,
                 source: str = "built-in", info: Optional[Mapping[str, Any]] = None):
        self.entries: Dict[Tuple[str, str, int], Launch] = dict(entries or {})
        for (d, dt, b), e in self.entries.items():
            _check_launch(d, b, e, f"{source}: {d}[{b}]")
        self.source = source
        self.info = dict(info or {})

    def lookup(self, direction: str, dtype: Union[torch.dtype, str], bucket: int) -> Launch:
        name = dtype if isinstance(dtype, str) else _dtype_name(dtype)
        e = self.entries.get((direction, name, bucket)) or self.entries.get((direction, "*", bucket))
        return e if e is not None else builtin_launch(direction, bucket)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON document of this table (what :func:`table_from_dict` reads back)."""
        doc: Dict[str, Any] = {"schema": TABLE_SCHEMA}
        doc.update({k: v for k, v in self.info.items() if k in _INFO_KEYS and k != "schema"})
        order = lambda kv: (kv[0][1], _DIRECTIONS.index(kv[0][0]), kv[0][2])  # noqa: E731
        for (d, dt, b), e in sorted(self.entries.items(), key=order):
            sect = doc if dt == "*" else doc.setdefault("dtypes", {}).setdefault(dt, {})
            sect.setdefault(d, {})[str(b)] = e.to_json(d)
        return doc

    def __repr__(self) -> str:
        return f"LaunchTable({len(self.entries)} entries from {self.source})"


BUILTIN = LaunchTable(source="built-in")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def table_from_dict(doc: Any, source: str = "<dict>") -> LaunchTable:
    """Validate a parsed JSON table (schema in the module docstring); errors name ``source`` and the key."""
    if not isinstance(doc, Mapping):
        raise TableError(f"{source}: a launch table is a JSON object, got {type(doc).__name__}")
    schema = doc.get("schema", TABLE_SCHEMA)
    if schema != TABLE_SCHEMA:
        raise TableError(f"{source}: schema: {schema!r} is not {TABLE_SCHEMA!r}")
    entries: Dict[Tuple[str, str, int], Launch] = {}

    def section(sect: Any, dt: str, where: str) -> None:
        for d in _DIRECTIONS:
            if d not in sect:
                continue
            if not isinstance(sect[d], Mapping):
                raise TableError(f"{where}{d}: expected an object {{\"<bucket>\": entry}}, "
                                 f"got {type(sect[d]).__name__}")
            for key, spec in sect[d].items():
                b = _bucket_key(key, f"{where}{d}")
                entries[(d, dt, b)] = _entry(d, b, spec, f"{where}{d}[{key!r}]")

    for k in doc:
        if k not in _DIRECTIONS + ("dtypes",) + _INFO_KEYS:
            raise TableError(f"{source}: {k}: unknown key; expected {list(_DIRECTIONS + ('dtypes',) + _INFO_KEYS)}")
    section(doc, "*", f"{source}: ")
    dts = doc.get("dtypes", {})
    if not isinstance(dts, Mapping):
        raise TableError(f"{source}: dtypes: expected an object {{dtype: {{\"fwd\": ..., \"bwd\": ...}}}}")
    for dt, sect in dts.items():
        if dt not in _DTYPE_NAMES:
            raise TableError(f"{source}: dtypes[{dt!r}]: unknown dtype; expected one of {list(_DTYPE_NAMES)}")
        if not isinstance(sect, Mapping):
            raise TableError(f"{source}: dtypes[{dt!r}]: expected an object with fwd/bwd")
        for k in sect:
            if k not in _DIRECTIONS:
                raise TableError(f"{source}: dtypes[{dt!r}].{k}: unknown key; expected fwd, bwd")
        section(sect, dt, f"{source}: dtypes[{dt!r}].")
    info = {k: doc[k] for k in _INFO_KEYS if k in doc}
    return LaunchTable(entries, source=source, info=info)


@functools.lru_cache(maxsize=None)
def load_table(path: str) -> LaunchTable:
    """Read and validate a table file (cached per path; :func:`load_table.cache_clear` to re-read)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise TableError(f"{path}: cannot read the launch table: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise TableError(f"{path}: not valid JSON: {exc}") from None
    return table_from_dict(doc, source=path)


def device_table_name(name: str) -> str:
    """File stem of a device's packaged table: lower case, runs of other characters -> '-'.
    ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _device_table(name: str) -> LaunchTable:
    path = os.path.join(TABLES_DIR, device_table_name(name) + ".json")
    return load_table(path) if os.path.isfile(path) else BUILTIN


_ACTIVE: Optional[LaunchTable] = None


def _as_table(table: Any) -> LaunchTable:
    if isinstance(table, LaunchTable):
        return table
    if isinstance(table, (str, os.PathLike)):
        return load_table(os.fspath(table))
    return table_from_dict(table)


@contextlib.contextmanager
def use_table(table: Any) -> Iterator[LaunchTable]:
    """Use ``table`` (a LaunchTable, a dict in the JSON schema, or a path) for launches in this block,
    ahead of ``LAYERNORM_TRITON_TABLE`` and the packaged device files. Not thread-local."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, _as_table(table)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = prev


def _device_index(t_or_dev: Union[Tensor, torch.device]) -> int:
    dev = t_or_dev.device if isinstance(t_or_dev, Tensor) else t_or_dev
    return dev.index if dev.index is not None else torch.cuda.current_device()


def active_table(t_or_dev: Union[Tensor, torch.device, str, None] = None) -> LaunchTable:
    """The table a launch on this tensor (or device) uses; see the module docstring for the order."""
    if _ACTIVE is not None:
        return _ACTIVE
    path = os.environ.get(TABLE_ENV)
    if path:
        return load_table(path)
    if isinstance(t_or_dev, str):
        t_or_dev = torch.device(t_or_dev)
    if t_or_dev is not None and (t_or_dev.is_cuda if isinstance(t_or_dev, Tensor) else t_or_dev.type == "cuda"):
        return _device_table(_cuda_name(_device_index(t_or_dev)))
    return BUILTIN  # CPU tensors (interpreter): never touch torch.cuda here


def table_info(device: Union[torch.device, str, None] = None) -> Dict[str, Any]:
    """Where the launch table for ``device`` comes from (recorded by the benchmark)."""
    dev = torch.device(device) if device is not None else None
    t = active_table(dev)
    out: Dict[str, Any] = {"source": t.source, "entries": len(t.entries), "env": os.environ.get(TABLE_ENV)}
    if dev is not None and dev.type == "cuda":
        name = _cuda_name(_device_index(dev))
        out["device_name"] = name
        out["packaged_file"] = os.path.join(TABLES_DIR, device_table_name(name) + ".json")
    for k in ("device", "created"):
        if k in t.info:
            out[f"table_{k}"] = t.info[k]
    return out


# ----------------------------------------------------------------------------------------- launches
def _fused_tile(cfg: Launch, M: int) -> Tuple[int, int]:
    """(BLOCK_M, num_warps) actually launched: ``cfg.rows`` cut to next_pow2(M), warps scaled with it."""
    block_m = max(1, min(cfg.rows, triton.next_power_of_2(M)))
    warps = cfg.num_warps
    if block_m < cfg.rows:
        warps = max(min(4, warps), warps * block_m // cfg.rows)
    return block_m, warps


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(t: Tensor) -> int:
    if t.is_cuda:
        return _cuda_sms(_device_index(t))
    return _CPU_SMS  # interpreter on CPU tensors: never touch torch.cuda here


def _device_ctx(t: Tensor):
    # Triton launches on the current CUDA device: make it the tensor's device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
    offset: float = 0.0,
    round_normalized: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    M, N = x.shape
    if x.numel() == 0:
        return reference.forward(x, residual, weight, bias, eps, rms, offset, round_normalized)
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    weight = _effective_weight(weight, offset)
    bias = bias.contiguous() if bias is not None else None
    acc = reference.stat_dtype(x.dtype)
    y = torch.empty_like(x)
    z = torch.empty_like(x) if residual is not None else None
    mean = None if rms else torch.empty((M,), dtype=acc, device=x.device)
    rstd = torch.empty((M,), dtype=acc, device=x.device)
    cfg = active_table(x).lookup("fwd", x.dtype, triton.next_power_of_2(N))
    _launch_forward(cfg, x, residual, weight, bias, y, z, mean, rstd, eps, rms, round_normalized)
    return y, z, mean, rstd


def _effective_weight(weight: Optional[Tensor], offset: float) -> Optional[Tensor]:
    """The weight the kernels multiply by: ``offset + weight`` in float32 when offset != 0."""
    if weight is None:
        return None
    if offset == 0.0:
        return weight.contiguous()
    return (weight.to(reference.stat_dtype(weight.dtype)) + offset).contiguous()


def _launch_forward(cfg: Launch, x, residual, weight, bias, y, z, mean, rstd, eps, rms, round_normalized=False) -> None:
    """Forward into preallocated outputs (contiguous tensors; the tuner calls this directly)."""
    M, N = x.shape
    args = (x, residual, weight, bias, y, z, mean, rstd, M, N, float(eps))
    flags = dict(
        ACC=_acc(x.dtype), HAS_RES=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, RMS=bool(rms), ROUND=bool(round_normalized) and x.dtype != reference.stat_dtype(x.dtype),
    )
    with _device_ctx(x):
        if cfg.kernel == "fused":
            block_m, warps = _fused_tile(cfg, M)
            _fwd_fused[(triton.cdiv(M, block_m),)](
                *args, **flags, BLOCK_M=block_m, BLOCK_N=triton.next_power_of_2(N), num_warps=warps
            )
        else:
            _fwd_wide[(M,)](*args, **flags, BLOCK_N=cfg.block, num_warps=cfg.num_warps)


def _persistent_split(M: int, block_m: int, programs: int) -> Tuple[int, int]:
    """(rows per program, programs actually launched): contiguous row ranges, multiples of block_m.

    The partial buffer is sized by the returned count, which is exactly the grid."""
    blocks = triton.cdiv(M, block_m)
    rows_per_prog = triton.cdiv(blocks, max(1, min(programs, blocks))) * block_m
    return rows_per_prog, triton.cdiv(M, rows_per_prog)


class _BwdPlan(NamedTuple):
    cfg: Launch
    block_m: int
    num_warps: int
    rows_per_prog: int
    programs: int      # rows of the partial buffers
    col_blocks: int    # wide: column blocks (grid dim 0); fused: 1


def _bwd_plan(cfg: Launch, M: int, N: int, sms: int) -> _BwdPlan:
    if cfg.kernel == "fused":
        block_m, warps = _fused_tile(cfg, M)
        rows_per_prog, programs = _persistent_split(M, block_m, sms * cfg.programs_per_sm)
        return _BwdPlan(cfg, block_m, warps, rows_per_prog, programs, 1)
    col_blocks = triton.cdiv(N, cfg.block)
    groups = triton.cdiv(sms * cfg.programs_per_sm, col_blocks)
    rows_per_prog, programs = _persistent_split(M, 1, groups)
    return _BwdPlan(cfg, 1, cfg.num_warps, rows_per_prog, programs, col_blocks)


def _bwd_buffers(plan: _BwdPlan, z: Tensor, has_w: bool, has_b: bool, rms: bool):
    """(dx, dweight partials, dbias partials, c1, c2) for ``plan`` (c1/c2: wide kernels only)."""
    M, N = z.shape
    acc = reference.stat_dtype(z.dtype)
    dx = torch.empty_like(z)
    dwp = torch.empty((plan.programs, N), dtype=acc, device=z.device) if has_w else None
    dbp = torch.empty((plan.programs, N), dtype=acc, device=z.device) if has_b else None
    c1 = c2 = None
    if plan.cfg.kernel == "wide":
        c1 = torch.empty((M,), dtype=acc, device=z.device)
        c2 = None if rms else torch.empty((M,), dtype=acc, device=z.device)
    return dx, dwp, dbp, c1, c2


def _launch_backward(plan: _BwdPlan, dy, dz, z, weight, mean, rstd, rms, has_b, dx, dwp, dbp, c1, c2,
                     round_normalized=False) -> None:
    """Backward kernels into preallocated buffers (contiguous tensors; the tuner calls this directly)."""
    M, N = z.shape
    flags = dict(ACC=_acc(z.dtype), HAS_W=weight is not None, HAS_B=has_b, RMS=bool(rms))
    rounded = bool(round_normalized) and z.dtype != reference.stat_dtype(z.dtype)
    with _device_ctx(z):
        if plan.cfg.kernel == "fused":
            _bwd_fused[(plan.programs,)](
                dy, dz, z, weight, mean, rstd, dx, dwp, dbp, M, N, plan.rows_per_prog,
                **flags, HAS_DZ=dz is not None, ROUND=rounded, BLOCK_M=plan.block_m,
                BLOCK_N=triton.next_power_of_2(N), num_warps=plan.num_warps,
            )
        else:
            block = plan.cfg.block
            _bwd_wide_rows[(M,)](
                dy, z, weight, mean, rstd, c1, c2, N,
                ACC=flags["ACC"], HAS_W=flags["HAS_W"], RMS=flags["RMS"], BLOCK_N=block,
                num_warps=plan.num_warps,
            )
            _bwd_wide_cols[(plan.col_blocks, plan.programs)](
                dy, dz, z, weight, mean, rstd, c1, c2, dx, dwp, dbp, M, N, plan.rows_per_prog,
                **flags, HAS_DZ=dz is not None, ROUND=rounded, BLOCK_M=1, BLOCK_N=block,
                num_warps=plan.num_warps,
            )


def backward(
    dy: Tensor,
    dz: Optional[Tensor],
    z: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Optional[Tensor],
    rstd: Tensor,
    rms: bool,
    offset: float = 0.0,
    round_normalized: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    M, N = z.shape
    if z.numel() == 0:
        return reference.backward(dy, dz, z, weight, bias, mean, rstd, rms, offset, round_normalized)
    z = z.contiguous()
    dy = dy.contiguous()
    dz = dz.contiguous() if dz is not None else None
    param_dtype = weight.dtype if weight is not None else None
    weight = _effective_weight(weight, offset)
    cfg = active_table(z).lookup("bwd", z.dtype, triton.next_power_of_2(N))
    plan = _bwd_plan(cfg, M, N, _sm_count(z))
    dx, dwp, dbp, c1, c2 = _bwd_buffers(plan, z, weight is not None, bias is not None, rms)
    _launch_backward(plan, dy, dz, z, weight, mean, rstd, rms, bias is not None, dx, dwp, dbp, c1, c2,
                     round_normalized)
    # fixed-order reduction of the per-program partials: deterministic
    dweight = dwp.sum(dim=0).to(param_dtype) if weight is not None else None
    dbias = dbp.sum(dim=0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
