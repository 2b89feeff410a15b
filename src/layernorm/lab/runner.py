"""Runs the experiments into ``OUT/RUN/``, resumably, and assembles results.json and the reports.

Layout of a run directory::

    config.json                  the run's settings (a rerun with other settings is refused)
    experiments/<name>.json      one finished experiment (written atomically when it finishes)
    metrics/<name>.csv           its per-seed metrics
    figures/<name>.png           its figures
    timings/<name>.json          wall times (kept out of results.json: not reproducible)
    results.json, metrics.csv, timings.json, report.md, report.html    assembled at the end

A rerun with the same ``--out``/``--run`` skips every experiment whose JSON exists, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from typing import Dict, Iterable, List, Optional

from . import jobs
from .experiments import EXPERIMENTS, ORDER, TITLES, Context
from .stats import VERDICTS

__all__ = ["run_lab", "atomic_write", "assemble", "SCHEMA_VERSION", "default_run_name"]

SCHEMA_VERSION = 1


def atomic_write(path: str, data, binary: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(data)
    os.replace(tmp, path)


def _json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True) + "\n"


def _csv(rows: List[Dict]) -> str:
    cols: List[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return buf.getvalue()


def default_run_name(quick: bool, seeds: int, data: Optional[str]) -> str:
    name = "digits" if data is None else os.path.basename(os.path.normpath(data)).replace(".npz", "")
    return f"{'quick' if quick else 'full'}-{seeds}seeds-{name}"


def _parse_only(only: Optional[Iterable[str]]) -> List[str]:
    if not only:
        return list(ORDER)
    names: List[str] = []
    for item in only:
        names += [s.strip() for s in item.split(",") if s.strip()]
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad:
        raise ValueError(f"--only: unknown experiment(s) {bad}; choose from {ORDER}")
    return [n for n in ORDER if n in names]


def _load(path: str) -> Dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_lab(out: str = "lab-runs", run: Optional[str] = None, only: Optional[Iterable[str]] = None,
            seeds: Optional[int] = None, quick: bool = False, data: Optional[str] = None,
            workers: Optional[int] = None, fresh: bool = False, progress: bool = True, console=None) -> str:
    """Run the lab; returns the run directory. See ``layernorm lab --help`` for the arguments."""
    names = _parse_only(only)
    n_seeds = seeds if seeds is not None else (2 if quick else 5)
    if n_seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {n_seeds}")
    if data is not None and not os.path.exists(data):
        raise ValueError(f"--data: {data!r} does not exist")
    run = run or default_run_name(quick, n_seeds, data)
    run_dir = os.path.join(out, run)
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    for sub in ("experiments", "metrics", "figures", "timings"):
        os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    config = {"quick": bool(quick), "seeds": list(range(n_seeds)),
              "data": "sklearn digits 8x8" if data is None else os.path.basename(os.path.normpath(data))}
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.exists(cfg_path):
        old = _load(cfg_path)
        if old != config:
            raise ValueError(f"run directory {run_dir!r} holds a run with other settings ({old}); pass another "
                             f"--run NAME or --fresh to start over")
    else:
        atomic_write(cfg_path, _json(config))

    jobs.setup_worker(1)
    done = {n: _load(os.path.join(run_dir, "experiments", f"{n}.json")) for n in ORDER
            if os.path.exists(os.path.join(run_dir, "experiments", f"{n}.json"))}
    todo = [n for n in names if n not in done]
    if "choose" in names and "choose" in done and any(n != "choose" for n in todo):
        todo.append("choose")  # the closing table must reflect the experiments that just ran
        todo = [n for n in ORDER if n in todo]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    needs_pool = workers > 1 and any(n in todo for n in ("batch-size", "train-test", "variable-length", "rnn",
                                                         "cnn-downside"))
    pool = None
    if needs_pool:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=jobs.setup_worker, initargs=(1,))
    bar = _Bar(progress, console)
    try:
        with bar:
            for n in names:
                if n not in todo:
                    bar.skip(n)
            for n in todo:
                task = bar.add(n)
                ctx = Context(config["seeds"], quick, data, os.path.join(run_dir, "figures"), pool,
                              advance=lambda k, t=task: bar.advance(t, k), set_total=lambda k, t=task: bar.total(t, k),
                              results=dict(done))
                t0 = time.perf_counter()
                res = EXPERIMENTS[n](ctx)
                timings = res.pop("timings", {})
                timings["experiment_s"] = time.perf_counter() - t0
                res = {"name": n, "title": TITLES[n], **res}
                metrics = res.pop("metrics", [])
                atomic_write(os.path.join(run_dir, "metrics", f"{n}.csv"), _csv(metrics))
                atomic_write(os.path.join(run_dir, "timings", f"{n}.json"), _json(timings))
                res["metrics_csv"] = f"metrics/{n}.csv"
                # the experiment's JSON last: its presence means "finished"
                atomic_write(os.path.join(run_dir, "experiments", f"{n}.json"), _json(res))
                done[n] = res
                bar.finish(task)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    assemble(run_dir, run, config)
    return run_dir


def assemble(run_dir: str, run: str, config: Dict) -> Dict:
    """Build results.json, metrics.csv, timings.json, report.md and report.html from the finished experiments."""
    from .experiments import ACC_EFFECT_PP, ACC_MARGIN_PP, DDP_TOL, DEPENDENCE_TOL, EXACT_TOL, MSE_EFFECT, RNN_EFFECT_PP
    from .report import write_reports

    exps = {}
    for n in ORDER:
        p = os.path.join(run_dir, "experiments", f"{n}.json")
        if os.path.exists(p):
            exps[n] = _load(p)
    claims = [c for n in exps for c in exps[n]["claims"]]
    counts = {v: sum(c["verdict"] == v for c in claims) for v in VERDICTS}
    import torch

    from .. import __version__

    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": "layernorm lab",
        "layernorm_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "run": run,
        "config": {**config, "criteria": {"exact_tol": EXACT_TOL, "dependence_tol": DEPENDENCE_TOL,
                                          "ddp_tol": DDP_TOL, "acc_effect_pp": ACC_EFFECT_PP,
                                          "acc_margin_pp": ACC_MARGIN_PP, "rnn_cnn_effect_pp": RNN_EFFECT_PP,
                                          "mse_effect": MSE_EFFECT, "confidence": 0.95}},
        "verdict_counts": counts,
        "claims": claims,
        "experiments": {n: {"title": e["title"], "config": e["config"], "summary": e["summary"],
                            "claim_ids": [c["id"] for c in e["claims"]],
                            "figures": [f"figures/{f}" for f in e["figures"]], "metrics_csv": e["metrics_csv"]}
                        for n, e in exps.items()},
        "choose": exps["choose"]["summary"]["table"] if "choose" in exps else [],
    }
    atomic_write(os.path.join(run_dir, "results.json"), _json(results))
    rows = []
    for n in exps:
        p = os.path.join(run_dir, "metrics", f"{n}.csv")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                rows += [{"experiment": n, **r} for r in csv.DictReader(f)]
    atomic_write(os.path.join(run_dir, "metrics.csv"), _csv(rows))
    timings = {}
    for n in exps:
        p = os.path.join(run_dir, "timings", f"{n}.json")
        if os.path.exists(p):
            timings[n] = _load(p)
    atomic_write(os.path.join(run_dir, "timings.json"), _json(timings))
    write_reports(run_dir, results)
    return results


class _Bar:
    """A rich progress bar per experiment (quiet when ``enabled`` is False)."""

    def __init__(self, enabled: bool, console) -> None:
        self.enabled = enabled
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console, transient=False)

    def __enter__(self):
        if self.p:
            self.p.__enter__()
        return self

    def __exit__(self, *a):
        if self.p:
            self.p.__exit__(*a)

    def add(self, name: str):
        return self.p.add_task(TITLES[name], total=None) if self.p else None

    def skip(self, name: str) -> None:
        if self.p:
            self.p.add_task(f"{TITLES[name]} (done, skipped)", total=1, completed=1)

    def total(self, task, n: int) -> None:
        if self.p:
            t = self.p.tasks[task]
            self.p.update(task, total=(t.total or 0) + n if t.total else n)

    def advance(self, task, n: int) -> None:
        if self.p:
            self.p.advance(task, n)

    def finish(self, task) -> None:
        if self.p:
            t = self.p.tasks[task]
            self.p.update(task, total=t.total or 1, completed=t.total or 1)
