"""``layernorm.lab``: the claims of the seed material, tested by experiment.

Each claim of the material (what layer normalization computes, batch-size independence, the same
computation at train and test time, variable-length sequences, data parallelism, RNNs, CNNs) gets
an experiment and a criterion fixed in code before the run, is measured over several seeds, and
ends in a verdict: "supported", "not supported" or "inconclusive", with the numbers behind it.

Run ``layernorm lab`` (or ``python -m layernorm.lab``); see docs/lab.md for the results.json schema.

Example::

    >>> from layernorm.lab import run_lab
    >>> run_dir = run_lab(out="lab-runs", quick=True, only=["what-ln-computes"])  # doctest: +SKIP
"""
from .experiments import EXPERIMENTS, ORDER
from .runner import run_lab
from .stats import decide_checks, decide_effect, decide_no_worse

__all__ = ["run_lab", "EXPERIMENTS", "ORDER", "decide_effect", "decide_no_worse", "decide_checks"]
