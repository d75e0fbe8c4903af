"""Reading and checking user data: ``.npy`` and ``.csv`` files, and arrays from Python.

Every failure is a :class:`DataError` (a ``ValueError``) whose message names the file and the
fault: missing, empty, not numeric, ragged, NaN, inf, beyond float32, complex, object (pickled),
wrong shape; and, for training (:func:`check_trainable`), values too large for float32
arithmetic and points that leave nothing to learn.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

__all__ = ["DataError", "load_array", "open_npy", "check_data", "check_trainable",
           "save_array", "ArrayWriter", "CSV_MAX_BYTES", "SCAN_ROWS"]

CSV_MAX_BYTES = 200 * 2**20  # larger CSV files are refused: convert them to .npy
SCAN_ROWS = 1 << 16  # rows per chunk when a memory-mapped file is checked or streamed
FLOAT32_MAX = float(np.finfo(np.float32).max)
_CHUNK = 4096  # rows read at a time by the training checks (a memory map stays on disk)


class DataError(ValueError):
    """Input data that cannot be used, with a message naming where and why."""


def check_data(X, where: str = "input", *, n_features: int | None = None,
               min_samples: int = 1) -> np.ndarray:
    """Validate a 2-D real, finite array; return it as float64.

    ``where`` names the source in messages (a file name, or "X").
    """
    X = _check_layout(np.asarray(X), where, n_features, min_samples)
    X = X.astype(np.float64)
    _check_values(X, where)
    return X


def _check_layout(X: np.ndarray, where: str, n_features: int | None,
                  min_samples: int) -> np.ndarray:
    """dtype, rank, size and width of X, without reading its values."""
    if X.dtype == object:
        raise DataError(f"{where}: object array (pickled Python objects) is not numeric data")
    if np.iscomplexobj(X):
        raise DataError(f"{where}: complex values are not supported (dtype {X.dtype})")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise DataError(f"{where}: not numeric (dtype {X.dtype})")
    if X.ndim == 1:
        raise DataError(f"{where}: expected a 2-D array (samples x features), got 1-D shape "
                        f"{X.shape}; reshape with X.reshape(-1, 1) for one feature")
    if X.ndim != 2:
        raise DataError(f"{where}: expected a 2-D array (samples x features), got shape "
                        f"{X.shape}")
    if X.shape[0] < min_samples or X.shape[1] == 0:
        raise DataError(f"{where}: empty data, shape {X.shape} (need >= {min_samples} "
                        "samples and >= 1 feature)")
    if n_features is not None and X.shape[1] != n_features:
        raise DataError(f"{where}: has {X.shape[1]} features (columns) but the model expects "
                        f"{n_features}")
    return X


def _check_values(X: np.ndarray, where: str, row0: int | None = None,
                  whole=None) -> None:
    """NaN or inf anywhere in X is an error naming the first, and so is a value beyond
    float32; ``row0``: X is the part of the data starting at that row (a chunk of ``whole``,
    a file being scanned)."""
    if not np.issubdtype(X.dtype, np.inexact):
        return
    bad = ~np.isfinite(X)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        kind = "NaN" if np.isnan(X[i, j]) else "inf"
        if row0 is None:
            raise DataError(f"{where}: {kind} at row {i}, column {j} ({int(bad.sum())} "
                            "non-finite values in all)")
        raise DataError(f"{where}: {kind} at row {row0 + i}, column {j}")
    # the model computes in float32: a larger value would become inf there, deep inside
    big = np.abs(X) > FLOAT32_MAX
    if big.any():
        i, j = np.argwhere(big)[0]
        at = f"row {i if row0 is None else row0 + i}, column {j}"
        largest = np.abs(X).max() if whole is None else _largest(whole)
        raise DataError(f"{where}: value {X[i, j]:.3g} at {at} overflows float32 (largest "
                        f"magnitude {largest:.3g}; float32 holds up to {FLOAT32_MAX:.2g})")


def open_npy(path, *, n_features: int | None = None, min_samples: int = 1,
             scan: bool = True) -> np.ndarray:
    """A ``.npy`` file opened memory-mapped and read-only, for data larger than memory.

    Nothing is loaded: rows are read when used. With ``scan`` every value is checked once, in
    chunks of :data:`SCAN_ROWS` rows whose pages are released after each (so a file of any
    size is checked in bounded memory); the first NaN or inf is an error naming its row.
    """
    from .working_set import release_pages

    path = Path(path)
    _check_npy_file(path)
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "object" in str(exc):
            raise DataError(f"{path}: object array (pickled Python objects) refused; save "
                            "plain numbers with np.save") from None
        raise DataError(f"{path}: not a valid .npy file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a valid .npy file ({exc})") from None
    X = _check_layout(X, str(path), n_features, min_samples)
    if scan:
        for i in range(0, len(X), SCAN_ROWS):
            _check_values(np.asarray(X[i:i + SCAN_ROWS]), str(path), i, whole=X)
            release_pages(X)
    return X


def _check_npy_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .npy or .csv file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    with path.open("rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":  # np.load would try a pickle or open a .npz
        raise DataError(f"{path}: not a .npy file (no NumPy header); pickles and other "
                        "formats are refused")


def _largest(X) -> float:
    """The largest magnitude in ``X``, read in chunks whose pages a memory map releases after
    each (so a file of any size is read in bounded memory)."""
    from .working_set import release_pages

    largest = 0.0
    for i in range(0, len(X), SCAN_ROWS):
        largest = max(largest, float(np.abs(np.asarray(X[i:i + SCAN_ROWS])).max()))
        release_pages(X)
    return largest


def _first_beyond(X, limit: float) -> tuple[int, int]:
    """(row, column) of the first value of ``X`` whose magnitude exceeds ``limit``."""
    for i in range(0, len(X), _CHUNK):
        hit = np.argwhere(np.abs(np.asarray(X[i:i + _CHUNK])) > limit)
        if len(hit):
            return i + int(hit[0][0]), int(hit[0][1])
    raise ValueError(f"no value beyond {limit}")


def _distinct_rows(X, limit: int, dtype, chunk: int = _CHUNK) -> int:
    """The number of distinct rows of ``X`` as ``dtype``, counted up to ``limit``.

    Reads ``X`` in chunks and stops as soon as ``limit`` distinct rows are seen, so a large or
    memory-mapped array usually costs one chunk, not a pass."""
    seen: set[bytes] = set()
    for i in range(0, len(X), chunk):
        block = np.asarray(X[i:i + chunk], dtype=dtype) + dtype(0)  # -0.0 -> 0.0
        for row in np.unique(block, axis=0):
            seen.add(row.tobytes())
            if len(seen) >= limit:
                return len(seen)
    return len(seen)


def check_trainable(X, where: str = "input", *, n_charts: int = 1) -> None:
    """Refuse training data the model cannot learn from, with one line that says why.

    The model trains in float32, so points are compared as float32, and values must leave
    room for the squared distances of the loss and the input scaling.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Finite data, as :func:`check_data` returns it.
    where : str, default="input"
        The source, named in messages (a file name, or "X").
    n_charts : int, default=1
        Charts (experts) to fit: each needs a point of its own.

    Raises
    ------
    DataError
        When a value is so large that its squared distances overflow float32, when every
        point is the same, when the points differ only below float32 precision (zero variance
        as the model sees them), or when there are fewer distinct points than charts.
    """
    n, d = np.shape(X)
    # ((x - mean) ** 2).sum(-1) of a value up to `lim` stays below float32's maximum
    lim = 0.5 * np.sqrt(FLOAT32_MAX / d)
    absmax = _largest(X)
    if absmax > lim:
        i, j = _first_beyond(X, lim)
        raise DataError(f"{where}: value {X[i][j]:.3g} at row {i}, column {j} is too large to "
                        f"train on in float32: squared distances overflow above {lim:.2g} "
                        f"(largest magnitude {absmax:.3g}); rescale the data")
    limit = max(n_charts, 2)
    distinct = _distinct_rows(X, limit, np.float32)
    if distinct >= limit:
        return
    exact = _distinct_rows(X, limit, np.float64)
    if exact == 1:
        raise DataError(f"{where}: all {n} points are identical; an atlas needs points that "
                        "differ")
    if distinct == 1:
        X = np.asarray(X, dtype=np.float64)
        spread = float((X.max(axis=0) - X.min(axis=0)).max())
        raise DataError(f"{where}: zero variance in float32: the {n} points differ by at most "
                        f"{spread:.3g}, below float32 precision at magnitude {absmax:.3g}")
    in32 = " in float32" if exact > distinct else ""
    raise DataError(f"{where}: fewer distinct points{in32} ({distinct}) than charts "
                    f"({n_charts}); use at most {distinct} experts")


def _read_csv(path: Path) -> np.ndarray:
    with path.open(newline="") as f:
        text = f.read()
    # (line number in the file, cells): blank lines are skipped but still counted
    rows = [(i, r) for i, line in enumerate(text.splitlines(), start=1)
            for r in csv.reader([line]) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: empty file (no data rows)")
    # the first row is a header only when none of its cells is a number: a data row with a
    # bad value ("1.0,abc") is reported, not silently dropped as a header
    start = 1 if not any(_is_float(c) for c in rows[0][1]) else 0
    if start == len(rows):
        raise DataError(f"{path}: has a header but no data rows")
    width = len(rows[start][1])
    values = []
    for lineno, row in rows[start:]:
        if len(row) != width:
            raise DataError(f"{path}: ragged rows: line {lineno} has {len(row)} values, "
                            f"expected {width}")
        bad = next((c for c in row if not _is_float(c)), None)
        if bad is not None:
            raise DataError(f"{path}: line {lineno}: non-numeric value {bad.strip()!r}")
        values.append([float(c) for c in row])
    return np.array(values, dtype=np.float64)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_array(path, *, n_features: int | None = None, min_samples: int = 1,
               mmap: bool = False) -> np.ndarray:
    """Load a 2-D numeric array from ``.npy`` (no pickles) or ``.csv`` (header optional).

    With ``mmap`` a ``.npy`` file is opened memory-mapped (:func:`open_npy`) instead of read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .npy or .csv file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if mmap:
            return open_npy(path, n_features=n_features, min_samples=min_samples)
        _check_npy_file(path)
        try:
            X = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise DataError(f"{path}: object array (pickled Python objects) refused; save "
                                "plain numbers with np.save") from None
            raise DataError(f"{path}: not a valid .npy file ({exc})") from None
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a valid .npy file ({exc})") from None
    elif suffix in (".csv", ".txt"):
        size = path.stat().st_size
        if size > CSV_MAX_BYTES:
            raise DataError(f"{path}: {size / 2**20:.0f} MiB of CSV is too large to parse; "
                            "convert it once to .npy (numpy.save), which is memory-mapped and "
                            "never loaded whole")
        try:
            X = _read_csv(path)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a text CSV file") from None
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .npy or .csv")
    return check_data(X, str(path), n_features=n_features, min_samples=min_samples)


def save_array(path, X: np.ndarray, header: list[str] | None = None) -> None:
    """Write ``.npy`` or ``.csv`` (by suffix) atomically."""
    import io

    from .checkpoint import atomic_write_bytes

    path = Path(path)
    suffix = path.suffix.lower()
    buf = io.BytesIO()
    if suffix == ".npy":
        np.save(buf, np.asarray(X))
    elif suffix in (".csv", ".txt"):
        np.savetxt(buf, np.asarray(X), delimiter=",", fmt="%.9g",
                   header=",".join(header) if header else "", comments="")
    else:
        raise DataError(f"{path}: unsupported output type {suffix!r}; use .npy or .csv")
    atomic_write_bytes(path, buf.getvalue())


class ArrayWriter:
    """Write an array of known shape (n, w) in chunks to ``.npy`` or ``.csv``, atomically.

    Rows go to a temporary file beside the target, which replaces the target only once all
    ``n`` rows are written; on an error the target is left as it was. Use as a context manager
    and call :meth:`write` with consecutive chunks of rows.
    """

    def __init__(self, path, shape: tuple[int, int], header: list[str] | None = None):
        self.path, self.shape, self.header = Path(path), tuple(shape), header
        self.suffix = self.path.suffix.lower()
        if self.suffix not in (".npy", ".csv", ".txt"):
            raise DataError(f"{self.path}: unsupported output type {self.suffix!r}; use .npy "
                            "or .csv")
        self.rows = 0

    def __enter__(self) -> ArrayWriter:
        import os
        import tempfile

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                        dir=self.path.parent)
        self.f = os.fdopen(fd, "wb")
        if self.suffix == ".npy":
            np.lib.format.write_array_header_1_0(
                self.f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float64)),
                         "fortran_order": False, "shape": self.shape})
        elif self.header:
            self.f.write((",".join(self.header) + "\n").encode())
        return self

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (m, w) after those written so far."""
        rows = np.asarray(rows, dtype=np.float64)
        room = self.shape[0] - self.rows
        if rows.ndim != 2 or rows.shape[1] != self.shape[1] or len(rows) > room:
            raise ValueError(f"rows of shape {rows.shape} do not fit the remaining "
                             f"{room} rows of width {self.shape[1]}")
        if self.suffix == ".npy":
            self.f.write(np.ascontiguousarray(rows).tobytes())
        else:
            np.savetxt(self.f, rows, delimiter=",", fmt="%.9g")
        self.rows += len(rows)

    def __exit__(self, exc_type, exc, tb) -> None:
        import os

        from .checkpoint import _new_file_mode

        try:
            if exc_type is None and self.rows != self.shape[0]:
                raise ValueError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
            if exc_type is None:
                os.fchmod(self.f.fileno(), _new_file_mode(self.path))
                self.f.flush()
                os.fsync(self.f.fileno())
        except BaseException:
            self.f.close()
            Path(self.tmp).unlink(missing_ok=True)
            raise
        self.f.close()
        if exc_type is not None:
            Path(self.tmp).unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)
