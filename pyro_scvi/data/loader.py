"""From a registered AnnData to minibatches, and the train/validation/test split.

``RegisteredData`` keeps the count matrix as it is in the AnnData (dense or CSR, never densified
as a whole) and the per-cell covariates as tensors; a minibatch densifies only its own rows. A
backed AnnData (``anndata.read_h5ad(path, backed="r")``) keeps its counts on disk: minibatches are
read from the file (see :mod:`pyro_scvi.data.backed`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from . import backed
from .minibatch import Minibatch
from .registry import REGISTRY_KEYS, Registry, get_from_registry

__all__ = ["RegisteredData", "split_indices", "minibatch_from_dict"]


def _as_tensor(array, dtype) -> torch.Tensor | None:
    if array is None:
        return None
    return torch.as_tensor(np.ascontiguousarray(np.asarray(array)), dtype=dtype)


class RegisteredData:
    """The registered fields of one AnnData, ready to be cut into :class:`Minibatch` es.

    Parameters
    ----------
    adata
        An AnnData set up with ``SCVI.setup_anndata`` (or transferred from a registry).
    registry
        Its registry.
    """

    def __init__(self, adata, registry: Registry | Mapping) -> None:
        registry = Registry.coerce(registry)

        def field(key, dtype):
            return _as_tensor(get_from_registry(adata, registry, key), dtype)

        counts = get_from_registry(adata, registry, REGISTRY_KEYS.X)
        if sp.issparse(counts) and counts.format != "csr":
            counts = sp.csr_matrix(counts)
        self.counts = counts
        #: row reader of a count matrix kept on disk (backed AnnData), else ``None``
        self.backed = backed.BackedCounts(counts) if backed.is_backed(counts) else None
        self.n_obs, self.n_vars = counts.shape
        if registry.is_minified:  # the library was recorded before the counts were dropped
            library = np.asarray(get_from_registry(adata, registry, "observed_lib_size"), dtype=np.float64)
        elif self.backed is not None:  # chunked pass over the file (shared with setup's checks)
            library = backed.row_totals(counts)
        else:
            library = np.asarray(counts.sum(axis=1))
        library = library.reshape(-1, 1).astype(np.float32)  # one rounding for every input dtype
        # a cell without counts would get log-library -inf (NaN gradients with a Poisson likelihood):
        # it counts as 1 count, as setup_anndata warns
        self.log_library = torch.as_tensor(np.log(np.where(library > 0, library, 1.0)), dtype=torch.float32)
        self.batch_index = field(REGISTRY_KEYS.BATCH, torch.int64)
        self.labels = field(REGISTRY_KEYS.LABELS, torch.int64)
        self.size_factor = field(REGISTRY_KEYS.SIZE_FACTOR, torch.float32)
        self.categorical_covariates = field(REGISTRY_KEYS.CAT_COVS, torch.int64)
        self.continuous_covariates = field(REGISTRY_KEYS.CONT_COVS, torch.float32)
        self.minified_data_type = None
        if registry.is_minified:
            self.minified_data_type = get_from_registry(adata, registry, "minify_type")
        self.latent_loc = self.latent_scale = None
        if self.minified_data_type == "latent_posterior_parameters":  # counts gone: use the stored posterior
            self.latent_loc = field("latent_qzm", torch.float32)
            self.latent_scale = field("latent_qzv", torch.float32).sqrt()

    def counts_of(self, indices: np.ndarray, sparse: bool = False) -> torch.Tensor:
        """Counts of the given cells as a dense float32 ``(n, G)`` tensor (or a sparse COO tensor)."""
        rows = self.counts[indices] if self.backed is None else self.backed.read_rows(indices)
        return _rows_as_tensor(rows, sparse)

    def minibatch(
        self, indices: np.ndarray, device: torch.device | str = "cpu", sparse: bool = False, rows=None
    ) -> Minibatch:
        """The minibatch of cells ``indices`` (in that order) on ``device``.

        With ``sparse=True`` the counts travel to the device as a sparse tensor and are densified there.
        ``rows``: the counts of these cells when already read (SciPy sparse or dense).
        """
        indices = np.asarray(indices)
        index = torch.as_tensor(indices, dtype=torch.int64)

        def pick(t):
            return None if t is None else t[index]

        counts = self.counts_of(indices, sparse=sparse) if rows is None else _rows_as_tensor(rows, sparse)
        batch = Minibatch(
            x=counts,
            batch_index=pick(self.batch_index),
            labels=pick(self.labels),
            log_library=pick(self.log_library),
            size_factor=pick(self.size_factor),
            categorical_covariates=pick(self.categorical_covariates),
            continuous_covariates=pick(self.continuous_covariates),
            latent_loc=pick(self.latent_loc),
            latent_scale=pick(self.latent_scale),
        )
        batch = _host_to_device(batch, device)
        return replace(batch, x=batch.x.to_dense()) if sparse else batch

    def iterate(
        self,
        indices: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        sparse: bool = False,
    ) -> Iterator[tuple[np.ndarray, Minibatch]]:
        """Yield ``(cell indices, minibatch)`` over ``indices``; shuffled with torch's global RNG.

        For counts on disk (backed AnnData) a shuffled epoch is shuffled by blocks of contiguous
        cells (:func:`pyro_scvi.data.backed.block_shuffled`: every cell once, same minibatch sizes,
        less mixed minibatches); without shuffling each minibatch's cells are read in increasing order
        and returned in the requested order.
        """
        indices = np.asarray(indices)
        if shuffle and self.backed is not None:
            for chunk, rows in backed.block_shuffled(self.backed, indices, batch_size, drop_last):
                yield chunk, self.minibatch(chunk, device=device, sparse=sparse, rows=rows)
            return
        if shuffle:
            indices = indices[torch.randperm(len(indices)).numpy()]
        stop = len(indices) - (len(indices) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, self.minibatch(chunk, device=device, sparse=sparse)


def _host_to_device(batch: Minibatch, device: torch.device | str) -> Minibatch:
    """A minibatch built in host memory, copied to ``device``.

    To CUDA the tensors go through page-locked memory and are copied with ``non_blocking=True``: the
    copies are queued on the current stream and the host goes on to the next step at once. A copy
    from ordinary (pageable) memory would make the host wait for the device at every minibatch.
    """
    if torch.device(device).type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def _rows_as_tensor(rows, sparse: bool = False) -> torch.Tensor:
    """Rows of a count matrix (SciPy sparse or dense) as a dense float32 tensor (or a sparse COO tensor)."""
    if sp.issparse(rows):
        if sparse:
            rows = sp.coo_matrix(rows)
            coordinates = torch.as_tensor(np.vstack([rows.row, rows.col]), dtype=torch.int64)
            values = torch.as_tensor(rows.data, dtype=torch.float32)
            return torch.sparse_coo_tensor(coordinates, values, size=rows.shape, check_invariants=False)
        rows = rows.toarray()
    return torch.as_tensor(np.asarray(rows, dtype=np.float32))


def _log_total(x: torch.Tensor) -> torch.Tensor:
    """Log total counts per row; an empty row counts as 1 count (log 0 would be -inf)."""
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, total, torch.ones_like(total)).log()


def minibatch_from_dict(tensors: dict, device: torch.device | str = "cpu") -> Minibatch:
    """Build a :class:`Minibatch` from a dict with scvi-tools' keys (``"X"``, ``"batch"``, ...).

    This is what custom dataloaders and datamodules yield.
    """
    if REGISTRY_KEYS.X not in tensors:
        raise ValueError(f"A minibatch dict needs the counts under 'X'; got keys {sorted(tensors)}.")
    x = tensors[REGISTRY_KEYS.X]
    if sp.issparse(x):  # a SciPy sparse block (CSR, CSC, COO, ...)
        x = x.toarray()
    x = torch.as_tensor(x)
    if x.layout != torch.strided:
        x = x.to_dense()
    # host-to-GPU copies are queued without waiting (asynchronous from page-locked memory, e.g. a
    # DataLoader's pin_memory=True)
    non_blocking = torch.device(device).type == "cuda"
    x = x.to(device=device, dtype=torch.float32, non_blocking=non_blocking)
    n = x.shape[0]

    def column(key, dtype):
        value = tensors.get(key)
        if value is None:
            return None
        value = torch.as_tensor(value).to(device=device, dtype=dtype, non_blocking=non_blocking)
        return value.reshape(n, -1)

    zeros = torch.zeros((n, 1), dtype=torch.int64, device=device)
    batch_index = column(REGISTRY_KEYS.BATCH, torch.int64)
    labels = column(REGISTRY_KEYS.LABELS, torch.int64)
    return Minibatch(
        x=x,
        batch_index=zeros if batch_index is None else batch_index,
        labels=zeros if labels is None else labels,
        log_library=_log_total(x),
        size_factor=column(REGISTRY_KEYS.SIZE_FACTOR, torch.float32),
        categorical_covariates=column(REGISTRY_KEYS.CAT_COVS, torch.int64),
        continuous_covariates=column(REGISTRY_KEYS.CONT_COVS, torch.float32),
    )


def split_indices(
    n_obs: int,
    train_size: float | None = 0.9,
    validation_size: float | None = None,
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int | None = None,
    drop_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``range(n_obs)`` into train, validation and test indices as scvi-tools does.

    ``n_train = ceil(train_size · n_obs)``; ``n_val = n_obs − n_train`` unless ``validation_size``
    is given (then ``floor(validation_size · n_obs)``). A permutation (seeded by ``seed``) is cut
    validation first, then train, then test. When the last training minibatch would hold 1 or 2
    cells (BatchNorm cannot train on one cell), those cells move to the validation set (or to the
    test set when there is no validation set), with a warning, whatever ``train_size`` is.
    """
    if train_size is None or train_size == 0:
        train_size = 0.9
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    n_train = math.ceil(train_size * n_obs)
    if validation_size is None:
        n_val = n_obs - n_train
    else:
        if not 0 <= validation_size < 1:
            raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
        if train_size + validation_size > 1:
            raise ValueError(
                f"train_size + validation_size must be ≤ 1, got {train_size} + {validation_size}."
            )
        n_val = math.floor(n_obs * validation_size)
    if n_train == 0:
        raise ValueError(f"No cells left for training with n_obs={n_obs} and train_size={train_size}.")

    remainder = n_train % batch_size
    if remainder in (1, 2) and not drop_last:
        if n_train == remainder:
            raise ValueError(
                f"Only {n_train} training cell(s): BatchNorm cannot train on a minibatch of fewer than 3 "
                "cells. Use more cells or a larger train_size."
            )
        n_train -= remainder
        where = "validation" if n_val > 0 else "test"
        if n_val > 0:
            n_val += remainder
        warnings.warn(
            f"{remainder} cell(s) moved from the training set to the {where} set so that no training "
            f"minibatch holds fewer than 3 cells (batch_size={batch_size}). Pass "
            "datasplitter_kwargs={'drop_last': True} to drop the small batch instead.",
            UserWarning,
            stacklevel=3,
        )

    order = np.random.RandomState(seed).permutation(n_obs) if shuffle else np.arange(n_obs)
    validation = order[:n_val]
    train = order[n_val : n_val + n_train]
    test = order[n_val + n_train :]
    return train, validation, test


def check_training_minibatches(
    module: torch.nn.Module, n_train: int, batch_size: int, drop_last: bool
) -> None:
    """Raise ``ValueError`` when training would see no minibatch, or a minibatch of one cell for a
    module with BatchNorm (which cannot train on one cell)."""
    if drop_last and n_train < batch_size:
        raise ValueError(
            f"drop_last=True with {n_train} training cells and batch_size={batch_size} leaves no training "
            "minibatch: lower batch_size or drop datasplitter_kwargs={'drop_last': True}."
        )
    if not any(isinstance(layer, torch.nn.BatchNorm1d) for layer in module.modules()):
        return
    last = n_train % batch_size if not drop_last else 0
    if batch_size == 1 or last == 1 or n_train == 1:
        raise ValueError(
            f"{n_train} training cells in minibatches of {batch_size} give a minibatch of 1 cell, on which "
            "BatchNorm cannot train: use batch_size >= 2, other training indices, more cells, or "
            "datasplitter_kwargs={'drop_last': True} (or use_batch_norm='none')."
        )
