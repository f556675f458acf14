"""Preprocessing before scVI: :func:`highly_variable_genes`, the gene selection users make on raw counts.

scVI is usually trained on a few thousand highly variable genes picked with Seurat v3's rule
(Stuart et al., *Cell* 2019), which scanpy implements as ``flavor="seurat_v3"``. We do not rewrite
it: when scanpy is installed, :func:`highly_variable_genes` checks the input and calls
``scanpy.pp.highly_variable_genes``. Without scanpy (or with ``use_scanpy=False``, and always for
backed AnnData, which scanpy does not read), a short implementation of the same rule runs on
scikit-misc's ``loess``, the regression scanpy itself uses:

1. per batch, the mean and variance (``ddof=1``) of every gene's counts;
2. a loess fit (degree 2, ``span``) of log10 variance on log10 mean over the non-constant genes;
   the fitted value gives each gene an expected standard deviation ``sd``;
3. counts are clipped at ``mean + sqrt(n_cells) * sd`` and the variance of the clipped counts
   around the gene's mean, divided by ``sd**2``, is the gene's normalised variance;
4. within each batch, genes are ranked by normalised variance (0 = most variable); a gene is
   highly variable in a batch when its rank is below ``n_top_genes``;
5. ``highly_variable_rank`` is the median of a gene's ranks over the batches where it is highly
   variable (NaN where it is in none), ``highly_variable_nbatches`` the number of those batches;
   the selected ``n_top_genes`` are the first after sorting by rank (ascending), ties broken by
   the number of batches (descending). ``flavor="seurat_v3_paper"`` sorts by the number of batches
   first, as Seurat's ``SelectIntegrationFeatures`` does.

Both paths stream the rows in chunks (two passes), so a backed CSR file is never read at once.
Install the fallback's dependency with ``pip install pyro-scvi[hvg]`` (scikit-misc).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .data import backed

__all__ = ["highly_variable_genes", "FLAVORS"]

FLAVORS = ("seurat_v3", "seurat_v3_paper")
#: rows read at once by the own implementation (about this many stored values per chunk)
CHUNK_ELEMENTS = 2**23
#: the columns written to ``adata.var``, in scanpy's order
_COLUMNS = ["highly_variable", "highly_variable_rank", "means", "variances", "variances_norm",
            "highly_variable_nbatches"]


def highly_variable_genes(adata, n_top_genes: int = 2000, batch_key: str | None = None,
                          flavor: str = "seurat_v3", layer: str | None = None, subset: bool = False,
                          span: float = 0.3, inplace: bool = True, use_scanpy: bool | None = None):
    """Select ``n_top_genes`` highly variable genes from raw counts with Seurat v3's rule (see the module).

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or in ``layers[layer]`` (dense, CSR/CSC, or backed).
    n_top_genes
        Number of genes to select.
    batch_key
        ``obs`` column of batches: genes are ranked within each batch and combined (step 5).
    flavor
        ``"seurat_v3"`` (scanpy's default rule) or ``"seurat_v3_paper"``.
    layer
        Layer holding the counts (default: ``X``).
    subset
        Keep only the selected genes (in place with ``inplace``, else in the returned table).
    span
        Fraction of genes in each loess neighbourhood.
    inplace
        Write ``highly_variable``, ``highly_variable_rank``, ``means``, ``variances``,
        ``variances_norm`` (and ``highly_variable_nbatches`` with ``batch_key``) into ``adata.var``
        and ``{"flavor": flavor}`` into ``adata.uns["hvg"]``; otherwise return these columns as a
        DataFrame indexed by gene.
    use_scanpy
        ``None``: scanpy's function when scanpy is importable (and ``adata`` is not backed);
        ``True``: scanpy (error if missing); ``False``: the own implementation on scikit-misc.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}.")
    n_top_genes = _check_n_top_genes(n_top_genes, adata.n_vars)
    if batch_key is not None and batch_key not in adata.obs:
        raise KeyError(f"batch_key {batch_key!r} is not a column of adata.obs "
                       f"(columns: {list(adata.obs.columns)}).")
    matrix = _counts(adata, layer)
    _check_counts(matrix, layer)
    is_backed = backed.is_backed(matrix)
    if subset and inplace and is_backed:
        raise ValueError("subset=True cannot subset a backed AnnData in place: select the genes with "
                         "adata[:, adata.var['highly_variable']].to_memory() (or open the file in memory).")
    if _use_scanpy(use_scanpy, is_backed):
        table = _scanpy_table(adata, n_top_genes, batch_key, flavor, layer, span)
    else:
        batches = _batch_codes(adata, batch_key)
        table = seurat_v3_table(matrix, batches, n_top_genes, span=span, flavor=flavor)
        table.index = adata.var_names.copy()
    if batch_key is None:
        table = table.drop(columns="highly_variable_nbatches")
    if not inplace:
        return table[table["highly_variable"]] if subset else table
    adata.uns["hvg"] = {"flavor": flavor}
    for column in table.columns:
        adata.var[column] = table[column].to_numpy()
    if subset:
        adata._inplace_subset_var(table["highly_variable"].to_numpy())
    return None


# ---------------------------------------------------------------------------- checks
def _check_n_top_genes(n_top_genes, n_vars: int) -> int:
    if isinstance(n_top_genes, (bool, np.bool_)) or not isinstance(n_top_genes, (int, np.integer)):
        raise TypeError(f"n_top_genes must be an integer, got {n_top_genes!r}.")
    if not 1 <= n_top_genes <= n_vars:
        raise ValueError(f"n_top_genes={n_top_genes} must be between 1 and the number of genes "
                         f"({n_vars}).")
    return int(n_top_genes)


def _counts(adata, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} is not in adata.layers (layers: {list(adata.layers.keys())}).")
    return adata.layers[layer]


def _check_counts(matrix, layer: str | None) -> None:
    """Raise unless ``matrix`` holds finite, non-negative integers (raw counts)."""
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if matrix is None:
        raise ValueError(f"{where} is empty: pass the raw counts (or their layer with layer=).")
    if backed.is_backed(matrix):
        found = backed.scan(matrix)
    else:
        values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
        found = backed.ScanResult(totals=np.zeros(0), dtype=values.dtype)
        backed.check_values(values, found)  # NaN, infinite, smallest and non-integer values
    if not backed.is_numeric(found.dtype):
        raise ValueError(f"{where} is not numeric ({found.dtype}): pass the raw counts.")
    bad_nan, minimum, non_integer = found.n_nan + found.n_inf, found.minimum, found.non_integer
    hint = ("highly_variable_genes(flavor='seurat_v3') needs raw counts: pass them in X or name their "
            "layer with layer=")
    if bad_nan:
        raise ValueError(f"{where} holds {bad_nan} NaN or infinite values; {hint}.")
    if minimum < 0:
        raise ValueError(f"{where} holds negative values (minimum {minimum:g}); {hint}.")
    if non_integer:
        raise ValueError(f"{where} holds non-integer values (normalised or log data?); {hint}.")


def _batch_codes(adata, batch_key: str | None) -> np.ndarray:
    if batch_key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    column = adata.obs[batch_key]
    if column.isna().any():
        raise ValueError(f"obs[{batch_key!r}] has missing values: give every cell a batch.")
    return pd.factorize(column.astype(str), sort=True)[0].astype(np.int64)


def _import_loess():
    try:
        from skmisc.loess import loess
    except ImportError as error:
        raise ImportError(
            "highly_variable_genes needs scanpy or scikit-misc (the loess regression of Seurat v3's rule): "
            "pip install pyro-scvi[hvg] (or pip install scikit-misc)."
        ) from error
    return loess


def _scanpy_available() -> bool:
    try:
        import scanpy  # noqa: F401
    except ImportError:
        return False
    return True


def _use_scanpy(use_scanpy: bool | None, is_backed: bool) -> bool:
    if use_scanpy is None:
        return not is_backed and _scanpy_available()
    if use_scanpy and is_backed:
        raise ValueError("use_scanpy=True: scanpy cannot read a backed AnnData; pass use_scanpy=None or "
                         "False to use the streaming implementation.")
    if use_scanpy and not _scanpy_available():
        raise ImportError("use_scanpy=True needs scanpy: pip install scanpy (or pass use_scanpy=None).")
    return bool(use_scanpy)


def _scanpy_table(adata, n_top_genes: int, batch_key, flavor: str, layer, span: float) -> pd.DataFrame:
    """scanpy's own selection (counts already checked), as the table of the module's columns."""
    import scanpy as sc

    _import_loess()  # scanpy needs it too: the same clear message
    table = sc.pp.highly_variable_genes(
        adata, n_top_genes=n_top_genes, batch_key=batch_key, flavor=flavor, layer=layer, span=span,
        check_values=False, subset=False, inplace=False,
    )
    if "highly_variable_nbatches" not in table:
        table["highly_variable_nbatches"] = (table["highly_variable_rank"].notna()).astype(np.int64)
    return table[_COLUMNS]


# ---------------------------------------------------------------------------- the own implementation
def _row_chunks(matrix):
    """``(start, rows)`` chunks of about ``CHUNK_ELEMENTS`` values; rows as CSR or a dense array."""
    n_obs, n_vars = matrix.shape
    if backed.is_backed(matrix):
        reader = backed.BackedCounts(matrix)
        read = reader.read_slice
    else:
        if sp.issparse(matrix) and not sp.isspmatrix_csr(matrix):
            matrix = sp.csr_matrix(matrix)
        read = lambda start, stop: matrix[start:stop]  # noqa: E731
    step = max(1, CHUNK_ELEMENTS // max(1, n_vars))
    if sp.issparse(matrix) or backed.is_backed(matrix):  # sparse rows are mostly zeros: bigger chunks
        step *= 8
    for start in range(0, n_obs, step):
        rows = read(start, min(start + step, n_obs))
        yield start, (sp.csr_matrix(rows, dtype=np.float64) if sp.issparse(rows)
                      else np.asarray(rows, dtype=np.float64))


def _per_batch_sums(rows, codes: np.ndarray, n_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums and sums of squares of ``rows`` within each batch, ``(n_batches, n_vars)`` float64."""
    indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                              shape=(n_batches, len(codes)))
    squared = rows.multiply(rows) if sp.issparse(rows) else rows * rows
    return _dense(indicator @ rows), _dense(indicator @ squared)


def _dense(values) -> np.ndarray:
    return values.toarray() if sp.issparse(values) else np.asarray(values)


def _clipped(rows, clip: np.ndarray):
    """``min(rows, clip)`` element-wise (``clip``: ``(n_rows, n_vars)``, each row its batch's limits)."""
    if sp.issparse(rows):
        row_of = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
        data = np.minimum(rows.data, clip[row_of, rows.indices])
        return sp.csr_matrix((data, rows.indices, rows.indptr), shape=rows.shape)
    return np.minimum(rows, clip)


def _expected_sd(mean: np.ndarray, var: np.ndarray, span: float) -> np.ndarray:
    """Standard deviation expected from the mean: loess of log10 variance on log10 mean (1 if constant)."""
    loess = _import_loess()
    fitted = np.zeros_like(mean)
    varying = var > 0
    if varying.sum() < 3:
        raise ValueError("Fewer than 3 genes vary within a batch: too few to fit the mean-variance trend.")
    model = loess(np.log10(mean[varying]), np.log10(var[varying]), span=span, degree=2)
    model.fit()
    fitted[varying] = model.outputs.fitted_values
    return np.sqrt(10.0**fitted)


def normalised_variances(matrix, batches: np.ndarray, span: float = 0.3) -> tuple[np.ndarray, ...]:
    """Per batch, the normalised variance of every gene (steps 1-3 of the module): ``(n_batches, n_vars)``;
    also the overall means and variances ``(n_vars,)``. Two passes over the rows of ``matrix``."""
    n_batches = int(batches.max()) + 1 if len(batches) else 0
    n_cells = np.bincount(batches, minlength=n_batches).astype(np.float64)
    if (n_cells < 2).any():
        raise ValueError("Every batch needs at least 2 cells to estimate variances.")
    sums = np.zeros((n_batches, matrix.shape[1]))
    squares = np.zeros_like(sums)
    for start, rows in _row_chunks(matrix):
        s, q = _per_batch_sums(rows, batches[start:start + rows.shape[0]], n_batches)
        sums += s
        squares += q
    n = n_cells[:, None]
    mean = sums / n
    var = (squares - n * mean**2) / (n - 1)
    sd = np.stack([_expected_sd(mean[b], var[b], span) for b in range(n_batches)])
    clip = mean + np.sqrt(n) * sd
    clipped_sums = np.zeros_like(sums)
    clipped_squares = np.zeros_like(sums)
    for start, rows in _row_chunks(matrix):
        codes = batches[start:start + rows.shape[0]]
        s, q = _per_batch_sums(_clipped(rows, clip[codes]), codes, n_batches)
        clipped_sums += s
        clipped_squares += q
    norm = (n * mean**2 + clipped_squares - 2 * clipped_sums * mean) / ((n - 1) * sd**2)
    total = n_cells.sum()
    overall_mean = sums.sum(0) / total
    overall_var = (squares.sum(0) - total * overall_mean**2) / (total - 1)
    return norm, overall_mean, overall_var


def seurat_v3_table(matrix, batches: np.ndarray, n_top_genes: int, span: float = 0.3,
                    flavor: str = "seurat_v3") -> pd.DataFrame:
    """The selection table (steps 1-5) of a count matrix with integer batch codes ``(n_obs,)``."""
    norm, means, variances = normalised_variances(matrix, np.asarray(batches, dtype=np.int64), span)
    ranks = np.empty(norm.shape, dtype=np.float32)
    for b, order in enumerate(np.argsort(-norm, axis=1)):
        ranks[b, order] = np.arange(norm.shape[1])
    top = ranks < n_top_genes
    n_batches_top = top.sum(0).astype(np.int64)
    with warnings.catch_warnings():  # genes highly variable in no batch: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        median_rank = np.nanmedian(np.where(top, ranks, np.nan), axis=0).astype(np.float32)
    if flavor == "seurat_v3":
        order = np.lexsort((-n_batches_top, median_rank))  # last key first; NaN ranks last
    else:
        order = np.lexsort((median_rank, -n_batches_top))
    selected = np.zeros(norm.shape[1], dtype=bool)
    selected[order[:n_top_genes]] = True
    return pd.DataFrame({
        "highly_variable": selected, "highly_variable_rank": median_rank, "means": means,
        "variances": variances, "variances_norm": norm.mean(0), "highly_variable_nbatches": n_batches_top,
    })
