"""Whole-model benchmark of :func:`layernorm.patch`: Hugging Face families, patched against unpatched.

For each family a random-init model is built from a small config (nothing is downloaded), copied,
and the copies are patched (``patched``) and, for Llama-layout families, patched with the fused
residual (``patched+fused``). Two steps are timed, the providers interleaved call by call (rotating
order) so that load drifting on a shared machine hits them alike:

- ``inference``: ``model(**inputs)`` under ``torch.no_grad()``;
- ``train``: ``zero_grad``, forward with labels, ``loss.backward()``, ``AdamW.step()``.

Reported per (family, provider, step): median, quartiles and minimum in ms over ``reps`` calls, and
the ratio of medians to ``unpatched``; plus, once per family, the largest |logits| difference of
each patched copy from the unpatched model on the same input (before any training step).

Sizes: ``tiny`` (hidden 32, 2 layers, batch 2 x 16 tokens: per-call overheads dominate) and
``small`` (hidden 256, 2 layers, intermediate 688, batch 4 x 128 tokens).

:func:`fused_step` times the one step ``fuse_residual`` changes, alone: ``s = residual + h;
rms_norm(s)`` against ``add_rms_norm(h, residual)`` (Llama casting), with ``F.rms_norm`` for scale.

:func:`agreement` measures no time: per family, how closely the patched model follows the unpatched
one (float32 and bfloat16 logits, 5 AdamW steps, state_dict round trip), written to
``models-agreement-<device>.json``.

Use :func:`run` from Python (the CLI wiring is ``layernorm bench --models``) or
``python -m layernorm.bench.models --families llama,gpt2 --size small``. On CPU run it with the malloc
settings of ``layernorm.bench._malloc`` in the environment (recorded in the JSON), or large per-call
allocations time page faults: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ._machine import describe_machine
from ._malloc import malloc_state
from ._timing import gc_paused, rotating_rounds

__all__ = ["FAMILIES", "SIZES", "build_model", "model_inputs", "perturb_norms", "run", "agreement", "fused_step",
           "main"]

# hidden, layers, heads, kv heads, intermediate, vocab, batch, seq
SIZES: Dict[str, dict] = {
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=2, inter=64, vocab=96, batch=2, seq=16),
    "small": dict(hidden=256, layers=2, heads=4, kv_heads=2, inter=688, vocab=512, batch=4, seq=128),
}


def _decoder(model_type: str, **extra):
    def make(s):
        kw = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  num_key_value_heads=s["kv_heads"], max_position_embeddings=max(64, s["seq"]),
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
        kw.update({k: (v(s) if callable(v) else v) for k, v in extra.items()})
        return model_type, "causal", kw
    return make


def _head_dim(s):
    return s["hidden"] // s["heads"]


def _gpt2(s):
    return "gpt2", "causal", dict(vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                                  n_inner=s["inter"], n_positions=max(64, s["seq"]), bos_token_id=1, eos_token_id=2)


def _gpt_neox(s):
    return "gpt_neox", "causal", dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                      max_position_embeddings=max(64, s["seq"]), bos_token_id=1, eos_token_id=2)


def _opt(s):
    return "opt", "causal", dict(vocab_size=s["vocab"], hidden_size=s["hidden"], ffn_dim=s["inter"],
                                 num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                 max_position_embeddings=max(64, s["seq"]), word_embed_proj_dim=s["hidden"],
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _falcon(s):
    return "falcon", "causal", dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                    num_attention_heads=s["heads"], bos_token_id=1, eos_token_id=2)


def _phi(s):
    return "phi", "causal", dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                                 num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                 max_position_embeddings=max(64, s["seq"]), bos_token_id=1, eos_token_id=2)


def _bert(s):
    return "bert", "masked", dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                  max_position_embeddings=max(64, s["seq"]), pad_token_id=0)


def _t5(s):
    return "t5", "seq2seq", dict(vocab_size=s["vocab"], d_model=s["hidden"], d_kv=_head_dim(s), d_ff=s["inter"],
                                 num_layers=s["layers"], num_heads=s["heads"], pad_token_id=0, eos_token_id=2,
                                 decoder_start_token_id=0)


# family -> config maker (size dict -> (model_type, head kind, config kwargs)). Dropout stays at the
# configs' defaults; build_model puts models in eval mode, and training comparisons turn dropout off.
FAMILIES: Dict[str, Callable[[dict], tuple]] = {
    "llama": _decoder("llama"),
    "mistral": _decoder("mistral"),
    "qwen2": _decoder("qwen2"),
    "qwen3": _decoder("qwen3", head_dim=_head_dim),
    "phi3": _decoder("phi3"),
    "olmo": _decoder("olmo"),
    "olmo2": _decoder("olmo2"),
    "gemma": _decoder("gemma", head_dim=_head_dim),
    "gemma2": _decoder("gemma2", head_dim=_head_dim),
    "gemma3": _decoder("gemma3_text", head_dim=_head_dim),
    "cohere": _decoder("cohere"),
    "t5": _t5,
    "gpt2": _gpt2,
    "bert": _bert,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
    "falcon": _falcon,
    "phi": _phi,
}


def _transformers_version() -> Optional[str]:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _no_dropout(kw: dict) -> dict:
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "summary_first_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                "dropout_rate", "activation_dropout", "residual_dropout", "embedding_dropout"):
        kw[key] = 0.0
    return kw


def build_model(family: str, size: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                dropout: bool = False) -> nn.Module:
    """A random-init Hugging Face model of ``family`` (see :data:`FAMILIES`) at ``size``, in eval mode.

    ``dropout=False`` sets every dropout probability of the config to 0, so that training steps of two
    copies can be compared. Needs ``transformers``; downloads nothing.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, but got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, but got {size!r}")
    model_type, head, kw = FAMILIES[family](SIZES[size])
    if not dropout:
        kw = _no_dropout(dict(kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(model_type, **kw)
        auto = {"causal": transformers.AutoModelForCausalLM, "masked": transformers.AutoModelForMaskedLM,
                "seq2seq": transformers.AutoModelForSeq2SeqLM}[head]
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=dtype)
    return model.eval()


def perturb_norms(model: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Adds ``scale * N(0, 1)`` to every parameter of every norm-like module (those initialised to ones
    or zeros, under which a wrong offset or casting would go unseen). In place; returns ``model``."""
    from ..patching.registry import is_norm_like

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if is_norm_like(module):
                for p in module.parameters(recurse=False):
                    p.add_((scale * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return model


def model_inputs(family: str, model: nn.Module, size: str = "tiny", *, seed: int = 0,
                 batch: Optional[int] = None, seq: Optional[int] = None) -> dict:
    """Keyword inputs with labels for one step of ``model`` (token ids avoiding the special ids 0-2)."""
    s = SIZES[size]
    batch, seq = batch or s["batch"], seq or s["seq"]
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(3, s["vocab"], (batch, seq), generator=gen).to(device)
    labels = torch.randint(3, s["vocab"], (batch, seq), generator=gen).to(device)
    if FAMILIES[family](s)[1] == "seq2seq":
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids if FAMILIES[family](s)[1] == "causal" else labels}


def _samples(fns: Dict[str, Callable[[], object]], reps: int, warmup: int, sync: Callable[[], None]) -> Dict[str, List[float]]:
    """Per provider, ``reps`` times in ms, one call of each provider per round in rotating order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    with gc_paused():
        return rotating_rounds(fns, reps, sync)


def _stats(ms: List[float]) -> dict:
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(ms), "reps": len(ms)}


def _providers(family: str, size: str, dtype: torch.dtype, device: torch.device, backend: Optional[str],
               fuse: bool) -> Dict[str, nn.Module]:
    import layernorm

    base = perturb_norms(build_model(family, size, dtype=dtype)).to(device)
    models = {"unpatched": base}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models["patched"] = layernorm.patch(copy.deepcopy(base), backend=backend)
        if fuse:
            fused, report = layernorm.patch(copy.deepcopy(base), backend=backend, fuse_residual=True,
                                            return_report=True)
            if report.fused:
                models["patched+fused"] = fused
    return models


def run(families: Sequence[str] = ("llama", "qwen3", "gemma", "gpt2"), *, size: str = "small",
        dtype: torch.dtype = torch.float32, device: str = "cpu", backend: Optional[str] = None,
        steps: Sequence[str] = ("inference", "train"), reps: int = 20, warmup: int = 3,
        fuse_residual: bool = True, out_dir: Optional[str] = os.path.join("benchmarks", "results"),
        tag: str = "") -> dict:
    """Times patched against unpatched models; returns the result (and writes it as JSON to
    ``out_dir/models-<device>-<size>[-<dtype>][-<tag>].json`` unless ``out_dir`` is None)."""
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    rows: List[dict] = []
    agreement: Dict[str, dict] = {}
    for family in families:
        models = _providers(family, size, dtype, dev, backend, fuse_residual)
        inputs = model_inputs(family, models["unpatched"], size)
        with torch.no_grad():
            logits = {k: m(**inputs).logits.float() for k, m in models.items()}
        agreement[family] = {k: float((v - logits["unpatched"]).abs().max()) for k, v in logits.items()
                             if k != "unpatched"}
        for step in steps:
            fns = {}
            for name, model in models.items():
                if step == "inference":
                    def fn(model=model):
                        with torch.no_grad():
                            model(**inputs)
                else:
                    model.train()
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

                    def fn(model=model, opt=opt):
                        opt.zero_grad(set_to_none=True)
                        model(**inputs).loss.backward()
                        opt.step()
                fns[name] = fn
            samples = _samples(fns, reps, warmup, sync)
            base_median = statistics.median(samples["unpatched"])
            for name, ms in samples.items():
                row = {"family": family, "step": step, "provider": name, **_stats(ms)}
                row["ratio_to_unpatched"] = row["median_ms"] / base_median
                rows.append(row)
            for model in models.values():
                model.eval()
    result = {
        "benchmark": "models",
        "size": size,
        "shape": SIZES[size],
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(dev),
        "backend": backend or "auto",
        "method": {
            "clock": "time.perf_counter around each call" + (" after cuda synchronize" if dev.type == "cuda" else ""),
            "order": "one call per provider per round, rotating order; gc off while timing",
            "warmup_rounds": warmup,
            "reps": reps,
            "statistic": "median, quartiles, min (ms); ratio = median / unpatched median",
        },
        "transformers": _transformers_version(),
        "logits_max_abs_diff": agreement,
        "results": rows,
        "malloc": malloc_state(dev),
        "machine": describe_machine(),
    }
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        suffix = ("" if dtype == torch.float32 else f"-{result['dtype']}") + (f"-{tag}" if tag else "")
        path = os.path.join(out_dir, f"models-{dev.type}-{size}{suffix}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        result["path"] = path
    return result


def fused_step(shapes: Sequence[tuple] = ((512, 256), (4096, 1024)),
               dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16), *, reps: int = 100,
               warmup: int = 5, out_dir: Optional[str] = os.path.join("benchmarks", "results")) -> dict:
    """The post-attention step of a Llama layer, unfused and fused, on (rows, hidden) inputs."""
    from .. import add_rms_norm, rms_norm

    rows = []
    for dtype in dtypes:
        for M, N in shapes:
            gen = torch.Generator().manual_seed(0)
            h, r = (torch.randn(M, N, generator=gen).to(dtype) for _ in range(2))
            w = (1 + 0.1 * torch.randn(N, generator=gen)).to(dtype)

            def unfused():
                total = r + h
                return rms_norm(total, (N,), w, 1e-6, casting_mode="llama"), total

            def fused():
                return add_rms_norm(h, r, (N,), w, 1e-6, casting_mode="llama")

            def torch_unfused():
                total = r + h
                return torch.nn.functional.rms_norm(total, (N,), w, 1e-6), total

            samples = _samples({"add + rms_norm": unfused, "add_rms_norm": fused, "add + F.rms_norm": torch_unfused},
                               reps, warmup, lambda: None)
            for name, ms in samples.items():
                rows.append({"dtype": str(dtype).replace("torch.", ""), "rows": M, "hidden": N, "provider": name,
                             **_stats(ms)})
    result = {"benchmark": "models-fused-step", "results": rows, "malloc": malloc_state("cpu"),
              "machine": describe_machine()}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "models-fused-step-cpu.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        result["path"] = path
    return result


def _adamw_losses(model: nn.Module, inputs: dict, steps: int) -> List[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        out.append(loss.item())
    model.eval()
    return out


def agreement(families: Sequence[str] = tuple(FAMILIES), *, size: str = "tiny", steps: int = 5,
              fuse_residual: bool = False, out_dir: Optional[str] = os.path.join("benchmarks", "results")) -> dict:
    """Per family: what was swapped, and the largest differences of the patched model from the
    unpatched one: float32 logits; bfloat16 logits, next to the unpatched bfloat16 model's own
    distance from float32 (flash-attn's rule compares the two); ``steps`` AdamW losses (largest
    relative difference); and whether state_dict round trips both ways give identical logits."""
    import layernorm

    rows = {}
    for family in families:
        ref = perturb_norms(build_model(family, size), seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, report = layernorm.patch(copy.deepcopy(ref), fuse_residual=fuse_residual, return_report=True)
        inputs = model_inputs(family, ref, size)
        with torch.no_grad():
            fp32 = float((model(**inputs).logits - ref(**inputs).logits).abs().max())
            ref16, model16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(model).bfloat16()
            exact = copy.deepcopy(ref16).float()(**inputs).logits
            theirs16, ours16 = ref16(**inputs).logits.float(), model16(**inputs).logits.float()
        fresh = build_model(family, size, seed=5)
        fresh.load_state_dict(model.state_dict(), strict=True)
        back = copy.deepcopy(model)
        back.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            round_trip = bool(torch.equal(fresh(**inputs).logits, ref(**inputs).logits)) and \
                bool(torch.equal(back(**inputs).logits, model(**inputs).logits))
        losses_ref = _adamw_losses(copy.deepcopy(ref), inputs, steps)
        losses = _adamw_losses(copy.deepcopy(model), inputs, steps)
        rows[family] = {
            "swapped": len(report.swapped), "left": len(report.left), "fused": len(report.fused),
            "classes": sorted({e.cls.rsplit(".", 1)[-1] for e in report.swapped}),
            "mapping": sorted({e.mapping for e in report.swapped}),
            "logits_fp32_max_abs_diff": fp32,
            "logits_bf16_patched_vs_unpatched_max_abs_diff": float((ours16 - theirs16).abs().max()),
            "logits_bf16_patched_err_vs_fp32": float((ours16 - exact).abs().max()),
            "logits_bf16_unpatched_err_vs_fp32": float((theirs16 - exact).abs().max()),
            "adamw_losses_unpatched": losses_ref,
            "adamw_losses_max_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, losses_ref)),
            "state_dict_round_trip_identical": round_trip,
        }
    result = {"benchmark": "models-agreement", "transformers": _transformers_version(), "size": size, "steps": steps, "fuse_residual": fuse_residual,
              "families": rows, "machine": describe_machine()}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"models-agreement-cpu{'-fused' if fuse_residual else ''}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        result["path"] = path
    return result


def _print_agreement(result: dict) -> None:
    print(f"{'family':9} {'swapped':>7} {'fp32 logits':>11} {'bf16 vs unp.':>12} {'bf16 err ours/theirs':>21} "
          f"{'loss rel':>9} {'sd':>3}")
    for fam, r in result["families"].items():
        print(f"{fam:9} {r['swapped']:7d} {r['logits_fp32_max_abs_diff']:11.2e} "
              f"{r['logits_bf16_patched_vs_unpatched_max_abs_diff']:12.2e} "
              f"{r['logits_bf16_patched_err_vs_fp32']:10.2e}/{r['logits_bf16_unpatched_err_vs_fp32']:.2e} "
              f"{r['adamw_losses_max_rel_diff']:9.1e} {'ok' if r['state_dict_round_trip_identical'] else 'NO':>3}")
    if "path" in result:
        print(f"written: {result['path']}")


def _print(result: dict) -> None:
    print(f"models bench: size={result['size']} dtype={result['dtype']} device={result['device']} "
          f"backend={result['backend']}")
    print(f"{'family':10} {'step':10} {'provider':14} {'median ms':>10} {'p25':>8} {'p75':>8} {'ratio':>6}")
    for r in result["results"]:
        print(f"{r['family']:10} {r['step']:10} {r['provider']:14} {r['median_ms']:10.3f} {r['p25_ms']:8.3f} "
              f"{r['p75_ms']:8.3f} {r['ratio_to_unpatched']:6.3f}")
    for fam, diffs in result["logits_max_abs_diff"].items():
        print(f"{fam}: logits max |diff| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if "path" in result:
        print(f"written: {result['path']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="layernorm bench --models", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="llama,qwen3,gemma,gpt2",
                   help="comma-separated, or all; from: " + ",".join(FAMILIES))
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", default="inference,train")
    p.add_argument("--no-fuse", action="store_true", help="skip the patched+fused provider")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--agreement", action="store_true", help="measure agreement (no timing) instead")
    p.add_argument("--fused-step", action="store_true", help="time the fused residual step alone instead")
    a = p.parse_args(argv)
    if a.fused_step:
        result = fused_step(dtypes=[getattr(torch, d) for d in ("float32", "bfloat16")], reps=a.reps,
                            out_dir=a.out or None)
        for r in result["results"]:
            print(f"{r['dtype']:9} {r['rows']:5d}x{r['hidden']:<5d} {r['provider']:17} {r['median_ms']:9.4f} ms "
                  f"(p25 {r['p25_ms']:.4f}, p75 {r['p75_ms']:.4f})")
        return 0
    if a.agreement:
        families = list(FAMILIES) if a.families == "all" else [f for f in a.families.split(",") if f]
        _print_agreement(agreement(families, size=a.size, fuse_residual=not a.no_fuse, out_dir=a.out or None))
        return 0
    families = list(FAMILIES) if a.families == "all" else [f for f in a.families.split(",") if f]
    result = run(families, size=a.size, dtype=getattr(torch, a.dtype),
                 device=a.device, backend=a.backend, steps=a.steps.split(","), reps=a.reps, warmup=a.warmup,
                 fuse_residual=not a.no_fuse, out_dir=a.out or None, tag=a.tag)
    _print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
