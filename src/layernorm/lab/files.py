"""Files of a run directory: atomic writes under unique temporary names, the run lock, stale temporaries.

Every file of a run is written to a temporary file in the same directory and moved into place with
``os.replace``, so a reader never sees half a file. The temporary name is unique per write
(``.<name>.<pid>-<random>.tmp``), so two writers never share one. A run directory is used by one
``layernorm lab`` at a time (:class:`RunLock`); while holding the lock, temporaries left by a killed
run are stale and :func:`remove_stale_temporaries` deletes them.

Example::

    >>> with RunLock("lab-runs/demo"):                                   # doctest: +SKIP
    ...     remove_stale_temporaries("lab-runs/demo")
    ...     atomic_write("lab-runs/demo/results.json", "{}")
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import List, Union

__all__ = ["LabError", "atomic_write", "temporary_path", "publish", "RunLock", "remove_stale_temporaries",
           "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"
# Ours (".name.<pid>-<random>.tmp") and those of earlier versions of the lab ("x.tmp123", "x.png.tmp.png").
_STALE = re.compile(r"^\..+\.\d+-[^.]+\.tmp$|\.tmp\d+$|\.tmp\.png$")


class LabError(ValueError):
    """A problem the user can fix (bad option, busy or unwritable directory); the CLI prints one line."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str, path: str) -> None:
    """Move the finished temporary ``tmp`` to ``path`` with the permissions an ordinary new file gets.

    ``mkstemp`` creates its files readable by the owner only; a report must be readable like any file.
    """
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write(path: str, data: Union[str, bytes]) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a unique temporary file and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}-", suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        publish(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def temporary_path(path: str) -> str:
    """A fresh, unique temporary file beside ``path``, for writers that need a name (give them the format)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}-", suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    return tmp


def remove_stale_temporaries(run_dir: str) -> List[str]:
    """Delete the temporary files a killed run left in ``run_dir`` (call it only while holding the run lock)."""
    removed = []
    for root, _dirs, files in os.walk(run_dir):
        for name in files:
            if _STALE.search(name):
                p = os.path.join(root, name)
                try:
                    os.unlink(p)
                    removed.append(p)
                except OSError:
                    pass
    return sorted(removed)


class RunLock:
    """An exclusive, non-blocking lock on a run directory (``<run_dir>/.lock``), released when the process ends.

    Raises:
        LabError: another process holds the lock; the message names its pid.
    """

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, ".lock")
        self.fd = -1

    def __enter__(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise LabError(f"run directory {os.path.dirname(self.path)!r} is in use by another `layernorm lab` "
                           f"(pid {holder}); wait for it to finish, or pass --run NAME for a separate run") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1
