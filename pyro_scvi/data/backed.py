"""Count matrices that stay on disk: AnnData opened with ``anndata.read_h5ad(path, backed="r")``.

A backed AnnData keeps ``X`` in its HDF5 file: a CSR (or CSC) group with ``data``, ``indices`` and
``indptr`` datasets, or a dense 2-D dataset. Nothing here ever reads the whole matrix at once:

* :func:`scan` passes over the stored values in chunks of about ``SCAN_ELEMENTS`` values and returns
  the per-cell totals and what setup's count checks need (NaN, infinite, negative or non-integer
  values). The totals of a file opened read-only are remembered (keyed by file, dataset, size and
  modification time), so that setup, the model and the library-size prior scan the file once.
* :class:`BackedCounts` reads rows: a contiguous slice with one read per dataset, or any list of
  cells by reading the cells sorted (HDF5 selections must increase), merging nearby cells into one
  slice, and putting the rows back in the requested order.
* :func:`block_shuffled` cuts an epoch of training minibatches from contiguous reads (see there for
  how this approximates a uniform shuffle).

Only CSR (or dense) files are read efficiently row by row; a CSC file works but every minibatch
reads whole columns, so write such files as CSR.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "BLOCK_BATCHES",
    "WINDOW_BLOCKS",
    "BackedCounts",
    "ScanResult",
    "block_shuffled",
    "check_values",
    "is_backed",
    "is_numeric",
    "raw_count_statistics",
    "row_totals",
    "scan",
]

#: stored values read at once by :func:`scan` (float32: 16 MiB)
SCAN_ELEMENTS = 2**22
#: a block of the block shuffle holds ``BLOCK_BATCHES * batch_size`` training cells
BLOCK_BATCHES = 16
#: blocks read (from random places of the file) and shuffled together
WINDOW_BLOCKS = 4
#: cells at most this many rows apart are read with one slice (the rows between are discarded)
MAX_GAP = 16

try:  # anndata >= 0.10
    from anndata.abc import CSCDataset as _CSCDataset
    from anndata.abc import CSRDataset as _CSRDataset
except ImportError:  # pragma: no cover - older anndata
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset as _CSRDataset  # type: ignore

    _CSCDataset = _CSRDataset  # type: ignore

try:
    import h5py
except ImportError:  # pragma: no cover - h5py comes with anndata
    h5py = None


def is_backed(matrix) -> bool:
    """Whether ``matrix`` lives on disk (a backed sparse dataset of anndata or an HDF5 dataset)."""
    if isinstance(matrix, (_CSRDataset, _CSCDataset)):
        return True
    return h5py is not None and isinstance(matrix, h5py.Dataset)


def _sparse_format(matrix) -> str | None:
    """``"csr"``/``"csc"`` for a backed sparse dataset, ``None`` for a dense dataset."""
    if isinstance(matrix, (_CSRDataset, _CSCDataset)):
        return getattr(matrix, "format", "csr")
    return None


# --------------------------------------------------------------------------------------------
# Scanning: per-cell totals and the values setup checks
# --------------------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """What one pass over a count matrix found.

    Attributes
    ----------
    totals
        Total counts of every cell, float64 ``(n_obs,)``.
    dtype
        The stored dtype.
    n_nan, n_inf
        Number of NaN and of infinite stored values.
    minimum
        Smallest finite stored value (``inf`` when there is none).
    non_integer
        Whether some finite stored value is not an integer.
    """

    totals: np.ndarray
    dtype: np.dtype
    n_nan: int = 0
    n_inf: int = 0
    minimum: float = np.inf
    non_integer: bool = False


_SCAN_CACHE: "OrderedDict[tuple, ScanResult]" = OrderedDict()
_SCAN_CACHE_SIZE = 4


def _cache_key(matrix) -> tuple | None:
    """Identity of a matrix in a file opened read-only (``None``: do not cache)."""
    node = matrix.group if isinstance(matrix, (_CSRDataset, _CSCDataset)) else matrix
    try:
        file = node.file
        if file.mode != "r":
            return None
        path = os.path.realpath(file.filename)
        stat = os.stat(path)
    except (AttributeError, OSError, ValueError):
        return None
    return (path, node.name, stat.st_mtime_ns, stat.st_size, tuple(matrix.shape))


def is_numeric(dtype) -> bool:
    """Whether ``dtype`` can hold counts (a number or a boolean)."""
    return np.issubdtype(dtype, np.number) or np.dtype(dtype) == np.bool_


def check_values(block: np.ndarray, result: ScanResult) -> None:
    """Add what ``block`` (stored values) holds to ``result``: NaN and infinite values, the smallest
    finite value and whether some value is not an integer. Non-numeric blocks are skipped."""
    if block.size == 0 or not is_numeric(block.dtype):
        return
    if np.issubdtype(block.dtype, np.inexact):
        finite = np.isfinite(block)
        if not finite.all():
            result.n_nan += int(np.isnan(block).sum())
            result.n_inf += int(np.isinf(block).sum())
            block = block[finite]
            if block.size == 0:
                return
        result.non_integer = result.non_integer or bool(np.any(block != np.floor(block)))
    result.minimum = min(result.minimum, float(block.min()))


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums of ``values[offsets[i]:offsets[i+1]]``, accumulated in float64 (empty segments give 0)."""
    sums = np.zeros(max(len(offsets) - 1, 0))
    starts = offsets[:-1]
    nonempty = offsets[1:] > starts
    if nonempty.any():  # each non-empty segment ends where the next non-empty one starts (or at the end)
        sums[nonempty] = np.add.reduceat(values, starts[nonempty], dtype=np.float64)
    return sums


def _scan_csr(matrix, result: ScanResult) -> None:
    data = matrix.group["data"]
    indptr = np.asarray(matrix.group["indptr"][:], dtype=np.int64)
    n_rows = matrix.shape[0]
    start = 0
    while start < n_rows:
        # as many rows as fit in SCAN_ELEMENTS stored values (at least one row)
        stop = int(np.searchsorted(indptr, indptr[start] + SCAN_ELEMENTS, side="right")) - 1
        stop = min(max(stop, start + 1), n_rows)
        lo, hi = int(indptr[start]), int(indptr[stop])
        values = np.asarray(data[lo:hi]) if hi > lo else np.zeros(0, dtype=data.dtype)
        check_values(values, result)
        result.totals[start:stop] = _segment_sums(values, indptr[start : stop + 1] - lo)
        start = stop


def _scan_csc(matrix, result: ScanResult) -> None:
    data, indices = matrix.group["data"], matrix.group["indices"]
    nnz = data.shape[0]
    for lo in range(0, nnz, SCAN_ELEMENTS):
        hi = min(lo + SCAN_ELEMENTS, nnz)
        values = np.asarray(data[lo:hi])
        check_values(values, result)
        rows = np.asarray(indices[lo:hi])
        result.totals += np.bincount(rows, weights=values.astype(np.float64), minlength=len(result.totals))


def _scan_dense(matrix, result: ScanResult) -> None:
    n_rows, n_cols = matrix.shape
    step = max(1, SCAN_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        block = np.asarray(matrix[start : start + step])
        check_values(block, result)
        result.totals[start : start + len(block)] = block.sum(axis=1, dtype=np.float64)


def scan(matrix) -> ScanResult:
    """One chunked pass over a backed count matrix (remembered for files opened read-only)."""
    key = _cache_key(matrix)
    if key is not None and key in _SCAN_CACHE:
        _SCAN_CACHE.move_to_end(key)
        return _SCAN_CACHE[key]
    result = ScanResult(totals=np.zeros(matrix.shape[0]), dtype=np.dtype(matrix.dtype))
    sparse_format = _sparse_format(matrix)
    if sparse_format == "csr":
        _scan_csr(matrix, result)
    elif sparse_format == "csc":
        _scan_csc(matrix, result)
    else:
        _scan_dense(matrix, result)
    if key is not None:
        _SCAN_CACHE[key] = result
        while len(_SCAN_CACHE) > _SCAN_CACHE_SIZE:
            _SCAN_CACHE.popitem(last=False)
    return result


def row_totals(matrix) -> np.ndarray:
    """Total counts of every cell of a backed matrix, float64 ``(n_obs,)``."""
    return scan(matrix).totals


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


class BackedCounts:
    """Row reads from a backed count matrix.

    Reads give a SciPy CSR matrix (sparse files) or a NumPy array (dense files) holding only the
    requested rows. ``n_reads`` and ``max_rows_read`` count the slices read (for tests and tuning).
    """

    def __init__(self, matrix) -> None:
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = np.dtype(matrix.dtype)
        self.format = _sparse_format(matrix)
        if self.format == "csr":
            group = matrix.group
            self._data, self._indices = group["data"], group["indices"]
            self._indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.n_reads = 0
        self.max_rows_read = 0

    def read_slice(self, start: int, stop: int):
        """Rows ``start:stop`` with one contiguous read (per stored array)."""
        self.n_reads += 1
        self.max_rows_read = max(self.max_rows_read, stop - start)
        n_vars = self.shape[1]
        if self.format == "csr":
            lo, hi = int(self._indptr[start]), int(self._indptr[stop])
            if hi > lo:
                data, indices = np.asarray(self._data[lo:hi]), np.asarray(self._indices[lo:hi])
            else:
                data, indices = np.zeros(0, dtype=self.dtype), np.zeros(0, dtype=np.int32)
            indptr = self._indptr[start : stop + 1] - lo
            return sp.csr_matrix((data, indices, indptr), shape=(stop - start, n_vars))
        if self.format == "csc":  # whole columns are read: correct but slow
            return sp.csr_matrix(self.matrix[start:stop])
        return np.asarray(self.matrix[start:stop])

    def read_rows(self, indices) -> "sp.csr_matrix | np.ndarray":
        """Rows of ``indices`` in that order (repeats allowed), read in increasing order."""
        indices = np.asarray(indices, dtype=np.int64).ravel()
        if indices.size == 0:
            empty = np.zeros((0, self.shape[1]), dtype=self.dtype)
            return sp.csr_matrix(empty) if self.format else empty
        unique = np.unique(indices)
        if unique[0] < 0 or unique[-1] >= self.shape[0]:
            raise IndexError(f"Cell indices must be in [0, {self.shape[0]}).")
        if len(unique) == unique[-1] - unique[0] + 1:  # one contiguous run
            rows = self.read_slice(int(unique[0]), int(unique[-1]) + 1)
        else:
            breaks = np.flatnonzero(np.diff(unique) > MAX_GAP) + 1
            pieces = []
            for run in np.split(unique, breaks):
                first, last = int(run[0]), int(run[-1])
                block = self.read_slice(first, last + 1)
                pieces.append(block if len(run) == last - first + 1 else block[run - first])
            rows = sp.vstack(pieces, format="csr") if self.format else np.concatenate(pieces)
        if len(unique) == len(indices) and np.array_equal(unique, indices):
            return rows
        return rows[np.searchsorted(unique, indices)]


def _stack(pieces: list):
    if len(pieces) == 1:
        return pieces[0]
    if sp.issparse(pieces[0]):
        return sp.vstack(pieces, format="csr")
    return np.concatenate(pieces)


def block_shuffled(
    reader: BackedCounts,
    indices: np.ndarray,
    batch_size: int,
    drop_last: bool = False,
    block_cells: int | None = None,
    window_blocks: int | None = None,
) -> Iterator[tuple[np.ndarray, "sp.csr_matrix | np.ndarray"]]:
    """One epoch of ``(cell indices, rows)`` minibatches over ``indices``, shuffled by blocks.

    A uniform shuffle would read every minibatch from ``batch_size`` random places of the file,
    which is slow for HDF5. Instead the cells of ``indices``, sorted by row, are cut into blocks of
    ``block_cells`` consecutive cells (``BLOCK_BATCHES · batch_size`` by default), each read with one
    contiguous slice. The blocks are visited in a random order; ``window_blocks`` of them
    (``WINDOW_BLOCKS``) are read together with the cells left over from the previous window, their
    cells shuffled, and cut into full minibatches; the cells that do not fill one more minibatch
    carry over to the next window. So every cell is visited exactly once per epoch, every minibatch
    but the last holds ``batch_size`` cells (the last ``len(indices) % batch_size``, dropped with
    ``drop_last``) as with an in-memory shuffle, but a minibatch draws its cells from at most
    ``window_blocks`` (+ the carried-over cells) regions of the file rather than from all of it:
    if the file is sorted (e.g. by sample), minibatches are less mixed than with a uniform shuffle.
    The randomness comes from torch's global RNG. The next window is read in a background thread
    while the current one trains.
    """
    cells = np.sort(np.asarray(indices, dtype=np.int64))
    block_cells = max(1, int(block_cells or BLOCK_BATCHES * batch_size))
    window_blocks = max(1, int(window_blocks or WINDOW_BLOCKS))
    blocks = [cells[i : i + block_cells] for i in range(0, len(cells), block_cells)]
    order = torch.randperm(len(blocks)).numpy() if blocks else np.zeros(0, dtype=np.int64)
    windows = [[blocks[b] for b in order[i : i + window_blocks]] for i in range(0, len(order), window_blocks)]

    def read(window):
        return [(block, reader.read_rows(block)) for block in window]

    carry_cells = np.zeros(0, dtype=np.int64)
    carry_rows = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, windows[0]) if windows else None
        for w in range(len(windows)):
            window = pending.result()
            pending = pool.submit(read, windows[w + 1]) if w + 1 < len(windows) else None
            window_cells = np.concatenate([carry_cells] + [c for c, _ in window])
            window_rows = _stack(([] if carry_rows is None else [carry_rows]) + [r for _, r in window])
            perm = torch.randperm(len(window_cells)).numpy()
            last = w + 1 == len(windows)
            n_full = len(perm) // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                pick = perm[start : start + batch_size]
                yield window_cells[pick], window_rows[pick]
            rest = perm[n_full:]
            if last:
                if len(rest) and not drop_last:
                    yield window_cells[rest], window_rows[rest]
            else:
                carry_cells, carry_rows = window_cells[rest], window_rows[rest]


def raw_count_statistics(matrix, mask1: np.ndarray, mask2: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`pyro_scvi.differential.raw_count_statistics` of a backed matrix, streamed.

    Only the cells of the two groups are read, ``SCAN_ELEMENTS // n_vars`` cells at a time.
    """
    reader = BackedCounts(matrix)
    n_vars = reader.shape[1]
    mask1, mask2 = np.asarray(mask1, dtype=bool), np.asarray(mask2, dtype=bool)
    sizes = (max(int(mask1.sum()), 1), max(int(mask2.sum()), 1))
    sums = {name: np.zeros(n_vars) for name in ("mean1", "mean2", "nz1", "nz2", "norm1", "norm2")}
    cells = np.flatnonzero(mask1 | mask2)
    step = max(1, SCAN_ELEMENTS // max(1, n_vars))
    for start in range(0, len(cells), step):
        chunk = cells[start : start + step]
        rows = reader.read_rows(chunk)
        if sp.issparse(rows):
            rows = sp.csr_matrix(rows, dtype=np.float64)
            nonzero = rows.copy()
            nonzero.data = (nonzero.data != 0).astype(np.float64)
        else:
            rows = np.asarray(rows, dtype=np.float64)
            nonzero = (rows != 0).astype(np.float64)
        totals = np.asarray(rows.sum(axis=1)).ravel()
        scaling = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        for group, (mask, size) in enumerate(((mask1, sizes[0]), (mask2, sizes[1])), start=1):
            weights = mask[chunk].astype(np.float64) / size
            sums[f"mean{group}"] += np.asarray(rows.T @ weights).ravel()
            sums[f"nz{group}"] += np.asarray(nonzero.T @ weights).ravel()
            sums[f"norm{group}"] += np.asarray(rows.T @ (weights * scaling)).ravel()
    return {
        "raw_mean1": sums["mean1"], "raw_mean2": sums["mean2"],
        "non_zeros_proportion1": sums["nz1"], "non_zeros_proportion2": sums["nz2"],
        "raw_normalized_mean1": sums["norm1"], "raw_normalized_mean2": sums["norm2"],
    }
