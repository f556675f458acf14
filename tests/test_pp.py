"""Gene selection: pyro_scvi.pp.highly_variable_genes gives scanpy's seurat_v3 selection, through scanpy
or through its own implementation on scikit-misc's loess, in memory and from a backed file."""

from __future__ import annotations

import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SHARED_DATA

from pyro_scvi import pp
from pyro_scvi.data import synthetic_iid

pytest.importorskip("skmisc", reason="the own implementation needs scikit-misc (pip install pyro-scvi[hvg])")

COLUMNS = ["highly_variable", "highly_variable_rank", "means", "variances", "variances_norm"]


@pytest.fixture(scope="module")
def counts():
    """CellBench 5cl with all 12,653 genes (3 plates in obs['batch']), or a generated stand-in."""
    path = SHARED_DATA / "cellbench_5cl.h5ad"
    if path.exists():
        print(f"\n[data] using real CellBench data: {path}")
        return anndata.read_h5ad(path)
    print("\n[data] ../shared/data is absent: using generated counts (3 batches) instead of CellBench")
    return synthetic_iid(batch_size=300, n_genes=3000, n_batches=3, n_labels=5, sparse_format="csr_matrix",
                         seed=5)


def _assert_same_selection(ours: pd.DataFrame, theirs: pd.DataFrame, batch: bool) -> None:
    assert list(ours.index) == list(theirs.index)
    np.testing.assert_array_equal(ours["highly_variable"], theirs["highly_variable"])
    # ranks are whole numbers (or medians of them): equal, with NaN where no batch selects the gene
    np.testing.assert_array_equal(ours["highly_variable_rank"], theirs["highly_variable_rank"])
    np.testing.assert_allclose(ours["means"], theirs["means"], rtol=1e-12)
    np.testing.assert_allclose(ours["variances"], theirs["variances"], rtol=1e-10)
    np.testing.assert_allclose(ours["variances_norm"], theirs["variances_norm"], rtol=1e-10)
    if batch:
        np.testing.assert_array_equal(ours["highly_variable_nbatches"], theirs["highly_variable_nbatches"])


@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_own_implementation_gives_scanpys_selection(counts, batch_key):
    sc = pytest.importorskip("scanpy")
    n_top = 1000
    theirs = sc.pp.highly_variable_genes(counts, n_top_genes=n_top, flavor="seurat_v3", batch_key=batch_key,
                                         inplace=False)
    ours = pp.highly_variable_genes(counts, n_top, batch_key=batch_key, inplace=False, use_scanpy=False)
    _assert_same_selection(ours, theirs, batch_key is not None)
    assert ours["highly_variable"].sum() == n_top
    selected = ours.loc[ours["highly_variable"], "highly_variable_rank"]
    assert selected.notna().all()
    if batch_key is None:  # one batch: the ranks of the selected genes are 0 .. n_top - 1
        assert sorted(selected) == list(range(n_top))
    else:
        assert set(ours["highly_variable_nbatches"]) <= {0, 1, 2, 3}


def test_seurat_v3_paper_flavor_matches_scanpy(counts):
    sc = pytest.importorskip("scanpy")
    counts = counts[:, :6000]
    theirs = sc.pp.highly_variable_genes(counts, n_top_genes=800, flavor="seurat_v3_paper", batch_key="batch",
                                         inplace=False)
    ours = pp.highly_variable_genes(counts, 800, batch_key="batch", flavor="seurat_v3_paper", inplace=False,
                                    use_scanpy=False)
    _assert_same_selection(ours, theirs, batch=True)
    default = pp.highly_variable_genes(counts, 800, batch_key="batch", inplace=False, use_scanpy=False)
    assert not np.array_equal(default["highly_variable"], ours["highly_variable"])  # the rules differ


def test_inplace_writes_scanpys_columns_through_either_path(counts):
    sc = pytest.importorskip("scanpy")
    part = counts[:, :4000]
    reference = part.copy()
    sc.pp.highly_variable_genes(reference, n_top_genes=500, flavor="seurat_v3", batch_key="batch")
    for use_scanpy in (None, False):
        adata = part.copy()
        assert pp.highly_variable_genes(adata, 500, batch_key="batch", use_scanpy=use_scanpy) is None
        assert set(reference.var.columns) <= set(adata.var.columns)
        assert adata.uns["hvg"] == {"flavor": "seurat_v3"}
        _assert_same_selection(adata.var, reference.var, batch=True)
    adata = part.copy()
    pp.highly_variable_genes(adata, 500, use_scanpy=False)
    assert "highly_variable_nbatches" not in adata.var and set(COLUMNS) <= set(adata.var.columns)


def test_without_scanpy_the_own_implementation_runs(counts, monkeypatch):
    small = counts[:, :2000].copy()
    with_scanpy = pp.highly_variable_genes(small, 300, batch_key="batch", inplace=False, use_scanpy=False)
    monkeypatch.setitem(sys.modules, "scanpy", None)  # `import scanpy` now fails
    without = pp.highly_variable_genes(small, 300, batch_key="batch", inplace=False)
    pd.testing.assert_frame_equal(with_scanpy, without)
    with pytest.raises(ImportError, match="needs scanpy"):
        pp.highly_variable_genes(small, 300, use_scanpy=True)


def test_storage_formats_and_backed_file_agree(tmp_path, monkeypatch):
    adata = synthetic_iid(batch_size=150, n_genes=300, n_batches=2, n_labels=2, sparse_format="csr_matrix",
                          seed=3)
    expected = pp.highly_variable_genes(adata, 60, batch_key="batch", inplace=False, use_scanpy=False)
    for matrix in (adata.X.toarray(), sp.csc_matrix(adata.X)):
        other = anndata.AnnData(matrix, obs=adata.obs, var=adata.var)
        pd.testing.assert_frame_equal(
            pp.highly_variable_genes(other, 60, batch_key="batch", inplace=False, use_scanpy=False), expected)
    monkeypatch.setattr(pp, "CHUNK_ELEMENTS", 300 * 5)  # chunks of a few rows: the streamed sums add up
    path = tmp_path / "counts.h5ad"
    adata.write_h5ad(path)
    on_disk = anndata.read_h5ad(path, backed="r")
    pp.highly_variable_genes(on_disk, 60, batch_key="batch")  # scanpy cannot read it: the own path
    pd.testing.assert_frame_equal(on_disk.var[expected.columns], expected, check_exact=False, rtol=1e-12)
    with pytest.raises(ValueError, match="backed"):
        pp.highly_variable_genes(on_disk, 60, subset=True)
    on_disk.file.close()


def test_subset_keeps_the_selected_genes_in_ranked_order_of_var():
    adata = synthetic_iid(batch_size=100, n_genes=200, n_batches=2, n_labels=2, seed=1)
    table = pp.highly_variable_genes(adata, 40, subset=True, inplace=False, use_scanpy=False)
    assert len(table) == 40 and table["highly_variable"].all()
    pp.highly_variable_genes(adata, 40, subset=True, use_scanpy=False)
    assert adata.n_vars == 40 and list(adata.var_names) == list(table.index)


@pytest.fixture
def small():
    return synthetic_iid(batch_size=50, n_genes=100, n_batches=2, n_labels=2, seed=0)


def test_refuses_data_that_are_not_counts(small):
    logged = small.copy()
    logged.X = np.log1p(logged.X)
    with pytest.raises(ValueError, match="non-integer.*raw counts.*layer="):
        pp.highly_variable_genes(logged, 10)
    pp.highly_variable_genes(logged, 10, layer="counts", use_scanpy=False)  # the counts layer is fine
    negative = small.copy()
    negative.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        pp.highly_variable_genes(negative, 10)
    missing = small.copy()
    missing.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pp.highly_variable_genes(missing, 10)
    as_sparse = small.copy()
    as_sparse.X = sp.csr_matrix(as_sparse.X * 0.5)
    with pytest.raises(ValueError, match="non-integer"):
        pp.highly_variable_genes(as_sparse, 10)
    text = anndata.AnnData(np.full((4, 3), "a", dtype=object))
    with pytest.raises(ValueError, match="not numeric"):
        pp.highly_variable_genes(text, 2)


def test_argument_errors(small):
    with pytest.raises(ValueError, match=r"n_top_genes=101 .*\(100\)"):
        pp.highly_variable_genes(small, 101)
    with pytest.raises(ValueError, match="n_top_genes=0"):
        pp.highly_variable_genes(small, 0)
    with pytest.raises(KeyError, match="'plate' is not a column of adata.obs"):
        pp.highly_variable_genes(small, 10, batch_key="plate")
    with pytest.raises(KeyError, match="layer 'raw'"):
        pp.highly_variable_genes(small, 10, layer="raw")
    with pytest.raises(ValueError, match="flavor"):
        pp.highly_variable_genes(small, 10, flavor="seurat")


def test_missing_scikit_misc_says_what_to_install(small, monkeypatch):
    for module in ("skmisc", "skmisc.loess"):
        monkeypatch.setitem(sys.modules, module, None)
    for use_scanpy in (None, False):  # scanpy needs scikit-misc too
        with pytest.raises(ImportError, match=r"pyro-scvi\[hvg\].*scikit-misc"):
            pp.highly_variable_genes(small, 10, use_scanpy=use_scanpy)
    monkeypatch.setitem(sys.modules, "scanpy", None)
    with pytest.raises(ImportError, match=r"needs scanpy or scikit-misc.*pyro-scvi\[hvg\]"):
        pp.highly_variable_genes(small, 10)
