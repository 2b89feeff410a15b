"""Units of work of the experiments: one model trained with one seed, run serially or in a process pool.

Each job is a top-level function of plain arguments returning plain (JSON-able) data, so a
``ProcessPoolExecutor`` can run them; it seeds itself and runs single-threaded with deterministic
algorithms, so its result does not depend on where or beside what it runs.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .data import ImageData, adding_problem, load_images
from .models import CNN, MLP, SeqModel

_DATA: Dict[Optional[str], ImageData] = {}


def setup_worker(threads: int = 1) -> None:
    """Pin the thread count and make torch deterministic (called in every worker and the main process)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("LAYERNORM_RNN_IMPL_WARN", "0")


def get_data(path: Optional[str]) -> ImageData:
    """The standardized image data, loaded once per process."""
    if path not in _DATA:
        _DATA[path] = load_images(path).standardized()
    return _DATA[path]


def _seed(seed: int, salt: int) -> int:
    # distinct, stable streams per (experiment/config, seed): never Python's salted hash()
    return (seed * 1_000_003 + salt * 7919) % (2**31 - 1)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def _train_epochs(model, x, y, batch: int, epochs: float, lr: float, gen: torch.Generator, on_epoch=None):
    """Adam on shuffled mini-batches for ``epochs`` passes (a fraction is allowed: that many steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(x)
    per_epoch = n // batch  # drop the ragged last batch: BatchNorm cannot take a batch of one
    total = max(1, int(round(epochs * per_epoch)))
    done, ep = 0, 0
    while done < total:
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(min(per_epoch, total - done)):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
        if on_epoch is not None:
            on_epoch(ep)
        ep += 1


@torch.no_grad()
def _mates_effect(model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator, batch: int = 8,
                  trials: int = 10) -> float:
    """Max |output of sample 0| change when its batch-mates are swapped, in training mode."""
    model = copy.deepcopy(model).train()  # train mode updates BN running stats: keep the caller's intact
    worst = 0.0
    for _ in range(trials):
        idx = torch.randperm(len(x), generator=gen)[: 2 * batch - 1]
        a = torch.cat([idx[:1], idx[1:batch]])
        b = torch.cat([idx[:1], idx[batch:]])
        worst = max(worst, float((model(x[a])[0] - model(x[b])[0]).abs().max()))
    return worst


# --------------------------------------------------------------------------- batch-size / train-test
def job_mlp(norm: str, batch: int, seed: int, epochs: float, lr: float, data_path: Optional[str],
            mates_test: bool = False, train_test: bool = False, test_batches: List[int] = ()) -> Dict:
    """Train the MLP with ``norm`` at ``batch``; test accuracy, and optional direct / train-vs-eval checks."""
    d = get_data(data_path)
    torch.manual_seed(_seed(seed, 1))
    model = MLP(int(torch.tensor(d.shape).prod()), d.num_classes, norm)
    gen = torch.Generator().manual_seed(_seed(seed, 2))
    _train_epochs(model, d.x_train, d.y_train, batch, epochs, lr, gen)
    out: Dict = {"norm": norm, "batch": batch, "seed": seed, "test_acc": _accuracy(model, d.x_test, d.y_test)}
    if mates_test:
        out["mates_max_diff"] = _mates_effect(model, d.x_test, torch.Generator().manual_seed(_seed(seed, 3)))
    if train_test:
        out.update(_train_vs_eval(model, d, test_batches))
    return out


@torch.no_grad()
def _train_vs_eval(model: torch.nn.Module, d: ImageData, test_batches: List[int]) -> Dict:
    ev = model.eval()
    tr = copy.deepcopy(model).train()
    gap = 0.0
    for i in range(0, len(d.x_test) - 31, 32):
        xb = d.x_test[i:i + 32]
        gap = max(gap, float((tr(xb) - ev(xb)).abs().max()))
    acc_batch_stats = {}
    for tb in test_batches:
        m = copy.deepcopy(model).train()
        # every test sample, in consecutive batches of tb; a ragged last batch of one is left out
        # (BatchNorm cannot normalize a single sample with batch statistics)
        n = len(d.x_test) - (1 if len(d.x_test) % tb == 1 else 0)
        correct = 0
        for i in range(0, n, tb):
            j = min(i + tb, n)
            correct += int((m(d.x_test[i:j]).argmax(1) == d.y_test[i:j]).sum())
        acc_batch_stats[str(tb)] = correct / n
    return {"train_eval_max_diff": gap, "acc_running_stats": _accuracy(model, d.x_test, d.y_test),
            "acc_batch_stats": acc_batch_stats}


# --------------------------------------------------------------------------- cnn
def job_cnn(norm: str, seed: int, batch: int, epochs: int, lr: float, data_path: Optional[str]) -> Dict:
    d = get_data(data_path)
    torch.manual_seed(_seed(seed, 11))
    model = CNN(d.shape[0], d.num_classes, norm)
    gen = torch.Generator().manual_seed(_seed(seed, 12))
    curve: List[float] = []
    _train_epochs(model, d.x_train, d.y_train, batch, epochs, lr, gen,
                  on_epoch=lambda ep: curve.append(_accuracy(model, d.x_test, d.y_test)))
    return {"norm": norm, "seed": seed, "curve": curve, "test_acc": curve[-1]}


# --------------------------------------------------------------------------- rnn on image rows
def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, H, C*W) sequences: one image row per step."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 1, 3).reshape(n, h, c * w).contiguous()


def job_rnn(kind: str, seed: int, steps: int, batch: int, lr: float, hidden: int, evals: int, target: float,
            data_path: Optional[str]) -> Dict:
    d = get_data(data_path)
    xtr, xte = _rows(d.x_train), _rows(d.x_test)
    torch.manual_seed(_seed(seed, 21))
    model = SeqModel(kind, xtr.shape[2], hidden, d.num_classes, max_length=xtr.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(_seed(seed, 22))
    every = max(1, steps // evals)
    curve_steps, curve_acc, curve_loss = [], [], []
    running = 0.0
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        loss = F.cross_entropy(model(xtr[idx]), d.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if step % every == 0:
            curve_steps.append(step)
            curve_loss.append(running / every)
            running = 0.0
            curve_acc.append(_accuracy(model, xte, d.y_test))
    reach = next((s for s, a in zip(curve_steps, curve_acc) if a >= target), None)
    return {"kind": kind, "seed": seed, "steps": curve_steps, "acc": curve_acc, "loss": curve_loss,
            "final_acc": curve_acc[-1], "steps_to_target": reach}


# --------------------------------------------------------------------------- variable length
@torch.no_grad()
def _mse(model: SeqModel, x: torch.Tensor, lens: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(F.mse_loss(model(x, lens).squeeze(1), y))


@torch.no_grad()
def _padding_effect(model: SeqModel, gen: torch.Generator, short: int, long: int) -> float:
    """Max |output| change of one short sequence batched with short vs with long sequences (train mode)."""
    m = copy.deepcopy(model).train()
    x0, l0, _ = adding_problem(1, (short, short), gen)
    xs, ls, _ = adding_problem(7, (short, short), gen)
    xl, ll, _ = adding_problem(7, (long, long), gen)
    pad = torch.zeros(1, long - short, 2)
    a = m(torch.cat([x0, xs]), torch.cat([l0, ls]))[0]
    b = m(torch.cat([torch.cat([x0, pad], 1), xl]), torch.cat([l0, ll]))[0]
    return float((a - b).abs().max())


def job_varlen(kind: str, seed: int, steps: int, batch: int, lr: float, hidden: int, train_lengths: List[int],
               test_lengths: List[int], n_test: int) -> Dict:
    lo, hi = train_lengths
    torch.manual_seed(_seed(seed, 31))
    model = SeqModel(kind, 2, hidden, 1, max_length=hi)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(_seed(seed, 32))
    losses = []
    for step in range(steps):
        model.train()
        x, lens, y = adding_problem(batch, (lo, hi), gen)
        loss = F.mse_loss(model(x, lens).squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    mse = {}
    for L in test_lengths:
        tg = torch.Generator().manual_seed(100_000 + L)  # the same test sets for every model and seed
        x, lens, y = adding_problem(n_test, (L, L), tg)
        mse[str(L)] = _mse(model, x, lens, y)
    effect = _padding_effect(model, torch.Generator().manual_seed(_seed(seed, 33)), lo, 4 * hi)
    k = max(1, steps // 20)
    curve = [sum(losses[i:i + k]) / len(losses[i:i + k]) for i in range(0, steps, k)]
    return {"kind": kind, "seed": seed, "mse": mse, "padding_max_diff": effect, "train_curve": curve,
            "final_train_mse": sum(losses[-k:]) / k, "finite": all(math.isfinite(v) for v in mse.values())}
