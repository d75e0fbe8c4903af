"""Atomic file writes: a reader sees the old file or the new one, never a part of either.

Apart from :mod:`moeae.checkpoint` so that writers which must not import torch (the figures,
drawn in a worker process that only imports matplotlib) can use it too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "write_csv"]


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the old file's, else 0o666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new, never a part:
    a temporary file beside the target, flushed and fsynced, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _new_file_mode(path))  # mkstemp's 0600 -> what open() gives
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (a power cut, not just a killed process)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows)
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` (dicts; the columns in order of first appearance) as a CSV file,
    atomically. Floats are written as ``repr``, so they read back exactly."""
    import csv
    import io

    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
