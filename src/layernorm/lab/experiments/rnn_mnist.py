"""Recurrent nets on sequential MNIST: 28 rows, 196 pixels, and 196 permuted pixels.

Sequential MNIST is where Cooijmans et al. (2016) test recurrent batch normalization (pixel by pixel,
and with a fixed permutation of the pixels, which spreads dependencies over the whole sequence). Each
image is read as a sequence and classified from the last step:

- ``rows``: 28 steps of 28 pixels;
- ``pixels``: the image average-pooled 2x2 to 14x14, read one pixel per step: 196 steps;
- ``permuted``: the same 196 pixels in one fixed random order (the same for every model and seed).

Every kind (``nn.LSTM``, ``LayerNormLSTM``, ``BatchNormLSTM``, ``nn.GRU``, ``LayerNormGRU``) trains on
the same batches per seed and is scored on the same 1,000 test images.

Criteria (fixed before the run):

- end: final test accuracy, difference of at least :data:`END_EFFECT_PP` percentage points;
- speed: steps to reach the task's :data:`TARGET_ACC` test accuracy, saving at least 10% of the budget;
- a pair's verdict: ``stats.decide_either`` (better on one measure, not significantly worse on the other).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from ..data import load_images
from ..experiment import Context, claim
from ..figures import COLORS, differences, pyplot, savefig
from ..models import RNN_KINDS, SeqClassifier, parameter_count
from ..pool import Job
from ..recurrent import SPEED_EFFECT_FRACTION, divergence, judge_pair, plot_curves, steps_to_target
from ..stats import summarize
from ..training import accuracy, seed_for, train

NAME = "rnn-mnist"
TITLE = "Recurrent nets on sequential MNIST (28 rows, 196 pixels, 196 permuted pixels)"
TASKS = ("rows", "pixels", "permuted")

# ---- criteria (fixed before the run) ----
END_EFFECT_PP = 1.0                                            # final test accuracy, percentage points
TARGET_ACC = {"rows": 0.80, "pixels": 0.30, "permuted": 0.30}  # "converged enough" for the speed measure
CRITERIA = {"end_effect_pp": END_EFFECT_PP, "target_acc": TARGET_ACC,
            "speed_effect_fraction_of_budget": SPEED_EFFECT_FRACTION}

FULL = {"batch": 64, "hidden": 64, "lr": 3e-3, "clip": 1.0, "evals": 10,
        "steps": {"rows": 200, "pixels": 80, "permuted": 80}}
QUICK = {**FULL, "evals": 3, "steps": {"rows": 24, "pixels": 6, "permuted": 6}}
# measured ms per training step on one core (orders the job queue only)
_MS_PER_STEP = {"rows": {"lstm": 6, "ln-lstm": 9, "bn-lstm": 34, "gru": 8, "ln-gru": 7},
                "pixels": {"lstm": 58, "ln-lstm": 83, "bn-lstm": 500, "gru": 54, "ln-gru": 31}}
_MS_PER_STEP["permuted"] = _MS_PER_STEP["pixels"]

QUOTE_BETTER = ("that's exactly why layer normalization is better for rnns it's because it's no longer about the "
                "batch but about the layer that we're doing the calculations on or in rnn terms the time step that "
                "we're doing the calculations on")
QUOTE_IMPROVES = "removing the dependency on batch size and improving the performance of recurrent neural networks"
SCOPES = {"rows": "sequential MNIST, 28 rows of 28 pixels (T = 28)",
          "pixels": "sequential MNIST, 14x14 pixels one per step (T = 196)",
          "permuted": "permuted sequential MNIST, 196 pixels in a fixed random order (T = 196)"}

_SEQ: Dict = {}


def sequences(data: str, task: str):
    """(x_train, y_train, x_test, y_test) with x of shape (N, T, features) for ``task``; cached per process."""
    if (data, task) not in _SEQ:
        d = load_images(data)
        xs = []
        for x in (d.x_train, d.x_test):
            n, c, h, w = x.shape
            if task == "rows":
                xs.append(x.permute(0, 2, 1, 3).reshape(n, h, c * w).contiguous())
                continue
            # pool so that at least 196 steps remain (28x28 -> 14x14); smaller images are read as they are
            f = 2 if (h // 2) * (w // 2) >= 196 else 1
            p = F.avg_pool2d(x, f) if f > 1 else x
            seq = p.permute(0, 2, 3, 1).reshape(n, -1, c)
            if task == "permuted":
                order = torch.randperm(seq.shape[1], generator=torch.Generator().manual_seed(0))
                seq = seq[:, order]
            xs.append(seq.contiguous())
        _SEQ[data, task] = (xs[0], d.y_train, xs[1], d.y_test)
    return _SEQ[data, task]


def job(task: str, kind: str, seed: int, cfg: Dict, data: str) -> Dict:
    """Train one sequence classifier of ``kind`` on ``task`` with ``seed``; test accuracy along the way."""
    xtr, ytr, xte, yte = sequences(data, task)
    steps = cfg["steps"][task]
    torch.manual_seed(seed_for(seed, 61))
    model = SeqClassifier(kind, xtr.shape[2], cfg["hidden"], int(ytr.max()) + 1, max_length=xtr.shape[1])
    gen = torch.Generator().manual_seed(seed_for(seed, 62))
    every = max(1, steps // cfg["evals"])
    out = train(model, steps=steps,
                next_batch=lambda step: torch.randint(0, len(xtr), (cfg["batch"],), generator=gen),
                loss_fn=lambda m, idx: F.cross_entropy(m(xtr[idx]), ytr[idx]), lr=cfg["lr"], clip=cfg["clip"],
                eval_at=list(range(0, steps + 1, every)) + [steps],
                evaluate=lambda: {"acc": accuracy(model, xte, yte)})
    acc = [e["acc"] for e in out["evals"]]
    return {"task": task, "kind": kind, "seed": seed, "eval_steps": out["eval_steps"], "acc": acc,
            "train_loss": out["train_loss"], "final": acc[-1], "seq_len": int(xtr.shape[1]),
            "steps_to_target": steps_to_target(out["eval_steps"], acc, TARGET_ACC[task], higher=True),
            "diverged_at": out["diverged_at"], "params": parameter_count(model)}


def plan(ctx: Context) -> List[Job]:
    cfg = QUICK if ctx.quick else FULL
    calls = [(t, k, s) for t in TASKS for k in RNN_KINDS for s in ctx.seeds]
    return [Job(NAME, i, job, {"task": t, "kind": k, "seed": s, "cfg": cfg, "data": ctx.data},
                _MS_PER_STEP[t][k] * cfg["steps"][t] / 1000) for i, (t, k, s) in enumerate(calls)]


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    cfg = QUICK if ctx.quick else FULL
    S = ctx.seeds
    claims, summary, pairs = [], {}, {}
    for task in TASKS:
        res = [r for r in results if r["task"] == task]
        by = {(r["kind"], r["seed"]): {**r, "final": 100 * r["final"], "acc": [100 * a for a in r["acc"]]}
              for r in res}
        steps = cfg["steps"][task]
        T = res[0]["seq_len"]
        common = dict(higher=True, min_end=END_EFFECT_PP, end_unit="pp", budget=steps,
                      target=100 * TARGET_ACC[task], metric="test accuracy (%)")
        p = {"ln-lstm/bn-lstm": judge_pair(by, "ln-lstm", "bn-lstm", S, **common),
             "ln-lstm/lstm": judge_pair(by, "ln-lstm", "lstm", S, **common),
             "ln-gru/gru": judge_pair(by, "ln-gru", "gru", S, **common)}
        pairs[task] = (by, p)
        final = {k: summarize([by[k, s]["final"] for s in S]) for k in RNN_KINDS}
        reach = {k: [by[k, s]["steps_to_target"] for s in S] for k in RNN_KINDS}
        diverged = divergence(res)
        summary[task] = {"seq_len": T, "final_test_acc_pp": final, "steps_to_target": reach,
                         "diverged_seeds": diverged, "pairs": p}
        scope = f"{SCOPES[task]}, {steps} steps".replace("(T = 196)", f"(T = {T})")
        rule = (f"Each model trains {steps} steps (batch {cfg['batch']}, hidden {cfg['hidden']}, Adam {cfg['lr']:g}, "
                f"gradient norm clipped at {cfg['clip']:g}) on {T}-step sequences. End: final test accuracy, paired "
                f"per seed, at least {END_EFFECT_PP} pp higher with the 95% t-interval above 0. Speed: steps to "
                f"{100 * TARGET_ACC[task]:.0f}% test accuracy, at least 10% of the budget fewer with the interval "
                f"above 0 (a seed that never reaches it counts as the whole budget). A pair is supported when one "
                f"measure is and the other is not significantly reversed; not supported when neither is.")
        evidence = {"final_test_acc_pp": final, "steps_to_target": reach, "target_acc_pp": 100 * TARGET_ACC[task],
                    "diverged_seeds": diverged, "seq_len": T,
                    "params": {k: by[k, S[0]]["params"] for k in RNN_KINDS}, "seeds": S}
        note = ""
        if diverged:
            note = ("Diverged runs (training stopped at the first non-finite loss or gradient; the model keeps its "
                    f"last finite parameters): {', '.join(f'{k} seeds {v}' for k, v in sorted(diverged.items()))}.")
            if "bn-lstm" in diverged and task != "permuted":
                note += (" BatchNormLSTM: the first pixels/rows are blank in every image, so every sequence of the "
                         "batch has the same pre-activations there; their batch variance is 0, and BN then scales "
                         "differences by gamma/sqrt(eps) = 0.1/sqrt(1e-5) ~ 32 per step, which the backward pass "
                         "compounds over the blank steps until it overflows.")
        claims.append(claim(f"ln-better-for-rnns-{task}", NAME, "LN is better for RNNs than BN (LSTM)", QUOTE_BETTER,
                            rule + " Pair: LayerNormLSTM vs BatchNormLSTM.",
                            {"ln_lstm_vs_bn_lstm": p["ln-lstm/bn-lstm"]}, evidence, note=note, scope=scope))
        claims.append(claim(f"ln-improves-rnns-{task}", NAME, "LN improves RNNs (LSTM and GRU)", QUOTE_IMPROVES,
                            rule + " Pairs: LayerNormLSTM vs nn.LSTM and LayerNormGRU vs nn.GRU; both must be "
                                   "supported.",
                            {"ln_lstm_vs_lstm": p["ln-lstm/lstm"], "ln_gru_vs_gru": p["ln-gru/gru"]}, evidence,
                            note=note, scope=scope))
    fig = _figure(ctx, pairs, S, cfg)
    rows = [{"task": r["task"], "kind": r["kind"], "seed": r["seed"], "step": st, "test_acc": a, "train_loss": tl}
            for r in results for st, a, tl in zip(r["eval_steps"], r["acc"], r["train_loss"])]
    rows += [{"task": r["task"], "kind": r["kind"], "seed": r["seed"], "step": "final", "test_acc": r["final"],
              "steps_to_target": r["steps_to_target"], "diverged_at": r["diverged_at"]} for r in results]
    return {"config": {**cfg, "kinds": list(RNN_KINDS), "tasks": list(TASKS), "data": ctx.data,
                       "target_acc": TARGET_ACC},
            "summary": summary, "claims": claims, "metrics": rows, "figures": [fig]}


def _figure(ctx, pairs, S, cfg) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(16, 12.4))
    for j, task in enumerate(TASKS):
        by, p = pairs[task]
        T = by[RNN_KINDS[0], S[0]]["seq_len"]
        plot_curves(axes[0, j], by, RNN_KINDS, S, "acc", f"{task}: test accuracy (T = {T})",
                    "test accuracy, % (axis from 0)", target=100 * TARGET_ACC[task], ylim=(0, 100))
        rows = [("LayerNormLSTM - BatchNormLSTM", p["ln-lstm/bn-lstm"], COLORS["bn"]),
                ("LayerNormLSTM - nn.LSTM", p["ln-lstm/lstm"], COLORS["none"]),
                ("LayerNormGRU - nn.GRU", p["ln-gru/gru"], COLORS["none"])]
        differences(axes[1, j], [(n, q["measures"]["end"]["difference"]["values"], c) for n, q, c in rows], "pp",
                    f"{task}: final test accuracy gained by LN (paired)", END_EFFECT_PP)
        differences(axes[2, j], [(n, q["measures"]["speed"]["difference"]["values"], c) for n, q, c in rows], "steps",
                    f"{task}: steps saved by LN to {100 * TARGET_ACC[task]:.0f}% (paired)",
                    SPEED_EFFECT_FRACTION * cfg["steps"][task])
    fig.suptitle(f"Sequential MNIST, {len(S)} seeds (a thin line per seed, thick: mean)", fontsize=11)
    fig.tight_layout()
    return savefig(fig, ctx.fig_dir, "rnn-mnist.png")
