"""Data for the lab: scikit-learn's 8x8 digits (no download), a local MNIST/CIFAR copy, the adding problem.

Images come back as float32 tensors of shape ``(N, C, H, W)`` scaled to [0, 1] and int64 labels; the
train/test split of the digits is fixed (seed 0, stratified) so every run sees the same split.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["ImageData", "load_images", "adding_problem"]

# Cap on samples taken from a user-provided dataset: the lab's budget is minutes on two cores.
MAX_TRAIN = 12000
MAX_TEST = 2000


@dataclass
class ImageData:
    """A classification set: ``x_*`` of shape (N, C, H, W) in [0, 1], ``y_*`` int64 class ids."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def standardized(self) -> "ImageData":
        """Zero mean / unit variance per pixel, with the training set's statistics."""
        mu = self.x_train.mean(0, keepdim=True)
        sd = self.x_train.std(0, keepdim=True).clamp_min(1e-3)
        return ImageData(self.name, (self.x_train - mu) / sd, self.y_train, (self.x_test - mu) / sd, self.y_test)


def _digits() -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return ImageData("digits8x8", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                     torch.from_numpy(yte))


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"--data: {path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(dirpath: str, *stems: str) -> Optional[str]:
    for name in sorted(os.listdir(dirpath)):
        low = name.lower().replace(".", "-").replace("_", "-")
        if any(low.startswith(s) for s in stems):
            return os.path.join(dirpath, name)
    return None


def _to_nchw(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2:  # flat vectors: assume square grey images
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"--data: flat images of width {x.shape[1]} are not square")
        x = x.reshape(-1, 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC (CIFAR's usual layout) -> NCHW
    elif x.ndim != 4:
        raise ValueError(f"--data: expected images of 2 to 4 dims, got shape {x.shape}")
    x = x.astype(np.float32)
    if x.max() > 1.5:
        x = x / 255.0
    return x


def _local(path: str) -> ImageData:
    if os.path.isdir(path):
        tr_x = _find(path, "train-images", "train-images-idx3")
        tr_y = _find(path, "train-labels")
        te_x = _find(path, "t10k-images", "test-images")
        te_y = _find(path, "t10k-labels", "test-labels")
        if not all((tr_x, tr_y, te_x, te_y)):
            raise ValueError(f"--data: directory {path!r} must hold IDX files train-images*, train-labels*, "
                             "t10k-images* (or test-images*), t10k-labels* (optionally .gz)")
        xtr, ytr, xte, yte = (_read_idx(p) for p in (tr_x, tr_y, te_x, te_y))  # type: ignore[arg-type]
    elif path.endswith(".npz"):
        with np.load(path) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z]
            if missing:
                raise ValueError(f"--data: {path!r} lacks arrays {missing}; expected x_train, y_train, x_test, y_test")
            xtr, ytr, xte, yte = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    else:
        raise ValueError(f"--data: expected a directory of IDX files or a .npz file, got {path!r}")
    # deterministic subsample: the first MAX_* samples (datasets ship shuffled)
    xtr, ytr = _to_nchw(xtr[:MAX_TRAIN]), np.asarray(ytr[:MAX_TRAIN]).reshape(-1).astype(np.int64)
    xte, yte = _to_nchw(xte[:MAX_TEST]), np.asarray(yte[:MAX_TEST]).reshape(-1).astype(np.int64)
    name = os.path.basename(os.path.normpath(path))
    return ImageData(name, torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte))


def load_images(path: Optional[str] = None) -> ImageData:
    """The digits (``path=None``) or a local MNIST/CIFAR copy: IDX directory or ``.npz``."""
    return _digits() if path is None else _local(path)


def adding_problem(n: int, lengths: Tuple[int, int], generator: torch.Generator
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997) with a length per sequence.

    Each step carries (value ~ U(0,1), marker); exactly two markers are 1, one in each half of the
    sequence's own length; the target is the sum of the two marked values. Predicting the mean (1.0)
    gives MSE 1/6 ~ 0.167.

    Returns ``(x, lengths, y)``: x of shape (n, T_max, 2) zero-padded, lengths (n,) int64, y (n,).
    """
    lo, hi = lengths
    if not 2 <= lo <= hi:
        raise ValueError(f"adding_problem: lengths must satisfy 2 <= lo <= hi, got {lengths}")
    lens = torch.randint(lo, hi + 1, (n,), generator=generator)
    t_max = int(lens.max())
    x = torch.zeros(n, t_max, 2)
    vals = torch.rand(n, t_max, generator=generator)
    mask = torch.arange(t_max)[None, :] < lens[:, None]
    x[..., 0] = vals * mask
    half = lens // 2
    u1 = torch.rand(n, generator=generator)
    u2 = torch.rand(n, generator=generator)
    i1 = (u1 * half).long()
    i2 = half + (u2 * (lens - half)).long()
    rows = torch.arange(n)
    x[rows, i1, 1] = 1.0
    x[rows, i2, 1] = 1.0
    y = vals[rows, i1] + vals[rows, i2]
    return x, lens, y
