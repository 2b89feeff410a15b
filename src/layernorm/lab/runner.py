"""Runs the experiments into ``OUT/RUN/``, resumably, and assembles results.json and the reports.

Layout of a run directory::

    .lock                        held by the one `layernorm lab` using the directory
    config.json                  the run's settings (a rerun with other settings is refused)
    experiments/<name>.json      one finished experiment (written last, atomically, when it finishes)
    metrics/<name>.csv           its per-seed metrics
    figures/<name>.png           its figures
    timings/<name>.json          wall times (kept out of results.json: not reproducible)
    results.json, metrics.csv, timings.json, report.md, report.html    assembled at the end

A rerun with the same ``--out``/``--run`` skips every experiment whose JSON exists, so an interrupted
run resumes where it stopped. All pending training jobs of all experiments share one process pool
(``pool.run_jobs``); an experiment is analysed and written as soon as its last job returns.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import shutil
import time
from typing import Callable, Dict, Iterable, List, Optional

from .data import check_data_option, describe_data, describe_text, load_text
from .experiment import SOURCE, Context
from .experiments import EXPERIMENTS, ORDER, TITLES
from .files import LabError, RunLock, atomic_write, remove_stale_temporaries
from .pool import Job, estimated_total, run_jobs
from .stats import VERDICTS
from .training import setup_worker

__all__ = ["run_lab", "assemble", "SCHEMA_VERSION", "default_run_name", "list_runs", "MIN_SEEDS_FOR_VERDICTS"]

SCHEMA_VERSION = 2
# Below this many seeds the verdicts are a preview: the criteria were fixed for at least 5 seeds.
MIN_SEEDS_FOR_VERDICTS = 5
TEXT_EXPERIMENTS = ("variable-length", "rnn-text")


def _finite(obj):
    """NaN and infinities as null: results.json stays strict JSON whatever a metric did."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json(obj) -> str:
    return json.dumps(_finite(obj), indent=1, sort_keys=False, allow_nan=False) + "\n"


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


def _load(path: str) -> Dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def default_run_name(quick: bool, seeds: int, data: str, first_seed: int = 0) -> str:
    name = data if data in ("mnist", "digits") else os.path.basename(os.path.normpath(data)).replace(".npz", "")
    return f"{'quick' if quick else 'full'}-{seeds}seeds-{name}" + (f"-from{first_seed}" if first_seed else "")


def list_runs(out: str) -> List[str]:
    """Run directories in ``out`` (those with a config.json), most recent first."""
    if not os.path.isdir(out):
        return []
    runs = [d for d in os.listdir(out) if os.path.isfile(os.path.join(out, d, "config.json"))]
    return sorted(runs, key=lambda d: -os.path.getmtime(os.path.join(out, d, "config.json")))


def _parse_only(only: Optional[Iterable[str]]) -> List[str]:
    if not only:
        return list(ORDER)
    names: List[str] = []
    for item in only:
        names += [s.strip() for s in item.split(",") if s.strip()]
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad:
        raise LabError(f"--only: unknown experiment(s) {', '.join(bad)}; choose from {', '.join(ORDER)}")
    return [n for n in ORDER if n in names]


def _describe_config(cfg: Dict) -> str:
    return (f"{'quick' if cfg.get('quick') else 'full'}, {len(cfg.get('seeds', []))} seeds from "
            f"{(cfg.get('seeds') or [0])[0]}, data {cfg.get('data_option')!r}")


def _resolve(out: str, run: Optional[str], resume: bool, seeds: Optional[int], quick: Optional[bool],
             data: Optional[str], first_seed: Optional[int], say: Callable[[str], None]) -> Dict:
    """Decide the run directory and its settings; explain every case where the user might expect another."""
    if resume:
        run = run or (list_runs(out) or [None])[0]
        if run is None:
            raise LabError(f"--resume: no run found in {out!r}")
        cfg_path = os.path.join(out, run, "config.json")
        if not os.path.isfile(cfg_path):
            raise LabError(f"--resume: {os.path.join(out, run)!r} holds no run (no config.json); drop --resume to "
                           "start it")
        old = _load(cfg_path)
        asked = {"seeds": (seeds, len(old["seeds"])), "quick": (quick, old["quick"]),
                 "data": (data, old["data_option"]), "first-seed": (first_seed, old["seeds"][0])}
        diff = [f"--{k} {'' if isinstance(a, bool) else a}".strip() + f" (the run has {b})"
                for k, (a, b) in asked.items() if a is not None and a != b]
        if diff:
            raise LabError(f"--resume: run {run!r} was started with other settings: {'; '.join(diff)}. Drop those "
                           f"options to resume it, or pass --run NEW_NAME to start a separate run")
        say(f"resuming run {run!r} ({_describe_config(old)})")
        return {"run": run, "seeds": len(old["seeds"]), "quick": old["quick"], "data": old["data_option"],
                "first_seed": old["seeds"][0]}
    quick = bool(quick)
    data = data or "mnist"
    first_seed = first_seed or 0
    n = seeds if seeds is not None else (2 if quick else MIN_SEEDS_FOR_VERDICTS)
    if n < 1:
        raise LabError(f"--seeds must be >= 1, got {n}")
    if first_seed < 0:
        raise LabError(f"--first-seed must be >= 0, got {first_seed}")
    name = run or default_run_name(quick, n, data, first_seed)
    others = [r for r in list_runs(out) if r != name]
    if not os.path.isfile(os.path.join(out, name, "config.json")) and others:
        say(f"starting a new run {name!r}; {out!r} also holds " + ", ".join(
            f"{r!r} ({_describe_config(_load(os.path.join(out, r, 'config.json')))})" for r in others[:4])
            + (" ..." if len(others) > 4 else "") + "; `--resume --run NAME` continues one of those")
    return {"run": name, "seeds": n, "quick": quick, "data": data, "first_seed": first_seed}


def run_lab(out: str = "lab-runs", run: Optional[str] = None, only: Optional[Iterable[str]] = None,
            seeds: Optional[int] = None, quick: Optional[bool] = None, data: Optional[str] = None,
            workers: Optional[int] = None, fresh: bool = False, progress: bool = True, console=None,
            resume: bool = False, first_seed: Optional[int] = None) -> str:
    """Run the lab; returns the run directory. See ``layernorm lab --help`` for the arguments.

    Raises:
        LabError: a problem the user can fix (bad option, busy or unwritable directory, unusable data).
    """
    def say(msg: str) -> None:
        if console is not None:
            console.print(msg, highlight=False, markup=False, soft_wrap=True)

    setup_worker()  # this process runs jobs too (workers=1) and must compute as the workers do
    names = _parse_only(only)
    r = _resolve(out, run, resume, seeds, quick, data, first_seed, say)
    run, quick, data = r["run"], r["quick"], r["data"]
    seed_list = list(range(r["first_seed"], r["first_seed"] + r["seeds"]))
    # the data are checked before anything is created: a bad --data leaves no run folder behind
    try:
        check_data_option(data)
        if any(n in TEXT_EXPERIMENTS for n in names):
            load_text()
    except ValueError as exc:
        raise LabError(str(exc)) from None
    run_dir = os.path.join(out, run)
    try:
        if os.path.exists(out) and not os.path.isdir(out):
            raise LabError(f"--out {out!r} is a file, not a directory")
        os.makedirs(run_dir, exist_ok=True)
        lock = RunLock(run_dir)
        lock.__enter__()
    except OSError as exc:
        raise LabError(f"cannot write to --out {out!r}: {exc.strerror or exc}") from None
    try:
        return _run_locked(run_dir, run, names, seed_list, quick, data, workers, fresh, progress, console, say)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise LabError(f"cannot write to {exc.filename or run_dir!r}: {exc.strerror}") from None
        raise
    finally:
        lock.__exit__(None, None, None)


def _run_locked(run_dir: str, run: str, names: List[str], seed_list: List[int], quick: bool, data: str,
                workers: Optional[int], fresh: bool, progress: bool, console, say) -> str:
    if fresh:
        for entry in os.listdir(run_dir):
            if entry != ".lock":
                p = os.path.join(run_dir, entry)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    stale = remove_stale_temporaries(run_dir)
    if stale:
        say(f"removed {len(stale)} temporary file(s) left by an interrupted run")
    for sub in ("experiments", "metrics", "figures", "timings"):
        os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    config = {"schema_version": SCHEMA_VERSION, "quick": quick, "seeds": seed_list, "data_option": data,
              "preview": quick or len(seed_list) < MIN_SEEDS_FOR_VERDICTS}
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.exists(cfg_path):
        old = _load(cfg_path)
        if old != config:
            raise LabError(f"run directory {run_dir!r} holds a run with other settings ({_describe_config(old)}); "
                           f"pass --run NEW_NAME for a separate run, or --fresh to start this one over")
    else:
        atomic_write(cfg_path, _json(config))

    done = {n: _load(os.path.join(run_dir, "experiments", f"{n}.json")) for n in ORDER
            if os.path.exists(os.path.join(run_dir, "experiments", f"{n}.json"))}
    todo = [n for n in names if n not in done]
    if "choose" in names and "choose" in done and any(n != "choose" for n in todo):
        todo.append("choose")  # the closing table must reflect the experiments that just ran
    todo = [n for n in ORDER if n in todo]
    if done and todo:
        say(f"run {run!r}: {len([n for n in names if n in done])} experiment(s) already finished, skipped")
    fig_dir = os.path.join(run_dir, "figures")

    def ctx() -> Context:
        return Context(seed_list, quick, data, fig_dir, results=dict(done))

    plans: Dict[str, List[Job]] = {n: EXPERIMENTS[n].plan(ctx()) for n in todo if n != "choose"}
    results: Dict[str, List] = {n: [None] * len(p) for n, p in plans.items()}
    left = {n: len(p) for n, p in plans.items()}
    job_seconds: Dict[str, float] = {n: 0.0 for n in plans}
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    all_jobs = [j for p in plans.values() for j in p]
    t_start = time.perf_counter()
    bar = _Bar(progress, console)

    def finish(n: str) -> None:
        t0 = time.perf_counter()
        rec = EXPERIMENTS[n].analyze(ctx(), results.get(n, []))
        timings = {"jobs": len(plans.get(n, [])), "job_seconds_sum": round(job_seconds.get(n, 0.0), 3),
                   **rec.pop("timings", {}), "analysis_s": round(time.perf_counter() - t0, 3),
                   "finished_after_s": round(time.perf_counter() - t_start, 3)}
        rec = {"name": n, "title": TITLES[n], **rec}
        metrics = rec.pop("metrics", [])
        atomic_write(os.path.join(run_dir, "metrics", f"{n}.csv"), _csv(metrics))
        atomic_write(os.path.join(run_dir, "timings", f"{n}.json"), _json(timings))
        rec["metrics_csv"] = f"metrics/{n}.csv"
        # the experiment's JSON last: its presence means "finished"
        atomic_write(os.path.join(run_dir, "experiments", f"{n}.json"), _json(rec))
        done[n] = rec
        bar.finish(n)

    def on_done(job: Job, result: Dict, seconds: float) -> None:
        results[job.experiment][job.index] = result
        job_seconds[job.experiment] += seconds
        left[job.experiment] -= 1
        bar.advance(job.experiment)
        if left[job.experiment] == 0:
            finish(job.experiment)

    with bar:
        for n in names:
            if n in done and n not in todo:
                bar.skip(n)
        for n in todo:
            bar.add(n, len(plans.get(n, [])) + 1)
        if all_jobs:
            say(f"{len(all_jobs)} training jobs, about {estimated_total(all_jobs) / max(1, workers) / 60:.0f} min "
                f"on {workers} worker(s) (estimate)")
        for n in todo:  # experiments without training jobs are analysed at once
            if n != "choose" and left[n] == 0:
                finish(n)
        run_jobs(all_jobs, workers, on_done)
        if "choose" in todo:
            finish("choose")
    timing_path = os.path.join(run_dir, "timings", "_run.json")
    atomic_write(timing_path, _json({"wall_s": round(time.perf_counter() - t_start, 3), "workers": workers,
                                     "jobs": len(all_jobs), "experiments_run": todo}))
    assemble(run_dir, run, config)
    return run_dir


def assemble(run_dir: str, run: str, config: Dict) -> Dict:
    """Build results.json, metrics.csv, timings.json, report.md and report.html from the finished experiments."""
    import torch

    from .. import __version__
    from .report import write_reports

    exps = {}
    for n in ORDER:
        p = os.path.join(run_dir, "experiments", f"{n}.json")
        if os.path.exists(p):
            exps[n] = _load(p)
    claims = [c for n in exps for c in exps[n]["claims"]]
    counts = {v: sum(c["verdict"] == v for c in claims) for v in VERDICTS}
    data = {"images": describe_data(config["data_option"])}
    if any(n in exps for n in TEXT_EXPERIMENTS):
        data["text"] = describe_text()
    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": "layernorm lab",
        "layernorm_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "run": run,
        "preview": config["preview"],
        "source": SOURCE,
        "config": {"quick": config["quick"], "seeds": config["seeds"], "data": data,
                   "criteria": {n: getattr(EXPERIMENTS[n], "CRITERIA", {}) for n in exps}, "confidence": 0.95,
                   "min_seeds_for_verdicts": MIN_SEEDS_FOR_VERDICTS},
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
    for n in list(exps) + ["_run"]:
        p = os.path.join(run_dir, "timings", f"{n}.json")
        if os.path.exists(p):
            timings[n] = _load(p)
    atomic_write(os.path.join(run_dir, "timings.json"), _json(timings))
    write_reports(run_dir, results)
    return results


class _Bar:
    """A rich progress bar per experiment (quiet when ``enabled`` is False)."""

    def __init__(self, enabled: bool, console) -> None:
        self.p = None
        self.tasks: Dict[str, object] = {}
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console, transient=False)

    def __enter__(self):
        if self.p:
            self.p.__enter__()
        return self

    def __exit__(self, *a):
        if self.p:
            self.p.__exit__(*a)

    def add(self, name: str, total: int) -> None:
        if self.p:
            self.tasks[name] = self.p.add_task(TITLES[name][:40], total=total)

    def skip(self, name: str) -> None:
        if self.p:
            self.p.add_task(f"{TITLES[name][:30]} (done)", total=1, completed=1)

    def advance(self, name: str) -> None:
        if self.p and name in self.tasks:
            self.p.advance(self.tasks[name], 1)

    def finish(self, name: str) -> None:
        if self.p and name in self.tasks:
            t = self.p.tasks[self.tasks[name]]
            self.p.update(self.tasks[name], completed=t.total)
