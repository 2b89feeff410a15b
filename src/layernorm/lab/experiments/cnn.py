"""Convolutional nets: is LayerNorm weaker than BatchNorm in a CNN, and where do small batches turn it around?

A small CNN (three 3x3 conv blocks of 16, 32, 32 channels with a norm and ReLU each, 2x2 max-pools
after the first two, global average pool, linear) trains on the 28x28 MNIST digits:

- at batch 64 with BatchNorm, LayerNorm (``GroupNorm(1, C)``: one mean/variance per sample over
  (C, H, W), as in Wu & He 2018), GroupNorm(4) or no norm; test accuracy after every epoch;
- the small-batch crossover: BatchNorm, LayerNorm and GroupNorm at batch 2, 8 and 64 for the same
  number of samples (one epoch), where Wu & He found BatchNorm to fall behind.

Criteria (fixed before the run): effects of at least :data:`CNN_EFFECT_PP` (batch 64) and
:data:`SMALL_BATCH_EFFECT_PP` (batch 2) percentage points, with the 95% t-interval above 0.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..data import display_name, load_images
from ..experiment import Context, claim, labelled
from ..figures import COLORS, NORM_NAMES, bars, ci_err, differences, pyplot, savefig
from ..models import NORMS, make_norm
from ..pool import Job
from ..stats import decide_effect, significance, summarize
from ..training import accuracy, epoch_batches, seed_for, train

NAME = "cnn"
TITLE = "Convolutional nets (small CNN on 28x28 MNIST)"

# ---- criteria (fixed before the run) ----
CNN_EFFECT_PP = 0.5          # batch-64 accuracy effects, percentage points
SMALL_BATCH_EFFECT_PP = 1.0  # LN over BN at batch 2, percentage points
CRITERIA = {"cnn_effect_pp": CNN_EFFECT_PP, "small_batch_effect_pp": SMALL_BATCH_EFFECT_PP}

FULL = {"batch": 64, "epochs": 3, "lr": 2e-3, "crossover_batches": [2, 8, 64], "crossover_epochs": 1.0}
QUICK = {**FULL, "epochs": 1, "crossover_batches": [2, 8, 64], "crossover_epochs": 0.1}
CROSSOVER_NORMS = ("bn", "ln", "gn")
# measured ms per step on one core at each batch size (orders the job queue only)
_MS = {2: 1.8, 4: 2.5, 8: 3.4, 64: 18.0}


class CNN(nn.Module):
    """conv(16) -> pool -> conv(32) -> pool -> conv(32) -> global average pool -> linear; a norm after each conv."""

    def __init__(self, in_channels: int, classes: int, norm: str, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> List[nn.Module]:
            # a bias before a norm that subtracts a mean is redundant: only the un-normalized net keeps it
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), make_norm(norm, cout, spatial=True),
                    nn.ReLU()]

        self.body = nn.Sequential(*block(in_channels, width), nn.MaxPool2d(2), *block(width, 2 * width),
                                  nn.MaxPool2d(2), *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(7),
                                  nn.Flatten())
        self.head = nn.Linear(2 * width * 49, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def job(norm: str, seed: int, batch: int, epochs: float, lr: float, data: str) -> Dict:
    """Train the CNN with ``norm`` at ``batch`` for ``epochs``; test accuracy after each whole epoch and at the end."""
    d = load_images(data)
    torch.manual_seed(seed_for(seed, 11))
    model = CNN(d.shape[0], d.num_classes, norm)
    batches = epoch_batches(len(d.x_train), batch, torch.Generator().manual_seed(seed_for(seed, 12)))
    per_epoch = len(d.x_train) // batch
    steps = max(1, int(round(epochs * per_epoch)))
    out = train(model, steps=steps, next_batch=lambda step: next(batches),
                loss_fn=lambda m, idx: F.cross_entropy(m(d.x_train[idx]), d.y_train[idx]), lr=lr,
                eval_at=[per_epoch * e for e in range(1, int(epochs) + 1)] + [steps],
                evaluate=lambda: {"acc": accuracy(model, d.x_test, d.y_test)})
    curve = [e["acc"] for e in out["evals"]]
    return {"norm": norm, "seed": seed, "batch": batch, "eval_steps": out["eval_steps"], "curve": curve,
            "test_acc": curve[-1], "diverged_at": out["diverged_at"]}


def plan(ctx: Context) -> List[Job]:
    cfg = QUICK if ctx.quick else FULL
    n = len(load_images(ctx.data).x_train)
    calls = [dict(norm=nm, seed=s, batch=cfg["batch"], epochs=cfg["epochs"]) for nm in NORMS for s in ctx.seeds]
    calls += [dict(norm=nm, seed=s, batch=b, epochs=cfg["crossover_epochs"]) for nm in CROSSOVER_NORMS
              for b in cfg["crossover_batches"] for s in ctx.seeds]
    return [Job(NAME, i, job, {**c, "lr": cfg["lr"], "data": ctx.data},
                c["epochs"] * n / c["batch"] * _MS.get(c["batch"], 18.0) / 1000) for i, c in enumerate(calls)]


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    cfg = QUICK if ctx.quick else FULL
    S = ctx.seeds
    main = {(r["norm"], r["seed"]): r for r in results[:len(NORMS) * len(S)]}
    cross = {(r["norm"], r["batch"], r["seed"]): 100 * r["test_acc"] for r in results[len(NORMS) * len(S):]}
    acc = {k: 100 * r["test_acc"] for k, r in main.items()}
    first = {k: 100 * r["curve"][0] for k, r in main.items()}
    final = {n: summarize([acc[n, s] for s in S]) for n in NORMS}
    after1 = {n: summarize([first[n, s] for s in S]) for n in NORMS}
    sizes = cfg["crossover_batches"]
    cross_table = {n: {str(b): summarize([cross[n, b, s] for s in S]) for b in sizes} for n in CROSSOVER_NORMS}
    small = sizes[0]
    # where LN is significantly better / worse than BN, per batch size (descriptive)
    ln_vs_bn = {str(b): significance([cross["ln", b, s] - cross["bn", b, s] for s in S]) for b in sizes}
    d_ln = [acc["bn", s] - acc["ln", s] for s in S]
    d_none = [acc["bn", s] - acc["none", s] for s in S]
    d_none_1 = [first["bn", s] - first["none", s] for s in S]
    d_small = [cross["ln", small, s] - cross["bn", small, s] for s in S]
    scope = f"small CNN on {display_name(ctx.data)}, batch {cfg['batch']}, {cfg['epochs']} epoch(s)"
    ev = {"final_test_acc_pp": final, "after_first_epoch_acc_pp": after1, "seeds": S}
    claims = [
        claim("ln-cnn-downside", NAME, "LN is weaker than BN in CNNs",
              "one downside of layer normalization is that it does not always work really well with convolutional "
              "neural networks so if you want to use a cnn architecture you might want to opt for batch "
              "normalization instead",
              f"Small CNN, batch {cfg['batch']}, {cfg['epochs']} epochs: final test accuracy BN - LN per seed; "
              f"supported if the 95% t-interval is above 0 and the mean >= {CNN_EFFECT_PP} pp; not supported if the "
              f"interval is below {CNN_EFFECT_PP} pp.",
              {"bn_beats_ln_in_cnn": labelled(decide_effect(d_ln, CNN_EFFECT_PP), "final test accuracy, BN minus LN",
                                              "pp")}, ev, scope=scope),
        claim("bn-faster-better", NAME, "BN makes networks faster and better",
              "batch normalization has been a groundbreaking step into making neural networks faster and better",
              f"Same CNN: BN - no normalization per seed, test accuracy after the first epoch (faster) and after the "
              f"last (better); each supported if the 95% t-interval is above 0 and the mean >= {CNN_EFFECT_PP} pp.",
              {"faster_first_epoch": labelled(decide_effect(d_none_1, CNN_EFFECT_PP),
                                              "test accuracy after epoch 1, BN minus no norm", "pp"),
               "better_final": labelled(decide_effect(d_none, CNN_EFFECT_PP), "final test accuracy, BN minus no norm",
                                        "pp")}, ev, scope=scope),
        claim("bn-small-batch-cnn", NAME, "small batches hurt BatchNorm (CNN)",
              "it's very hard to use batch normalization with small batch sizes because the whole point of batch "
              "normalization is to calculate the normalization values like the average and standard deviation on "
              "the batches so if you have a very small batch number you're not going to calculate the mean and "
              "standard deviation that actually represents the whole data set",
              f"Same CNN trained {cfg['crossover_epochs']:g} epoch(s) at batch {', '.join(map(str, sizes))} (same "
              f"samples seen). At batch {small}: LN - BN test accuracy per seed; supported if the 95% t-interval is "
              f"above 0 and the mean >= {SMALL_BATCH_EFFECT_PP} pp; not supported if below {SMALL_BATCH_EFFECT_PP} pp.",
              {"ln_beats_bn_at_smallest_batch": labelled(decide_effect(d_small, SMALL_BATCH_EFFECT_PP),
                                                         f"test accuracy at batch {small}, LN minus BN", "pp")},
              {"test_acc_pp": cross_table, "ln_vs_bn_significance_by_batch": ln_vs_bn, "seeds": S},
              note="BatchNorm is evaluated with its running statistics (eval mode), as it would be deployed.",
              scope=f"small CNN on {display_name(ctx.data)}, batch {small} to {max(sizes)}, "
                    f"{cfg['crossover_epochs']:g} epoch(s) at each"),
    ]
    fig = _figure(ctx, acc, first, cross, S, cfg)
    rows = [{"part": "batch64" if i < len(NORMS) * len(S) else "crossover", "norm": r["norm"], "batch": r["batch"],
             "seed": r["seed"], "step": st, "test_acc": a, "diverged_at": r["diverged_at"]}
            for i, r in enumerate(results) for st, a in zip(r["eval_steps"], r["curve"])]
    return {"config": {**cfg, "data": ctx.data, "ln_in_cnn": "GroupNorm(1, C)", "gn_groups": 4},
            "summary": {"final_test_acc_pp": final, "after_first_epoch_acc_pp": after1,
                        "crossover_test_acc_pp": cross_table, "crossover_ln_vs_bn": ln_vs_bn},
            "claims": claims, "metrics": rows, "figures": [fig]}


def _figure(ctx, acc, first, cross, S, cfg) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.4), gridspec_kw={"width_ratios": [1, 1.1, 1, 1.1]})
    bars(axes[0], [NORM_NAMES[n] for n in NORMS], [[acc[n, s] for s in S] for n in NORMS],
         [COLORS[n] for n in NORMS], "final test accuracy, % (axis from 0)",
         f"Batch {cfg['batch']}: accuracy after {cfg['epochs']} epochs")
    rows = [(f"BN - {NORM_NAMES[n]}, final", [acc["bn", s] - acc[n, s] for s in S], COLORS[n]) for n in ("ln", "gn",
                                                                                                      "none")]
    rows.append(("BN - no norm, after epoch 1", [first["bn", s] - first["none", s] for s in S], COLORS["none"]))
    differences(axes[1], rows, "pp", f"Batch {cfg['batch']}: BN minus the others, paired per seed", CNN_EFFECT_PP)
    ax = axes[2]
    sizes = cfg["crossover_batches"]
    for n in CROSSOVER_NORMS:
        m, err = ci_err([[cross[n, b, s] for s in S] for b in sizes])
        ax.errorbar(sizes, m, yerr=err, marker="o", capsize=3, color=COLORS[n], label=NORM_NAMES[n])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_ylim(0, 100)
    ax.set_xlabel("training batch size")
    ax.set_ylabel("test accuracy, % (axis from 0)")
    ax.set_title(f"Small-batch crossover: {cfg['crossover_epochs']:g} epoch at each batch size", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    differences(axes[3], [(f"batch {b}: {NORM_NAMES[n]} - BN", [cross[n, b, s] - cross["bn", b, s] for s in S],
                           COLORS[n]) for b in sizes for n in ("ln", "gn")], "pp",
                "Crossover: LN and GN minus BN, paired per seed", SMALL_BATCH_EFFECT_PP)
    fig.tight_layout()
    return savefig(fig, ctx.fig_dir, "cnn.png")
