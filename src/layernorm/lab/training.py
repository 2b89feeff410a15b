"""The one training loop every experiment uses, with seeding and evaluation helpers.

:func:`train` runs Adam for a fixed number of steps, optionally clips the gradient norm, evaluates the
model at given steps, and stops at the first non-finite loss or gradient: such a run is *diverged*; its
optimizer never takes the non-finite step, so the model keeps its last finite parameters, and the
evaluations left are of that model (training stopped). Every job seeds itself from (seed, salt) with
:func:`seed_for` and runs single-threaded with deterministic algorithms (:func:`setup_worker`), so its
result depends only on its arguments.

Example::

    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> out = train(model, steps=5, next_batch=lambda step: (x, y), lr=1e-2,
    ...             loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    >>> out["steps_done"], out["diverged_at"]
    (5, None)
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

__all__ = ["seed_for", "setup_worker", "train", "epoch_batches", "accuracy"]


def seed_for(seed: int, salt: int) -> int:
    """A stable seed per (run seed, stream): never Python's salted ``hash()``."""
    return (seed * 1_000_003 + salt * 7919) % (2**31 - 1)


def setup_worker(threads: int = 1) -> None:
    """Pin the thread count and make torch deterministic (every worker and the main process call it)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def epoch_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches over shuffled epochs, without end; the ragged last batch of an epoch is dropped
    (BatchNorm cannot normalize a batch of one)."""
    if not 1 <= batch <= n:
        raise ValueError(f"batch must be in [1, {n}], got {batch}")
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(n // batch):
            yield perm[i * batch:(i + 1) * batch]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Fraction of ``x`` classified as ``y`` in eval mode."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def train(model: torch.nn.Module, *, steps: int, next_batch: Callable[[int], Any],
          loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], lr: float, clip: Optional[float] = None,
          eval_at: Sequence[int] = (), evaluate: Optional[Callable[[], Dict[str, float]]] = None) -> Dict[str, Any]:
    """Adam on ``loss_fn(model, next_batch(step))`` for ``steps`` steps (1-based), evaluating after ``eval_at``.

    Returns ``{"steps_done", "diverged_at", "eval_steps", "evals", "train_loss"}``: ``evals[i]`` is
    ``evaluate()`` after step ``eval_steps[i]`` (step 0: before training), ``train_loss[i]`` the mean
    training loss since the previous evaluation (None when no step was taken in between).
    ``diverged_at`` is the step whose loss or gradient norm was not finite (that step is not applied),
    else None.
    """
    points = sorted(set(int(s) for s in eval_at if 0 <= s <= steps))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    evals: List[Dict[str, float]] = []
    train_loss: List[float] = []
    window: List[float] = []
    diverged_at = None
    done = 0
    nxt = 0
    if points and points[0] == 0:
        evals.append(evaluate() if evaluate is not None else {})
        train_loss.append(None)
        nxt = 1
    for step in range(1, steps + 1):
        model.train()
        loss = loss_fn(model, next_batch(step))
        ok = bool(torch.isfinite(loss))
        if ok:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                ok = bool(torch.isfinite(norm))
        if not ok:
            diverged_at = step
            break
        opt.step()
        done = step
        window.append(float(loss.detach()))
        if nxt < len(points) and step == points[nxt]:
            evals.append(evaluate() if evaluate is not None else {})
            train_loss.append(sum(window) / len(window) if window else None)
            window = []
            nxt += 1
    if nxt < len(points):  # stopped early: the model no longer changes, evaluate it once for the rest
        last = evaluate() if evaluate is not None else {}
        for _ in points[nxt:]:
            evals.append(dict(last))
            train_loss.append(sum(window) / len(window) if window else None)
            window = []
    return {"steps_done": done, "diverged_at": diverged_at, "eval_steps": points, "evals": evals,
            "train_loss": train_loss}
