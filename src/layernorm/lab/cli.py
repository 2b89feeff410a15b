"""``layernorm lab``: test the claims of the seed material with experiments.

Called by the package CLI as ``layernorm.lab.cli.main(argv)`` for ``layernorm lab ...``; also
``python -m layernorm.lab``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .experiments import ORDER

__all__ = ["main", "build_parser"]


def build_parser(prog: str = "layernorm lab") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Test every claim of the seed material (what layer normalization is and when it beats batch "
                    "normalization) with experiments: fixed criteria, several seeds, a verdict per claim. "
                    "Writes OUT/RUN/results.json (schema: docs/lab.md), metrics CSV, figures, report.md, report.html.")
    p.add_argument("--quick", action="store_true", help="same code paths, fewer seeds and steps (< 1 minute)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help=f"run only these experiments (repeatable or comma list): {', '.join(ORDER)}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
    p.add_argument("--out", default="lab-runs", help="output directory (default: lab-runs)")
    p.add_argument("--run", default=None, metavar="NAME",
                   help="run name (default from the settings, e.g. full-5seeds-digits); finished experiments in an "
                        "existing run are skipped, so rerunning resumes an interrupted run")
    p.add_argument("--resume", action="store_true",
                   help="resume the run (the default behaviour; without --run, the most recent run in --out)")
    p.add_argument("--fresh", action="store_true", help="discard the run's finished experiments and start over")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="local MNIST/CIFAR copy instead of the 8x8 digits: a directory of IDX files "
                        "(train-images-idx3-ubyte[.gz], ...) or an .npz with x_train, y_train, x_test, y_test")
    p.add_argument("--workers", type=int, default=None, help="processes for training jobs (default: min(2, CPUs))")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _latest_run(out: str) -> Optional[str]:
    if not os.path.isdir(out):
        return None
    runs = [d for d in os.listdir(out) if os.path.isfile(os.path.join(out, d, "config.json"))]
    return max(runs, key=lambda d: os.path.getmtime(os.path.join(out, d, "config.json"))) if runs else None


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from rich.console import Console

    from .runner import run_lab

    console = Console(stderr=True)
    run, quick, seeds, data = a.run, a.quick, a.seeds, a.data
    if a.resume and run is None:
        run = _latest_run(a.out)
        if run is None:
            console.print(f"[red]--resume: no run found in {a.out!r}[/red]")
            return 2
        with open(os.path.join(a.out, run, "config.json")) as f:
            cfg = json.load(f)
        quick, seeds = cfg["quick"], len(cfg["seeds"])
    try:
        run_dir = run_lab(out=a.out, run=run, only=a.only, seeds=seeds, quick=quick, data=data, workers=a.workers,
                          fresh=a.fresh, progress=not a.no_progress, console=console)
    except ValueError as exc:
        console.print(f"[red]layernorm lab: {exc}[/red]")
        return 2
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    from rich.table import Table

    t = Table(title=f"verdicts — {run_dir}")
    for col in ("claim", "verdict", "experiment"):
        t.add_column(col)
    color = {"supported": "green", "not supported": "red", "inconclusive": "yellow"}
    for c in res["claims"]:
        t.add_row(c["id"], f"[{color[c['verdict']]}]{c['verdict']}[/]", c["experiment"])
    Console().print(t)
    print(f"report: {os.path.join(run_dir, 'report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
