"""Recurrent nets on English text: a character-level language model at sequence length 100.

This is where Ba et al. (2016) and Cooijmans et al. (2016) test normalized recurrent nets: language
modelling on long sequences, reporting both the final bits per character and how fast training gets
there. Every kind (``nn.LSTM``, ``LayerNormLSTM``, ``BatchNormLSTM``, ``nn.GRU``, ``LayerNormGRU``)
is trained on the same random windows of Python's documentation text per seed, with the same
optimizer, and scored on the same validation windows (the last 10% of the text, never trained on).

Criteria (fixed before the run):

- end: final validation bits per character, difference of at least :data:`END_EFFECT_BPC`;
- speed: steps to reach :data:`TARGET_BPC` on the validation windows, saving at least 10% of the
  budget (``recurrent.SPEED_EFFECT_FRACTION``);
- a pair's verdict: ``stats.decide_either`` (better on one measure, not significantly worse on the other).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from ..data import describe_text, load_text
from ..experiment import Context, claim
from ..figures import COLORS, differences, pyplot, savefig
from ..models import RNN_KINDS, RNN_NAMES, CharLM, parameter_count
from ..pool import Job
from ..recurrent import SPEED_EFFECT_FRACTION, divergence, judge_pair, plot_curves, steps_to_target
from ..stats import summarize
from ..training import seed_for, train

NAME = "rnn-text"
TITLE = "Recurrent nets on English text (character-level language model, T = 100)"

# ---- criteria (fixed before the run) ----
TARGET_BPC = 2.0 / math.log(2)   # 2.0 nats per character = 2.885 bits per character
END_EFFECT_BPC = 0.05            # a difference in final bits per character that matters
CRITERIA = {"target_bpc": round(TARGET_BPC, 4), "end_effect_bpc": END_EFFECT_BPC,
            "speed_effect_fraction_of_budget": SPEED_EFFECT_FRACTION}

FULL = {"seq_len": 100, "batch": 32, "hidden": 128, "embed": 32, "lr": 2e-3, "clip": 1.0, "steps": 150,
        "eval_every": 10, "eval_windows": 32, "final_windows": 128}
QUICK = {**FULL, "steps": 12, "eval_every": 4, "eval_windows": 8, "final_windows": 16}
# measured ms per training step of each kind at the FULL sizes on one core (orders the job queue only)
_MS_PER_STEP = {"lstm": 30, "ln-lstm": 41, "bn-lstm": 185, "gru": 43, "ln-gru": 47}

QUOTE_BETTER = ("that's exactly why layer normalization is better for rnns it's because it's no longer about the "
                "batch but about the layer that we're doing the calculations on or in rnn terms the time step that "
                "we're doing the calculations on")
QUOTE_IMPROVES = "removing the dependency on batch size and improving the performance of recurrent neural networks"


def _windows(ids: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``length`` consecutive characters, (n, length)."""
    starts = torch.randint(0, len(ids) - length, (n,), generator=gen)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


@torch.no_grad()
def _bpc(model: torch.nn.Module, windows: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count / math.log(2)


def job(kind: str, seed: int, cfg: Dict) -> Dict:
    """Train one char-level LM of ``kind`` with ``seed``; validation bits per character along the way."""
    text = load_text()
    T = cfg["seq_len"]
    torch.manual_seed(seed_for(seed, 51))
    model = CharLM(kind, text.vocab_size, cfg["hidden"], max_length=T, embed=cfg["embed"])
    gen = torch.Generator().manual_seed(seed_for(seed, 52))
    # the same validation windows for every kind and seed
    valid = _windows(text.valid, cfg["eval_windows"], T + 1, torch.Generator().manual_seed(1234))
    final_valid = _windows(text.valid, cfg["final_windows"], T + 1, torch.Generator().manual_seed(4321))

    def loss_fn(m, w):
        logits = m(w[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))

    out = train(model, steps=cfg["steps"], next_batch=lambda step: _windows(text.train, cfg["batch"], T + 1, gen),
                loss_fn=loss_fn, lr=cfg["lr"], clip=cfg["clip"],
                eval_at=range(0, cfg["steps"] + 1, cfg["eval_every"]), evaluate=lambda: {"bpc": _bpc(model, valid)})
    bpc = [e["bpc"] for e in out["evals"]]
    return {"kind": kind, "seed": seed, "eval_steps": out["eval_steps"], "bpc": bpc,
            "train_bpc": [None if x is None else x / math.log(2) for x in out["train_loss"]],
            "final": _bpc(model, final_valid),
            "steps_to_target": steps_to_target(out["eval_steps"], bpc, TARGET_BPC, higher=False),
            "diverged_at": out["diverged_at"], "params": parameter_count(model)}


def plan(ctx: Context) -> List[Job]:
    cfg = QUICK if ctx.quick else FULL
    return [Job(NAME, i, job, {"kind": k, "seed": s, "cfg": cfg}, _MS_PER_STEP[k] * cfg["steps"] / 1000)
            for i, (k, s) in enumerate((k, s) for k in RNN_KINDS for s in ctx.seeds)]


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    cfg = QUICK if ctx.quick else FULL
    S = ctx.seeds
    by = {(r["kind"], r["seed"]): r for r in results}
    common = dict(higher=False, min_end=END_EFFECT_BPC, end_unit="bits/char", budget=cfg["steps"],
                  target=round(TARGET_BPC, 3), metric="validation bits/char")
    ln_bn = judge_pair(by, "ln-lstm", "bn-lstm", S, **common)
    ln_lstm = judge_pair(by, "ln-lstm", "lstm", S, **common)
    ln_gru = judge_pair(by, "ln-gru", "gru", S, **common)
    final = {k: summarize([by[k, s]["final"] for s in S]) for k in RNN_KINDS}
    reach = {k: [by[k, s]["steps_to_target"] for s in S] for k in RNN_KINDS}
    diverged = divergence(results)
    scope = f"char-level LM on Python's documentation text, T = {cfg['seq_len']}, {cfg['steps']} steps"
    rule = (f"Each model trains {cfg['steps']} steps (batch {cfg['batch']}, hidden {cfg['hidden']}, Adam "
            f"{cfg['lr']:g}, gradient norm clipped at {cfg['clip']:g}) on random {cfg['seq_len']}-character windows. "
            f"End: final validation bits per character, paired per seed, at least {END_EFFECT_BPC} lower with the "
            f"95% t-interval above 0. Speed: steps to reach {TARGET_BPC:.3f} bits per character (2.0 nats) on the "
            f"validation windows, at least 10% of the budget fewer with the interval above 0 (a seed that never "
            f"reaches it counts as the whole budget). A pair is supported when one measure is and the other is not "
            f"significantly reversed; not supported when neither is.")
    evidence = {"final_valid_bpc": final, "steps_to_target": reach, "target_bpc": round(TARGET_BPC, 4),
                "diverged_seeds": diverged, "params": {k: by[k, S[0]]["params"] for k in RNN_KINDS}, "seeds": S}
    claims = [
        claim("ln-better-for-rnns-text", NAME, "LN is better for RNNs than BN (LSTM)", QUOTE_BETTER,
              rule + " Pair: LayerNormLSTM vs BatchNormLSTM.", {"ln_lstm_vs_bn_lstm": ln_bn}, evidence, scope=scope),
        claim("ln-improves-rnns-text", NAME, "LN improves RNNs (LSTM and GRU)", QUOTE_IMPROVES,
              rule + " Pairs: LayerNormLSTM vs nn.LSTM and LayerNormGRU vs nn.GRU; both must be supported.",
              {"ln_lstm_vs_lstm": ln_lstm, "ln_gru_vs_gru": ln_gru}, evidence,
              note="Quoted from the lecture's description. LayerNormLSTM/GRU carry a few more parameters (the "
                   "gains and shifts): see evidence.params.", scope=scope),
    ]
    fig = _figure(ctx, by, S, cfg, ln_bn, ln_lstm, ln_gru)
    rows = [{"kind": r["kind"], "seed": r["seed"], "step": st, "valid_bpc": v, "train_bpc": tb}
            for r in results for st, v, tb in zip(r["eval_steps"], r["bpc"], r["train_bpc"])]
    rows += [{"kind": r["kind"], "seed": r["seed"], "step": "final", "valid_bpc": r["final"],
              "steps_to_target": r["steps_to_target"], "diverged_at": r["diverged_at"]} for r in results]
    return {"config": {**cfg, "kinds": list(RNN_KINDS), "text": describe_text(), "target_bpc": round(TARGET_BPC, 4)},
            "summary": {"final_valid_bpc": final, "steps_to_target": reach, "diverged_seeds": diverged,
                        "pairs": {"ln-lstm/bn-lstm": ln_bn, "ln-lstm/lstm": ln_lstm, "ln-gru/gru": ln_gru}},
            "claims": claims, "metrics": rows, "figures": [fig]}


def _figure(ctx, by, S, cfg, ln_bn, ln_lstm, ln_gru) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.4, 1, 1]})
    plot_curves(axes[0], by, RNN_KINDS, S, "bpc", f"Validation bits per character (T = {cfg['seq_len']})",
                "bits per character (lower is better)", target=round(TARGET_BPC, 3))
    pairs = [("LayerNormLSTM - BatchNormLSTM", ln_bn, COLORS["bn"]), ("LayerNormLSTM - nn.LSTM", ln_lstm,
                                                                      COLORS["none"]),
             ("LayerNormGRU - nn.GRU", ln_gru, COLORS["none"])]
    differences(axes[1], [(n, p["measures"]["end"]["difference"]["values"], c) for n, p, c in pairs],
                "bits per char", "Final bits per char saved by LN (paired per seed)", END_EFFECT_BPC)
    differences(axes[2], [(n, p["measures"]["speed"]["difference"]["values"], c) for n, p, c in pairs], "steps",
                f"Steps saved by LN to reach {TARGET_BPC:.3f} bits/char", SPEED_EFFECT_FRACTION * cfg["steps"])
    fig.suptitle(f"Character-level language model, {len(S)} seeds: {', '.join(RNN_NAMES[k] for k in RNN_KINDS)}",
                 fontsize=11)
    fig.tight_layout()
    return savefig(fig, ctx.fig_dir, "rnn-text.png")
