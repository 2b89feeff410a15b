"""Which norm when: the closing table, computed from the other experiments of the same run.

For every situation the lab measured, the options are compared paired per seed (95% t-interval of
the difference). A norm is recommended only when it is significantly better than every other option;
when some options are statistically tied with the best, the row recommends "A or B (tied)", and when
all are, it says "no measurable difference". Exact facts (train/test, data-parallel) recommend the
option whose check passed.

The claim ``ln-improvement-over-bn`` reads "improvement over batch normalization" as a blanket
statement: LN vs BN is judged in every situation where both were measured, both ways.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..experiment import Context, claim
from ..figures import NORM_NAMES
from ..models import RNN_NAMES
from ..pool import Job
from ..stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, decide_effect, significance
from . import batch_size, cnn, rnn_mnist, rnn_text, variable_length

NAME = "choose"
TITLE = "Which norm when"
DEPENDS_ON = ("batch-size", "train-test", "variable-length", "parallel", "rnn-text", "rnn-mnist", "cnn")
NAMES = {**NORM_NAMES, **RNN_NAMES}
CRITERIA = {"rule": "LN vs BN judged both ways with each experiment's minimum effect"}


def plan(ctx: Context) -> List[Job]:
    return []


def _compare(options: Dict[str, Dict], higher: bool, unit: str) -> Tuple[str, str, List[str]]:
    """(recommended, measured text, tied-with-best): paired per seed; recommend only a significant winner."""
    sign = 1.0 if higher else -1.0
    best = max(options, key=lambda k: sign * options[k]["mean"])
    tied = [k for k in options if k != best and significance(
        [sign * (a - b) for a, b in zip(options[best]["values"], options[k]["values"])]) <= 0]
    order = sorted(options, key=lambda k: -sign * options[k]["mean"])
    measured = ", ".join(f"{NAMES[k]} {options[k]['mean']:.2f}{unit}" for k in order)
    if not tied:
        return NAMES[best], measured, [best]
    if len(tied) + 1 == len(options):
        return "no measurable difference", measured, [best] + tied
    return " or ".join(NAMES[k] for k in [best] + tied) + " (tied)", measured, [best] + tied


def _duel(ln: Dict, bn: Dict, min_effect: float, higher: bool) -> Dict:
    """LN vs BN, paired per seed, judged both ways by the effect rule."""
    sign = 1.0 if higher else -1.0
    d = [sign * (a - b) for a, b in zip(ln["values"], bn["values"])]
    ln_better = decide_effect(d, min_effect)
    bn_better = decide_effect([-x for x in d], min_effect)
    winner = "ln" if ln_better["verdict"] == SUPPORTED else "bn" if bn_better["verdict"] == SUPPORTED else "neither"
    return {"winner": winner, "min_effect": min_effect, "ln_advantage": ln_better["difference"]}


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    R = ctx.results
    rows: List[Dict] = []
    duels: Dict[str, Dict] = {}

    def add(situation: str, options: Dict[str, Dict], higher: bool, unit: str, duel: Optional[Tuple] = None,
            source: str = "") -> None:
        rec, measured, tied = _compare(options, higher, unit)
        row = {"situation": situation, "recommended": rec, "tied_with_best": [NAMES[k] for k in tied],
               "measured": measured, "source": source, "ln_vs_bn": "-"}
        if duel is not None:
            ln, bn, min_effect = duel
            d = _duel(options[ln], options[bn], min_effect, higher)
            duels[situation] = d
            row["ln_vs_bn"] = {"ln": "LN better", "bn": "BN better", "neither": "no significant difference"}[
                d["winner"]]
        rows.append(row)

    if "batch-size" in R:
        t = R["batch-size"]["summary"]["test_acc_pp"]
        sizes = sorted(int(b) for b in t["bn"])
        for b in (sizes[0], sizes[-1]):
            add(f"MLP, batch {b}", {n: t[n][str(b)] for n in t}, True, "%",
                ("ln", "bn", batch_size.ACC_EFFECT_PP), "batch-size")
    if "cnn" in R:
        s = R["cnn"]["summary"]
        add("Small CNN, batch 64", s["final_test_acc_pp"], True, "%", ("ln", "bn", cnn.CNN_EFFECT_PP), "cnn")
        small = min(int(b) for b in s["crossover_test_acc_pp"]["bn"])
        add(f"Small CNN, batch {small}", {n: s["crossover_test_acc_pp"][n][str(small)]
                                          for n in s["crossover_test_acc_pp"]}, True, "%",
            ("ln", "bn", cnn.SMALL_BATCH_EFFECT_PP), "cnn")
    if "rnn-text" in R:
        add("Recurrent LM on text (T = 100), final bits/char", R["rnn-text"]["summary"]["final_valid_bpc"], False,
            " bpc", ("ln-lstm", "bn-lstm", rnn_text.END_EFFECT_BPC), "rnn-text")
    if "rnn-mnist" in R:
        for task, s in R["rnn-mnist"]["summary"].items():
            add(f"Recurrent classifier, sequential MNIST {task} (T = {s['seq_len']})", s["final_test_acc_pp"], True,
                "%", ("ln-lstm", "bn-lstm", rnn_mnist.END_EFFECT_PP), "rnn-mnist")
    if "variable-length" in R:
        s = R["variable-length"]["summary"]["bpc_by_position"]
        add("Variable-length text, beyond twice the trained length", {k: s[k]["2L-4L"] for k in s}, False, " bpc",
            ("ln-lstm", "bn-lstm", variable_length.END_EFFECT_BPC), "variable-length")
    if "train-test" in R:
        g = R["train-test"]["summary"]["train_eval_max_abs_diff"]
        rows.append({"situation": "Same computation at training and test time", "source": "train-test",
                     "recommended": NORM_NAMES["ln"] if g["ln"] == 0 else "no measurable difference",
                     "tied_with_best": [], "ln_vs_bn": "-",
                     "measured": f"train-vs-eval max |diff|: LayerNorm {g['ln']:.3g}, BatchNorm {g['bn']:.3g}"})
    if "parallel" in R:
        c = R["parallel"]["summary"]["collectives_per_step"]
        gd = R["parallel"]["summary"]["grad_max_abs_diff_step1"]
        ln_ok = c["ln"]["extra_calls_per_step"] == 0 and gd["ln"] <= 1e-5
        rows.append({"situation": "Data-parallel training (2 processes)", "source": "parallel",
                     "recommended": NORM_NAMES["ln"] if ln_ok else NORM_NAMES["syncbn"], "tied_with_best": [],
                     "ln_vs_bn": "-",
                     "measured": f"collectives per step: LayerNorm {c['ln']['calls_per_step']}, BatchNorm "
                                 f"{c['bn']['calls_per_step']} (gradient off by {gd['bn']:.2g}), SyncBatchNorm "
                                 f"{c['syncbn']['calls_per_step']}"})
    missing = [k for k in DEPENDS_ON if k not in R]
    ln_wins = sorted(k for k, d in duels.items() if d["winner"] == "ln")
    bn_wins = sorted(k for k, d in duels.items() if d["winner"] == "bn")
    if bn_wins:
        verdict = NOT_SUPPORTED
    elif missing or not ln_wins:
        verdict = INCONCLUSIVE
    else:
        verdict = SUPPORTED
    part = {"verdict": verdict, "rule": "summary", "ln_better_in": ln_wins, "bn_better_in": bn_wins,
            "missing_experiments": missing,
            "label": f"LN significantly better in {len(ln_wins)}, BN in {len(bn_wins)} of {len(duels)} situations"}
    claims = [claim(
        "ln-improvement-over-bn", NAME, "LN is an improvement over BN",
        "that's why we have layer normalization and improvement over batch normalization",
        "A blanket improvement. In every situation where LN and BN were both measured (MLP at the smallest and largest "
        "batch, CNN at batch 64 and at the smallest batch, recurrent nets on text and sequential MNIST, variable "
        "length), the paired per-seed difference is judged by the effect rule both ways, with that experiment's "
        "minimum effect. Not supported if BN is significantly better anywhere; supported if LN is significantly "
        "better somewhere and BN nowhere; inconclusive otherwise (or if an experiment is missing).",
        {"no_situation_where_bn_wins": part}, {"ln_vs_bn": duels},
        scope="every situation of this run where both were measured")]
    return {"config": {"from": sorted(k for k in R if k != NAME)}, "summary": {"table": rows},
            "claims": claims, "metrics": rows, "figures": []}
