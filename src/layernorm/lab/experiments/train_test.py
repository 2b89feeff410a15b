"""Training vs test time: does LayerNorm do the same computation in both, unlike BatchNorm?

The MLP of ``batch-size`` trains with BatchNorm or LayerNorm at batch 32; then the same test inputs go
through it in training mode and in eval mode. BatchNorm's eval mode uses running statistics, its
training mode the batch's; LayerNorm has no such switch. Also measured: BatchNorm's test accuracy when
it normalizes with the statistics of small test batches instead of its running statistics.

Criterion (fixed before the run): LN's max |train-mode - eval-mode| output is exactly 0 for every
seed; BN's (the control) exceeds :data:`DEPENDENCE_TOL`.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageData, display_name, load_images
from ..experiment import Context, claim
from ..figures import COLORS, NORM_NAMES, ci_err, pyplot, savefig
from ..models import MLP
from ..pool import Job
from ..stats import decide_checks, summarize
from ..training import accuracy, epoch_batches, seed_for, train

NAME = "train-test"
TITLE = "Training vs test time (MLP on MNIST)"

# ---- criteria (fixed before the run) ----
DEPENDENCE_TOL = 1e-3   # "differs": max |difference| must exceed this
CRITERIA = {"ln_train_eval_diff": 0.0, "dependence_tol": DEPENDENCE_TOL}

FULL = {"train_batch": 32, "epochs": 2.0, "lr": 2e-3, "test_batches": [2, 8, 32, 128]}
QUICK = {**FULL, "epochs": 0.5}


@torch.no_grad()
def _train_vs_eval(model: torch.nn.Module, d: ImageData, test_batches: List[int]) -> Dict:
    ev = model.eval()
    tr = copy.deepcopy(model).train()
    gap = 0.0
    for i in range(0, len(d.x_test) - 31, 32):
        xb = d.x_test[i:i + 32]
        gap = max(gap, float((tr(xb) - ev(xb)).abs().max()))
    acc_batch_stats = {}
    for tb in test_batches:
        m = copy.deepcopy(model).train()
        # every test sample, in consecutive batches of tb; a ragged last batch of one is left out
        # (BatchNorm cannot normalize a single sample with batch statistics)
        n = len(d.x_test) - (1 if len(d.x_test) % tb == 1 else 0)
        correct = 0
        for i in range(0, n, tb):
            j = min(i + tb, n)
            correct += int((m(d.x_test[i:j]).argmax(1) == d.y_test[i:j]).sum())
        acc_batch_stats[str(tb)] = correct / n
    return {"train_eval_max_diff": gap, "acc_eval_mode": accuracy(model, d.x_test, d.y_test),
            "acc_batch_stats": acc_batch_stats}


def job(norm: str, seed: int, cfg: Dict, data: str) -> Dict:
    """Train the MLP with ``norm``; compare train-mode and eval-mode outputs on the test set."""
    d = load_images(data)
    torch.manual_seed(seed_for(seed, 1))
    model = MLP(int(np.prod(d.shape)), d.num_classes, norm)
    batches = epoch_batches(len(d.x_train), cfg["train_batch"], torch.Generator().manual_seed(seed_for(seed, 2)))
    steps = max(1, int(round(cfg["epochs"] * (len(d.x_train) // cfg["train_batch"]))))
    train(model, steps=steps, next_batch=lambda step: next(batches),
          loss_fn=lambda m, idx: F.cross_entropy(m(d.x_train[idx]), d.y_train[idx]), lr=cfg["lr"])
    return {"norm": norm, "seed": seed, **_train_vs_eval(model, d, cfg["test_batches"])}


def plan(ctx: Context) -> List[Job]:
    cfg = QUICK if ctx.quick else FULL
    return [Job(NAME, i, job, {"norm": n, "seed": s, "cfg": cfg, "data": ctx.data}, 0.2 + cfg["epochs"] * 0.1)
            for i, (n, s) in enumerate((n, s) for n in ("bn", "ln") for s in ctx.seeds)]


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    cfg = QUICK if ctx.quick else FULL
    S, tbs = ctx.seeds, cfg["test_batches"]
    by = {(r["norm"], r["seed"]): r for r in results}
    gap = {n: max(by[n, s]["train_eval_max_diff"] for s in S) for n in ("bn", "ln")}
    ln_exact = all(by["ln", s]["train_eval_max_diff"] == 0.0 for s in S)
    acc = {n: {"eval_mode": summarize([100 * by[n, s]["acc_eval_mode"] for s in S]),
               **{f"train_mode_test_batch_{tb}": summarize([100 * by[n, s]["acc_batch_stats"][str(tb)] for s in S])
                  for tb in tbs}} for n in ("bn", "ln")}
    claims = [claim(
        "ln-train-test-same", NAME, "LN computes the same thing in training and at test",
        "because it doesn't depend on batches we do the exact same calculations during training time and test time "
        "this was a little bit different in batch normalization",
        f"Same test inputs (batches of 32) through the trained MLP in train mode and in eval mode: LN's max |diff| "
        f"must be exactly 0 for every seed; BN's (the control) must exceed {DEPENDENCE_TOL}.",
        {"ln_identical": decide_checks({f"LN max |train - eval| {gap['ln']:.2g} == 0": ln_exact}),
         "bn_differs": decide_checks({f"BN max |train - eval| {gap['bn']:.2g} > {DEPENDENCE_TOL}":
                                      gap["bn"] > DEPENDENCE_TOL})},
        {"train_eval_max_abs_diff": gap, "test_acc_pp": acc, "seeds": S},
        note="BN's accuracy when it normalizes with the statistics of small test batches instead of its running "
             "statistics is in evidence.test_acc_pp.bn.",
        scope=f"MLP on {display_name(ctx.data)}, trained at batch {cfg['train_batch']}, tested in batches of "
              f"{min(tbs)} to {max(tbs)}")]
    fig = _figure(ctx, by, S, tbs)
    rows = []
    for r in results:
        row = {"norm": r["norm"], "seed": r["seed"], "train_eval_max_diff": r["train_eval_max_diff"],
               "acc_eval_mode": r["acc_eval_mode"]}
        row.update({f"acc_train_mode_test_batch_{k}": v for k, v in r["acc_batch_stats"].items()})
        rows.append(row)
    return {"config": {**cfg, "data": ctx.data}, "summary": {"train_eval_max_abs_diff": gap, "test_acc_pp": acc},
            "claims": claims, "metrics": rows, "figures": [fig]}


def _figure(ctx, by, S, tbs) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.3))
    for n in ("bn", "ln"):
        m, err = ci_err([[100 * by[n, s]["acc_batch_stats"][str(tb)] for s in S] for tb in tbs])
        ax.errorbar(tbs, m, yerr=err, marker="o", capsize=3, color=COLORS[n],
                    label=f"{NORM_NAMES[n]}: train mode (statistics of the test batch)")
        ref = np.mean([100 * by[n, s]["acc_eval_mode"] for s in S])
        ax.axhline(ref, ls="--", color=COLORS[n], alpha=0.8,
                   label=f"{NORM_NAMES[n]}: eval mode ({'running statistics' if n == 'bn' else 'same computation'})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(tbs, [str(t) for t in tbs])
    ax.set_ylim(0, 100)
    ax.set_xlabel("test batch size")
    ax.set_ylabel("test accuracy, % (axis from 0)")
    ax.set_title("Train-time vs test-time computation", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return savefig(fig, ctx.fig_dir, "train-test.png")
