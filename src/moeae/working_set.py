"""What an epoch trains on: all of the data, or a fresh random working set of it.

An epoch is one pass over a *working set* of at most ``TrainConfig.working_set`` points. Data no
larger than that is its own working set, reshuffled every epoch (the seed study, a curve of 1000
points, a surface of 2000). Larger data gives every epoch a new random sample of that size, drawn
without replacement from the model's own shuffling stream. So the training budget,
``epochs x ceil(working_set / batch_size)`` optimizer steps, and every pass over the data
(relabelling, neighbours, the starting atlas) are bounded whatever the number of points, and a
memory-mapped file of 10^7 points trains in the memory that 2000 points need.

:class:`TrainingData` holds the data of a population: a tensor ``(M, n, d)`` with one data set
per model (the seed study's curves), or one array ``(n, d)`` shared by every model (the
estimator's starts, a sweep's seeds): an ``np.ndarray`` or an ``np.memmap``, whose rows are read
only when a working set needs them, with ``os.pread`` (:func:`read_rows`). Pages of a memory map
that were read through it count in a process's resident memory until they are unmapped; pages
read by a system call stay in the page cache, which is not the process's memory. Chunked scans
through a map release its pages after each chunk (:func:`release_pages`).
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

__all__ = ["TrainingData", "STATS_MAX", "draw_indices", "read_rows", "release_pages"]

STATS_MAX = 1 << 16  # input scaling from all points up to this many, else from a sample
READ_BLOCK = 64  # rows read through a memory map between two releases of its pages


def release_pages(X) -> None:
    """Drop the pages of a memory-mapped array from this process's resident memory."""
    mm = getattr(X, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _file_rows(X) -> tuple[str, int] | None:
    """(file, byte offset of row 0) of a C-contiguous ``np.memmap``, views included; None for
    anything else. The offset comes from where X's data lies in its mapping, since a view
    keeps the ``offset`` attribute of the array it was cut from."""
    mm, name = getattr(X, "_mmap", None), getattr(X, "filename", None)
    if not isinstance(mm, mmap.mmap) or name is None or not X.flags.c_contiguous:
        return None
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data  # where the mapping starts
    start = X.offset - X.offset % mmap.ALLOCATIONGRANULARITY  # its offset in the file
    return name, start + X.ctypes.data - base


def _np(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def read_rows(X, idx: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows ``idx`` of X (n, d) as ``dtype`` (len(idx), d).

    Rows of a memory-mapped file are read with ``os.pread``, not through the mapping: a read
    fault maps a whole folio of the page cache around the row (here about 1 MB: 300 random
    rows of a 400 MB map made 293 MB resident), and pages read by a system call never count
    in the process's memory. Other memory maps are read :data:`READ_BLOCK` rows at a time with
    their pages released after each block."""
    import os

    out = np.empty((len(idx), X.shape[1]), dtype=dtype)
    where = _file_rows(X)
    if where is None:
        for i in range(0, len(idx), READ_BLOCK):
            out[i:i + READ_BLOCK] = X[idx[i:i + READ_BLOCK]]
            release_pages(X)
        return out
    name, offset = where
    size = X.shape[1] * X.dtype.itemsize
    rows = np.empty((len(idx), X.shape[1]), dtype=X.dtype)
    buf = rows.data.cast("B")  # the rows' bytes
    fd = os.open(name, os.O_RDONLY)
    try:
        for j, i in enumerate(idx.tolist()):
            if os.preadv(fd, [buf[j * size:(j + 1) * size]], offset + i * size) != size:
                raise OSError(f"{name}: file ended before row {i}")
    finally:
        os.close(fd)
    out[:] = rows
    return out


def draw_indices(n: int, size: int, generator: torch.Generator) -> np.ndarray:
    """``size`` distinct indices of ``range(n)``, sorted (a memory map reads them in order).

    One 63-bit draw from ``generator`` seeds numpy's sampler, which needs O(size) work for a
    small sample of a large range where ``torch.randperm(n)`` would need O(n) every epoch."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


class TrainingData:
    """The training data of a population of ``n_models`` models, read by index.

    Parameters
    ----------
    X : torch.Tensor (M, n, d), one data set per model, or array-like (n, d) shared by all
    n_models : int
    device : torch.device, where batches go
    dtype : torch.dtype of the rows handed out (the model's; float32 by default)
    """

    def __init__(self, X, n_models: int, device=None, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.n_models = n_models
        if isinstance(X, torch.Tensor):
            if X.dim() != 3 or X.shape[0] not in (1, n_models):
                raise ValueError(f"per-model data must be (1 or {n_models}, n, d), got "
                                 f"{tuple(X.shape)}")
            self.tensor: torch.Tensor | None = X.expand(n_models, -1, -1)
            self.array = None
            _, self.n, self.d = self.tensor.shape
        else:
            self.tensor = None
            self.array = X if isinstance(X, np.ndarray) else np.asarray(X)
            if self.array.ndim != 2:
                raise ValueError(f"shared data must be (n, d), got shape {self.array.shape}")
            self.n, self.d = self.array.shape
        self._full: torch.Tensor | None = None

    def full(self) -> torch.Tensor:
        """All points of every model, (M, n, d) on the device (kept once made)."""
        if self._full is None:
            if self.tensor is not None:
                self._full = self.tensor.to(self.device, self.dtype)
            else:
                rows = torch.from_numpy(np.array(self.array, dtype=_np(self.dtype)))  # a copy
                release_pages(self.array)
                self._full = rows[None].expand(self.n_models, -1, -1).to(self.device)
        return self._full

    def gather(self, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` (M, w) of each model's data: (M, w, d) on the device."""
        if self._full is not None or self.tensor is not None:
            X = self.full()
            i = torch.as_tensor(idx, device=self.device)
            return X.gather(1, i[..., None].expand(-1, -1, self.d))  # (M, w, d)
        if (idx == idx[:1]).all():  # the same rows for every model (the anchor): read once
            one = torch.from_numpy(read_rows(self.array, idx[0], _np(self.dtype)))
            return one[None].expand(len(idx), -1, -1).to(self.device)  # (M, w, d)
        rows = np.stack([read_rows(self.array, i, _np(self.dtype)) for i in idx])  # (M, w, d)
        return torch.from_numpy(rows).to(self.device)

    def stats_rows(self) -> torch.Tensor:
        """The points input scaling is computed from: (M, s, d), all of them up to
        :data:`STATS_MAX`, else a fixed sample of that many (the same for every model)."""
        if self.n <= STATS_MAX:
            return self.full()
        return self.gather(self.anchor(STATS_MAX, seed=1))

    def anchor(self, size: int, seed: int = 0) -> np.ndarray:
        """A fixed sample of ``size`` points, the same for every model, (M, size): where the
        starting atlas is built and the warm start trains. It depends on the data alone (a
        fixed seed), so models on the same data share its neighbour graph and geodesic
        embedding (the atlas's slowest part: 2.4 s per start of a 10^5-point curve), and a
        model trains the same in any population."""
        idx = np.sort(np.random.default_rng(seed).choice(self.n, size, replace=False))
        return np.tile(idx, (self.n_models, 1))
