"""Variable-length sequences: real paragraphs of varying length, trained up to L characters, tested up to 4L.

Character-level language models (``nn.LSTM``, ``LayerNormLSTM``, ``BatchNormLSTM``) train on the
paragraphs of Python's documentation text, each cut to at most L characters, so the batches mix
lengths (a paragraph shorter than L stays short) and are packed (``PackedSequence``). They are tested
on validation paragraphs of at least 4L characters, read to 4L: bits per character at positions
[0, L), [L, 2L) and [2L, 4L). ``BatchNormLSTM`` keeps statistics per step for the L trained steps and
reuses the last one beyond (Cooijmans et al.); LayerNorm needs no per-step table.

Also measured: a long paragraph's training-mode output when its batch-mates are long versus short
(BatchNorm's per-step statistics are taken over whichever sequences are still running).

Criteria (fixed before the run): (a) LN's output independent of the batch-mates' lengths
(max |diff| <= :data:`EXACT_TOL`), BN's not (> :data:`DEPENDENCE_TOL`); (b) bits per character at
positions [2L, 4L): BatchNormLSTM minus LayerNormLSTM at least :data:`END_EFFECT_BPC`.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List

import torch
import torch.nn.functional as F

from ..data import describe_text, load_text
from ..experiment import Context, claim, labelled
from ..figures import COLORS, ci_err, differences, pyplot, rnn_style, savefig
from ..models import CharLM, parameter_count
from ..pool import Job
from ..stats import decide_checks, decide_effect, summarize
from ..training import seed_for, train

NAME = "variable-length"
TITLE = "Variable-length sequences (paragraphs of English text, trained up to L, tested to 4L)"
KINDS = ("lstm", "ln-lstm", "bn-lstm")

# ---- criteria (fixed before the run) ----
EXACT_TOL = 1e-6         # "does not depend on": max |difference| allowed
DEPENDENCE_TOL = 1e-3    # "depends on": max |difference| must exceed this
END_EFFECT_BPC = 0.05    # a difference in bits per character that matters
CRITERIA = {"exact_tol": EXACT_TOL, "dependence_tol": DEPENDENCE_TOL, "end_effect_bpc": END_EFFECT_BPC}

FULL = {"max_train_len": 50, "batch": 32, "hidden": 128, "embed": 32, "lr": 2e-3, "clip": 1.0, "steps": 150}
QUICK = {**FULL, "steps": 15}
_MS_PER_STEP = {"lstm": 20, "ln-lstm": 25, "bn-lstm": 110}   # one core, orders the job queue only


def _fmt_bound(x) -> str:
    return "undefined" if x is None else f"{x:+.2f}"


def _batch(paragraphs: List[torch.Tensor], idx: List[int], max_len: int):
    """Padded (inputs, targets, lengths) of the paragraphs ``idx``, each cut to ``max_len`` inputs."""
    seqs = [paragraphs[i][:max_len + 1] for i in idx]
    lengths = torch.tensor([len(s) - 1 for s in seqs])
    T = int(lengths.max())
    x = torch.zeros(len(seqs), T, dtype=torch.int64)
    y = torch.full((len(seqs), T), -100, dtype=torch.int64)   # -100: ignored by cross_entropy
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1] = s[:-1]
        y[i, :len(s) - 1] = s[1:]
    return x, y, lengths


@torch.no_grad()
def _bpc_by_position(model: torch.nn.Module, windows: torch.Tensor, L: int) -> Dict[str, float]:
    model.eval()
    logits = model(windows[:, :-1])
    nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none") / math.log(2)  # (N, 4L)
    return {"0-L": float(nll[:, :L].mean()), "L-2L": float(nll[:, L:2 * L].mean()),
            "2L-4L": float(nll[:, 2 * L:4 * L].mean())}


@torch.no_grad()
def _padding_effect(model: torch.nn.Module, paragraphs: List[torch.Tensor], L: int) -> float:
    """Max |logit| change of a 4L-long paragraph's outputs when its 7 batch-mates are short instead of 4L long.

    Per-step batch statistics are taken over the sequences still running, so under BatchNorm the long
    paragraph's late steps are normalized with the statistics of 8 sequences in one batch and of itself
    alone in the other.
    """
    m = copy.deepcopy(model).train()   # training mode: BN uses the batch's statistics (and updates a copy's)
    long = [p for p in paragraphs if len(p) > 4 * L][:8]
    short_len = max(2, L // 5)
    a, _, la = _batch(long, list(range(8)), 4 * L)
    b, _, lb = _batch([long[0]] + [p[:short_len + 1] for p in long[1:]], list(range(8)), 4 * L)
    return float((m(a, la)[0] - m(b, lb)[0]).abs().max())


def job(kind: str, seed: int, cfg: Dict) -> Dict:
    """Train one LM of ``kind`` on paragraphs cut to L; bits per character by position on 4L-long paragraphs."""
    text = load_text()
    L = cfg["max_train_len"]
    paragraphs = [p for p in text.train_paragraphs if len(p) >= 2]
    test = torch.stack([p[:4 * L + 1] for p in text.valid_paragraphs if len(p) >= 4 * L + 1])
    torch.manual_seed(seed_for(seed, 71))
    model = CharLM(kind, text.vocab_size, cfg["hidden"], max_length=L, embed=cfg["embed"])
    gen = torch.Generator().manual_seed(seed_for(seed, 72))

    def next_batch(step):
        return _batch(paragraphs, torch.randint(0, len(paragraphs), (cfg["batch"],), generator=gen).tolist(), L)

    def loss_fn(m, b):
        x, y, lengths = b
        return F.cross_entropy(m(x, lengths).transpose(1, 2), y, ignore_index=-100)

    out = train(model, steps=cfg["steps"], next_batch=next_batch, loss_fn=loss_fn, lr=cfg["lr"], clip=cfg["clip"])
    return {"kind": kind, "seed": seed, "bpc": _bpc_by_position(model, test, L),
            "padding_max_diff": _padding_effect(model, text.valid_paragraphs, L), "diverged_at": out["diverged_at"],
            "test_paragraphs": int(len(test)), "params": parameter_count(model)}


def plan(ctx: Context) -> List[Job]:
    cfg = QUICK if ctx.quick else FULL
    return [Job(NAME, i, job, {"kind": k, "seed": s, "cfg": cfg}, _MS_PER_STEP[k] * cfg["steps"] / 1000)
            for i, (k, s) in enumerate((k, s) for k in KINDS for s in ctx.seeds)]


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    cfg = QUICK if ctx.quick else FULL
    S, L = ctx.seeds, cfg["max_train_len"]
    by = {(r["kind"], r["seed"]): r for r in results}
    buckets = ("0-L", "L-2L", "2L-4L")
    bpc = {k: {b: summarize([by[k, s]["bpc"][b] for s in S]) for b in buckets} for k in KINDS}
    diff = [by["bn-lstm", s]["bpc"]["2L-4L"] - by["ln-lstm", s]["bpc"]["2L-4L"] for s in S]
    # descriptive, not deciding: how much of the gap at [2L, 4L) is already there at [0, L)
    growth = [d - (by["bn-lstm", s]["bpc"]["0-L"] - by["ln-lstm", s]["bpc"]["0-L"]) for d, s in zip(diff, S)]
    pad = {k: max(by[k, s]["padding_max_diff"] for s in S) for k in KINDS}
    diverged = {k: [s for s in S if by[k, s]["diverged_at"] is not None] for k in KINDS}
    g = summarize(growth)
    gap_in = sum(by["bn-lstm", s]["bpc"]["0-L"] - by["ln-lstm", s]["bpc"]["0-L"] for s in S) / len(S)
    lo, hi = g["ci95_t"]
    trend = ("grows with length" if lo is not None and lo > 0 else
             "shrinks with length: LN's advantage here is the one it has within the trained length, not a better "
             "handling of longer sequences" if hi is not None and hi < 0 else "does not change measurably with length")
    claims = [claim(
        "ln-variable-length", NAME, "LN handles variable-length sequences",
        "it's very hard to use [batch normalization] with sequence data because if the sequences are of varying "
        "length batch normalization gets very complicated to calculate ... layer normalization gives us a chance to "
        "do normalization on recurrent neural networks because it is able to deal with different types of lengths of "
        "sequences",
        f"Character-level LMs train {cfg['steps']} steps on paragraphs cut to at most L = {L} characters (batch "
        f"{cfg['batch']}, mixed lengths, packed), and are tested on {by[KINDS[0], S[0]]['test_paragraphs']} validation "
        f"paragraphs read to 4L = {4 * L}. (a) A {4 * L}-character paragraph's training-mode output changes by "
        f"<= {EXACT_TOL} under LayerNormLSTM when its 7 batch-mates are {max(2, L // 5)} characters long instead of "
        f"{4 * L}, and by > {DEPENDENCE_TOL} under BatchNormLSTM; (b) bits per character at positions "
        f"[{2 * L}, {4 * L}), beyond twice "
        f"the trained length: BatchNormLSTM minus LayerNormLSTM per seed, supported if the 95% t-interval is above 0 "
        f"and the mean >= {END_EFFECT_BPC}.",
        {"ln_independent_of_padding_mates": decide_checks(
            {f"LayerNormLSTM max diff {pad['ln-lstm']:.2g} <= {EXACT_TOL}": pad["ln-lstm"] <= EXACT_TOL,
             f"BatchNormLSTM max diff {pad['bn-lstm']:.2g} > {DEPENDENCE_TOL}": pad["bn-lstm"] > DEPENDENCE_TOL}),
         "ln_beats_bn_beyond_2x_length": labelled(
             decide_effect(diff, END_EFFECT_BPC),
             f"bits per char at positions {2 * L}-{4 * L}: BatchNormLSTM minus LayerNormLSTM", "bits per char")},
        {"bpc_by_position": bpc, "padding_max_abs_diff": pad, "diverged_seeds": diverged, "seeds": S,
         "bn_minus_ln_gap_growth_from_0_L_to_2L_4L": summarize(growth), "bn_lstm_steps_with_own_statistics": L},
        note=f"BatchNormLSTM keeps running statistics for steps t < max_length = {L}; longer test sequences reuse the "
             "last step's statistics (Cooijmans et al.). LayerNormLSTM needs no such table. Part (b) compares the "
             f"models beyond the trained length. BatchNormLSTM minus LayerNormLSTM is {gap_in:.2f} bits/char within "
             f"the trained length and {sum(diff) / len(diff):.2f} beyond 2L (change {g['mean']:+.2f}, 95% "
             f"t-interval [{_fmt_bound(lo)}, {_fmt_bound(hi)}]): the gap {trend}.",
        scope=f"char-level LM on paragraphs of Python's documentation, trained to {L} characters, tested to {4 * L}")]
    fig = _figure(ctx, by, S, L)
    rows = [{"kind": r["kind"], "seed": r["seed"], **{f"bpc_{b}": r["bpc"][b] for b in buckets},
             "padding_max_diff": r["padding_max_diff"], "diverged_at": r["diverged_at"]} for r in results]
    return {"config": {**cfg, "kinds": list(KINDS), "test_len": 4 * L, "text": describe_text()},
            "summary": {"bpc_by_position": bpc, "padding_max_abs_diff": pad,
                        "bn_minus_ln_bpc_2L_4L": summarize(diff)},
            "claims": claims, "metrics": rows, "figures": [fig]}


def _figure(ctx, by, S, L) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw={"width_ratios": [1.3, 1]})
    ax = axes[0]
    centers = [L / 2, 1.5 * L, 3 * L]
    for k in KINDS:
        m, err = ci_err([[by[k, s]["bpc"][b] for s in S] for b in ("0-L", "L-2L", "2L-4L")])
        st = rnn_style(k)
        ax.errorbar(centers, m, yerr=err, marker="o", capsize=3, color=st["color"], ls=st["ls"], label=st["label"])
    ax.axvspan(0, L, color="black", alpha=0.06, label="trained lengths")
    ax.set_xticks(centers, [f"0-{L}", f"{L}-{2 * L}", f"{2 * L}-{4 * L}"])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("position in the test paragraph (characters)")
    ax.set_ylabel("bits per character (lower is better; axis from 0)")
    ax.set_title(f"Trained on paragraphs cut to {L} characters", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    differences(axes[1], [(f"positions {a}: BN - LN", [by["bn-lstm", s]["bpc"][b] - by["ln-lstm", s]["bpc"][b]
                                                       for s in S], COLORS["ln"])
                          for a, b in ((f"0-{L}", "0-L"), (f"{L}-{2 * L}", "L-2L"), (f"{2 * L}-{4 * L}", "2L-4L"))],
                "bits per char", "Bits per char LayerNormLSTM saves over BatchNormLSTM", END_EFFECT_BPC)
    fig.tight_layout()
    return savefig(fig, ctx.fig_dir, "variable-length.png")
