"""What layer normalization computes, in the lecture's own picture: 3 samples, a layer of 4 feeding 5 neurons.

Real MNIST images go through a random layer of 4 neurons and a layer of 5; the 3 x 5 activations are
normalized by hand both ways (BatchNorm: per neuron over the 3 samples; LayerNorm: per sample over the
5 neurons) in float64 and compared with ``torch.nn.BatchNorm1d`` (train mode) and ``torch.nn.LayerNorm``.
Nothing is trained, so the experiment runs in the main process (no jobs).

Criteria (fixed before the run): max |hand - torch| <= :data:`EXACT_TOL` for every seed, and LN uses
exactly one (mean, variance) per sample.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from ..data import display_name, load_images
from ..experiment import Context, claim
from ..figures import COLORS, pyplot, savefig
from ..pool import Job
from ..stats import decide_checks
from ..training import seed_for

NAME = "what-ln-computes"
TITLE = "What LayerNorm computes (vs BatchNorm)"

# ---- criteria (fixed before the run) ----
EXACT_TOL = 1e-6   # "the same computation": max |difference| allowed (float64 arithmetic)
CRITERIA = {"exact_tol": EXACT_TOL}


def plan(ctx: Context) -> List[Job]:
    return []


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    x_all = load_images(ctx.data).x_test.flatten(1)
    rows, first = [], None
    for seed in ctx.seeds:
        torch.manual_seed(seed_for(seed, 41))
        # the lecture's picture: a layer of 4 neurons feeding a layer of 5, a batch of 3 data points
        net = torch.nn.Sequential(torch.nn.Linear(x_all.shape[1], 4), torch.nn.ReLU(), torch.nn.Linear(4, 5))
        idx = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed_for(seed, 42)))[:3]
        with torch.no_grad():
            a = net(x_all[idx]).double()                                  # (3 samples, 5 neurons)
            bn_mean, bn_var = a.mean(0), a.var(0, unbiased=False)         # per neuron, over the batch
            ln_mean, ln_var = a.mean(1), a.var(1, unbiased=False)         # per sample, over the neurons
            bn_hand = (a - bn_mean) / torch.sqrt(bn_var + 1e-5)
            ln_hand = (a - ln_mean[:, None]) / torch.sqrt(ln_var[:, None] + 1e-5)
            bn_torch = torch.nn.BatchNorm1d(5, affine=False).double().train()(a)
            ln_torch = torch.nn.LayerNorm(5, elementwise_affine=False).double()(a)
        rows.append({"seed": seed,
                     "bn_max_abs_diff_vs_torch": float((bn_hand - bn_torch).abs().max()),
                     "ln_max_abs_diff_vs_torch": float((ln_hand - ln_torch).abs().max()),
                     # LN: one (mean, var) per sample shared by its 5 neurons; BN: one per neuron
                     "ln_terms_per_layer": int(ln_mean.numel()), "bn_terms_per_layer": int(bn_mean.numel())})
        if first is None:
            first = (a, bn_mean, bn_var, ln_mean, ln_var, bn_torch, ln_torch)
    worst_bn = max(r["bn_max_abs_diff_vs_torch"] for r in rows)
    worst_ln = max(r["ln_max_abs_diff_vs_torch"] for r in rows)
    fig = _figure(ctx, *first)
    scope = f"3 {display_name(ctx.data)} test images -> 4 -> 5 neurons, float64, {len(ctx.seeds)} random networks"
    claims = [
        claim("ln-per-sample", NAME, "LN normalizes each sample over its neurons",
              "input values in all neurons in the same layer are normalized for each data sample and that's why "
              "under layer normalization all neurons in the same layer will have the same normalization terms so "
              "the same mean and the same variance",
              f"Per-sample mean/variance over the 5 neurons reproduces torch.nn.LayerNorm, and per-neuron statistics "
              f"over the batch reproduce torch.nn.BatchNorm1d (train mode), max |diff| <= {EXACT_TOL} for every "
              f"seed; LN uses exactly one (mean, var) per sample, shared by all neurons.",
              {"ln_matches_torch": decide_checks({f"LN max |hand - torch| {worst_ln:.2g} <= {EXACT_TOL}":
                                                  worst_ln <= EXACT_TOL}),
               "bn_matches_torch": decide_checks({f"BN max |hand - torch| {worst_bn:.2g} <= {EXACT_TOL}":
                                                  worst_bn <= EXACT_TOL}),
               "one_term_per_sample": decide_checks({"LN terms per layer == batch (3)":
                                                     all(r["ln_terms_per_layer"] == 3 for r in rows)})},
              {"ln_max_abs_diff_vs_torch": worst_ln, "bn_max_abs_diff_vs_torch": worst_bn, "batch": 3, "neurons": 5,
               "seeds": ctx.seeds}, scope=scope),
        claim("ln-neuron-own-calculation", NAME, "under LN every neuron has its own calculation",
              "with layer normalization every neuron has its own calculations so you do not need to have that "
              "extra layer of communication",
              "Taken literally: under LN each of the 5 neurons would need its own normalization terms (5 per sample). "
              "Supported if the number of (mean, var) pairs LN uses per sample equals the number of neurons.",
              {"terms_per_neuron": decide_checks({"LN terms per sample (1) == neurons (5)": False})},
              {"ln_terms_per_sample": 1, "neurons": 5, "bn_terms_per_layer": 5, "ln_terms_per_layer_batch3": 3},
              note="Under LN the neurons of a layer share one mean/variance per sample (see ln-per-sample); it is "
                   "each sample that has its own calculation. The conclusion about communication is tested by the "
                   "parallel experiment.", scope=scope),
    ]
    return {"config": {"batch": 3, "neurons": 5, "previous_layer": 4, "data": ctx.data},
            "summary": {"bn_max_abs_diff_vs_torch": worst_bn, "ln_max_abs_diff_vs_torch": worst_ln},
            "claims": claims, "metrics": rows, "figures": [fig]}


def _figure(ctx, a, bn_mean, bn_var, ln_mean, ln_var, bn_out, ln_out) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4))
    a, bn_out, ln_out = a.numpy(), bn_out.numpy(), ln_out.numpy()

    def heat(ax, m, title, color):
        ax.imshow(m, cmap="coolwarm", vmin=-np.abs(m).max(), vmax=np.abs(m).max(), aspect="auto")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(5), [f"neuron {j + 1}" for j in range(5)], fontsize=8)
        ax.set_yticks(range(3), [f"sample {i + 1}" for i in range(3)], fontsize=8)
        ax.set_title(title, fontsize=10, color=color)

    heat(axes[0, 0], a, "BatchNorm: statistics per neuron, down the batch axis", COLORS["bn"])
    for j in range(5):
        axes[0, 0].annotate("", xy=(j, 2.45), xytext=(j, -0.45),
                            arrowprops=dict(arrowstyle="->", color=COLORS["bn"], lw=1.2, alpha=0.6))
        axes[0, 0].text(j, 2.75, f"μ={bn_mean[j]:.2f}\nσ²={bn_var[j]:.2f}", ha="center", va="top", fontsize=7)
    heat(axes[0, 1], bn_out, "BatchNorm output (each column: mean 0, var 1)", COLORS["bn"])
    heat(axes[1, 0], a, "LayerNorm: statistics per sample, across the neurons", COLORS["ln"])
    for i in range(3):
        axes[1, 0].annotate("", xy=(4.45, i), xytext=(-0.45, i),
                            arrowprops=dict(arrowstyle="->", color=COLORS["ln"], lw=1.2, alpha=0.6))
        axes[1, 0].text(4.6, i, f"μ={ln_mean[i]:.2f}\nσ²={ln_var[i]:.2f}", ha="left", va="center", fontsize=7)
    heat(axes[1, 1], ln_out, "LayerNorm output (each row: mean 0, var 1)", COLORS["ln"])
    fig.suptitle(f"Real activations (3 {display_name(ctx.data)} images -> 4 -> 5 neurons): "
                 "where the statistics are taken",
                 fontsize=11)
    fig.tight_layout()
    return savefig(fig, ctx.fig_dir, "what-ln-computes.png")
