"""The process pool that runs the experiments' training jobs, and the rule that children die with their parent.

A job is one model trained with one seed: a module-level function of plain arguments returning plain
(JSON-able) data. All pending jobs of all experiments go to one pool at once, longest first (their
``cost`` is an estimate in seconds, used only for the order), so both cores stay busy until the end;
each job seeds itself and runs single-threaded, so its result does not depend on where, when or beside
what it ran. Results come back to the caller in the main process as they finish.

Children die with their parent: every worker asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)`` on Linux) and also runs a thread that exits when the parent pid changes
(every platform), so a ``kill -9`` of ``layernorm lab`` leaves no worker behind -- and with the workers
gone, multiprocessing's resource tracker sees its pipe close and exits too.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Tuple

__all__ = ["Job", "die_with_parent", "run_jobs", "estimated_total"]


@dataclass
class Job:
    """One unit of work: ``fn(**kwargs)`` for experiment ``experiment``; ``cost`` orders the queue (seconds)."""

    experiment: str
    index: int
    fn: Callable[..., Dict[str, Any]]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0


def die_with_parent(parent_pid: int) -> None:
    """Make this (child) process exit when ``parent_pid`` is no longer its parent.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; everywhere: a daemon thread polling ``os.getppid()``
    twice a second (it also covers a parent that died before the prctl call).
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the watch thread below does the job
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="layernorm-lab-parent-watch", daemon=True).start()


def _init_worker(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    from .training import setup_worker

    setup_worker()


def _timed(fn: Callable[..., Dict[str, Any]], kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], float]:
    t0 = time.perf_counter()
    result = fn(**kwargs)
    return result, time.perf_counter() - t0


def _describe(job: Job) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in job.kwargs.items() if not isinstance(v, (list, dict)))
    return f"experiment {job.experiment!r}, job {job.fn.__name__}({args})"


def run_jobs(jobs: Iterable[Job], workers: int, on_done: Callable[[Job, Dict[str, Any], float], None]) -> None:
    """Run ``jobs`` (longest first) in ``workers`` processes, or in this process when ``workers <= 1``.

    ``on_done(job, result, seconds)`` is called in this process, in completion order (``seconds``: the
    job's wall time). A job that raises stops the pool and is re-raised as ``RuntimeError`` naming the
    experiment and the job.
    """
    queue: List[Job] = sorted(jobs, key=lambda j: -j.cost)
    if not queue:
        return
    if workers <= 1:
        from .training import setup_worker

        setup_worker()
        for job in queue:
            try:
                result, seconds = _timed(job.fn, job.kwargs)
            except Exception as exc:
                raise RuntimeError(f"layernorm lab: {_describe(job)} failed: {type(exc).__name__}: {exc}") from exc
            on_done(job, result, seconds)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(),))
    clean = False
    try:
        pending = {pool.submit(_timed, job.fn, job.kwargs): job for job in queue}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    raise RuntimeError(f"layernorm lab: {_describe(job)} failed: {type(exc).__name__}: {exc}") from exc
                on_done(job, *fut.result())
        clean = True
    finally:
        if clean:
            pool.shutdown(wait=True)
        else:  # an error or Ctrl-C: drop the queue and stop the workers now, not after their current job
            procs = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)


def estimated_total(jobs: Iterable[Job]) -> float:
    """Sum of the jobs' cost estimates (seconds of one core)."""
    return float(sum(j.cost for j in jobs))
