"""Batch size: does BatchNorm suffer from small batches, and does LayerNorm work at any batch size?

An MLP (784 -> 64 -> 64 -> 10, a norm after each hidden layer) trains on MNIST with BatchNorm,
LayerNorm, GroupNorm(4) or no norm at batch sizes 2 to 128, seeing the same number of samples at every
batch size (same epochs), with the same optimizer. Also measured: how much a sample's training-mode
output changes when its batch-mates change, and how far a batch's statistics are from the data set's.

Criteria (fixed before the run): see the claims below; thresholds :data:`ACC_EFFECT_PP`,
:data:`ACC_MARGIN_PP`, :data:`EXACT_TOL`, :data:`DEPENDENCE_TOL`.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from ..data import display_name, load_images
from ..experiment import Context, claim, labelled
from ..figures import COLORS, NORM_NAMES, ci_err, differences, pyplot, savefig
from ..models import MLP, NORMS
from ..pool import Job
from ..stats import decide_checks, decide_effect, decide_no_worse, summarize
from ..training import accuracy, epoch_batches, seed_for, train

NAME = "batch-size"
TITLE = "Batch size (MLP on MNIST)"

# ---- criteria (fixed before the run) ----
ACC_EFFECT_PP = 1.0     # accuracy effect, percentage points
ACC_MARGIN_PP = 2.0     # "no worse than" margin, percentage points
EXACT_TOL = 1e-6        # "does not depend on": max |difference| allowed
DEPENDENCE_TOL = 1e-3   # "depends on": max |difference| must exceed this
CRITERIA = {"acc_effect_pp": ACC_EFFECT_PP, "acc_margin_pp": ACC_MARGIN_PP, "exact_tol": EXACT_TOL,
            "dependence_tol": DEPENDENCE_TOL}

FULL = {"batch_sizes": [2, 8, 32, 128], "epochs": 2.0, "lr": 2e-3}
QUICK = {"batch_sizes": [2, 8, 32, 128], "epochs": 0.25, "lr": 2e-3}
MATES_BATCH = 32   # the batch size whose trained model is probed with swapped batch-mates


@torch.no_grad()
def _mates_effect(model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator, batch: int = 8,
                  trials: int = 10) -> float:
    """Max |output of sample 0| change when its batch-mates are swapped, in training mode."""
    model = copy.deepcopy(model).train()  # train mode updates BN running stats: keep the caller's intact
    worst = 0.0
    for _ in range(trials):
        idx = torch.randperm(len(x), generator=gen)[: 2 * batch - 1]
        a = torch.cat([idx[:1], idx[1:batch]])
        b = torch.cat([idx[:1], idx[batch:]])
        worst = max(worst, float((model(x[a])[0] - model(x[b])[0]).abs().max()))
    return worst


def job(norm: str, batch: int, seed: int, epochs: float, lr: float, data: str) -> Dict:
    """Train the MLP with ``norm`` at ``batch`` for ``epochs``; test accuracy (and the batch-mates probe)."""
    d = load_images(data)
    torch.manual_seed(seed_for(seed, 1))
    model = MLP(int(np.prod(d.shape)), d.num_classes, norm)
    batches = epoch_batches(len(d.x_train), batch, torch.Generator().manual_seed(seed_for(seed, 2)))
    steps = max(1, int(round(epochs * (len(d.x_train) // batch))))
    out = train(model, steps=steps, next_batch=lambda step: next(batches),
                loss_fn=lambda m, idx: F.cross_entropy(m(d.x_train[idx]), d.y_train[idx]), lr=lr)
    r = {"norm": norm, "batch": batch, "seed": seed, "test_acc": accuracy(model, d.x_test, d.y_test),
         "diverged_at": out["diverged_at"]}
    if batch == MATES_BATCH:
        r["mates_max_diff"] = _mates_effect(model, d.x_test, torch.Generator().manual_seed(seed_for(seed, 3)))
    return r


def plan(ctx: Context) -> List[Job]:
    cfg = QUICK if ctx.quick else FULL
    n = len(load_images(ctx.data).x_train)
    calls = [(nm, b, s) for nm in NORMS for b in cfg["batch_sizes"] for s in ctx.seeds]
    # cost: ~0.7 ms per step, plus a little per sample
    return [Job(NAME, i, job, {"norm": nm, "batch": b, "seed": s, "epochs": cfg["epochs"], "lr": cfg["lr"],
                               "data": ctx.data}, cfg["epochs"] * n * (0.0007 / b + 0.000005))
            for i, (nm, b, s) in enumerate(calls)]


def _batch_stat_error(x: torch.Tensor, sizes: List[int]) -> Dict[str, Dict[str, float]]:
    """How far a batch's mean/std of each input feature is from the whole training set's."""
    x = x.flatten(1).double()
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    keep = sd > 1e-6
    out = {}
    g = torch.Generator().manual_seed(12345)
    for b in sizes:
        em, es = [], []
        for _ in range(200):
            xb = x[torch.randperm(len(x), generator=g)[:b]]
            em.append(float(((xb.mean(0) - mu).abs() / sd)[keep].mean()))
            es.append(float((xb.std(0, unbiased=False) / sd - 1).abs()[keep].mean()))
        out[str(b)] = {"mean_err_in_sd": float(np.mean(em)), "std_rel_err": float(np.mean(es))}
    return out


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    cfg = QUICK if ctx.quick else FULL
    sizes, S = cfg["batch_sizes"], ctx.seeds
    acc = {(r["norm"], r["batch"], r["seed"]): 100 * r["test_acc"] for r in results}
    mates = {(r["norm"], r["seed"]): r["mates_max_diff"] for r in results if "mates_max_diff" in r}
    small, large = sizes[0], sizes[-1]
    table = {n: {str(b): summarize([acc[n, b, s] for s in S]) for b in sizes} for n in NORMS}
    did = [(acc["bn", large, s] - acc["bn", small, s]) - (acc["ln", large, s] - acc["ln", small, s]) for s in S]
    ln_best = max(sizes, key=lambda b: np.mean([acc["ln", b, s] for s in S]))
    ln_drop = [acc["ln", small, s] - acc["ln", ln_best, s] for s in S]
    stat_err = _batch_stat_error(load_images(ctx.data).x_train, sizes)
    mates_max = {n: max(mates[n, s] for s in S) for n in NORMS}
    scope = f"MLP on {display_name(ctx.data)}, batch {small} to {large}, {cfg['epochs']:g} epochs at every batch size"
    claims = [
        claim("bn-small-batch", NAME, "small batches hurt BatchNorm (MLP)",
              "it's very hard to use batch normalization with small batch sizes because the whole point of batch "
              "normalization is to calculate the normalization values like the average and standard deviation on "
              "the batches so if you have a very small batch number you're not going to calculate the mean and "
              "standard deviation that actually represents the whole data set",
              f"Same sample budget ({cfg['epochs']:g} epochs) at every batch size. Effect = [BN acc(batch {large}) - "
              f"BN acc(batch {small})] - [LN acc({large}) - LN acc({small})] in pp, one per seed: the accuracy BN "
              f"loses when the batch shrinks, beyond what LN loses. Supported if the 95% t-interval is above 0 and "
              f"the mean >= {ACC_EFFECT_PP} pp; not supported if the interval is below {ACC_EFFECT_PP} pp.",
              {"bn_loses_more_than_ln": labelled(decide_effect(did, ACC_EFFECT_PP),
                                                 f"extra accuracy BN loses from batch {large} to {small}", "pp")},
              {"test_acc_pp": {"bn": table["bn"], "ln": table["ln"]}, "batch_statistic_error": stat_err, "seeds": S},
              scope=scope),
        claim("ln-any-batch-size", NAME, "LN works with any batch size",
              "there is no dependency on batch size in layer normalization no matter how big or small your batch size "
              "is you're just going to normalize values per your data point ... with layer normalization we can "
              "choose whatever batch number that we want no matter how small or big",
              f"(a) swapping a sample's 7 batch-mates changes its training-mode output by <= {EXACT_TOL} under LN "
              f"(and by > {DEPENDENCE_TOL} under BN, the control); (b) LN acc(batch {small}) - LN acc(the batch size "
              f"where LN's mean accuracy is highest, here {ln_best}) per seed: supported if its 95% t-interval lies "
              f"above -{ACC_MARGIN_PP} pp, not supported if below.",
              {"ln_output_independent_of_batch_mates": decide_checks(
                  {f"LN max diff {mates_max['ln']:.2g} <= {EXACT_TOL}": mates_max["ln"] <= EXACT_TOL,
                   f"BN (control) max diff {mates_max['bn']:.2g} > {DEPENDENCE_TOL}":
                       mates_max["bn"] > DEPENDENCE_TOL}),
               "ln_small_batch_no_worse": labelled(decide_no_worse(ln_drop, ACC_MARGIN_PP),
                                                   f"LN accuracy at batch {small} minus at batch {ln_best}", "pp")},
              {"mates_max_abs_diff": mates_max, "ln_best_batch": ln_best,
               "test_acc_pp": {"ln": table["ln"], "gn": table["gn"], "none": table["none"]}, "seeds": S},
              scope=scope),
    ]
    fig = _figure(ctx, sizes, acc, S, stat_err)
    rows = [{"norm": r["norm"], "batch": r["batch"], "seed": r["seed"], "test_acc": r["test_acc"],
             "mates_max_diff": r.get("mates_max_diff", ""), "diverged_at": r["diverged_at"]} for r in results]
    return {"config": {**cfg, "data": ctx.data, "model": "MLP 784-64-64-10", "mates_batch": MATES_BATCH},
            "summary": {"test_acc_pp": table, "mates_max_abs_diff": mates_max, "bn_minus_ln_drop_pp": summarize(did)},
            "claims": claims, "metrics": rows, "figures": [fig]}


def _figure(ctx, sizes, acc, S, stat_err) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    ax = axes[0]
    for n in NORMS:
        m, err = ci_err([[acc[n, b, s] for s in S] for b in sizes])
        ax.errorbar(sizes, m, yerr=err, marker="o", capsize=3, color=COLORS[n], label=NORM_NAMES[n])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_ylim(0, 100)
    ax.set_xlabel("training batch size")
    ax.set_ylabel("test accuracy, % (mean, 95% CI; axis from 0)")
    ax.set_title("MLP, same number of samples seen", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    differences(axes[1], [(f"batch {b}: LN - BN", [acc["ln", b, s] - acc["bn", b, s] for s in S], COLORS["ln"])
                          for b in sizes], "pp", "LN minus BN test accuracy, paired per seed", ACC_EFFECT_PP)
    ax2 = axes[2]
    ax2.plot(sizes, [stat_err[str(b)]["mean_err_in_sd"] for b in sizes], marker="o", color="black",
             label="|batch mean - mean| / sd")
    ax2.plot(sizes, [stat_err[str(b)]["std_rel_err"] for b in sizes], marker="s", color="black", ls="--",
             label="|batch sd / sd - 1|")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(sizes, [str(b) for b in sizes])
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("mean error over input features")
    ax2.set_title("How far batch statistics are from the data set's", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return savefig(fig, ctx.fig_dir, "batch-size.png")
