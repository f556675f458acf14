"""10x Genomics inputs (pyro_scvi.io.tenx): matrix directories and Cell Ranger .h5 files."""

import gzip
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from pyro_scvi.io.tenx import read_10x_h5, read_10x_mtx, read_input


def _counts(n_genes=6, n_cells=5, seed=0):
    return sp.random(n_genes, n_cells, density=0.6, random_state=seed, format="csc",
                     data_rvs=lambda k: np.random.default_rng(seed).integers(1, 20, k)).astype(np.float64)


def _write_gz(path: Path, text: str) -> None:
    with gzip.open(path, "wt") as handle:
        handle.write(text)


def test_read_10x_mtx_v3_and_v2(tmp_path):
    counts = _counts()
    v3 = tmp_path / "v3"
    v3.mkdir()
    with gzip.open(v3 / "matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, counts)
    gex = "Gene Expression"
    features = [("ENSG1", "A", gex), ("ENSG2", "B", gex), ("ENSG3", "A", gex), ("ENSG4", "C", gex),
                ("ENSG5", "D", gex), ("AB1", "CD3", "Antibody Capture")]
    _write_gz(v3 / "features.tsv.gz", "".join("\t".join(f) + "\n" for f in features))
    _write_gz(v3 / "barcodes.tsv.gz", "".join(f"AAAC-{i}\n" for i in range(5)))
    adata = read_10x_mtx(v3)
    assert adata.shape == (5, 5)  # antibody capture dropped
    assert list(adata.var_names) == ["A", "B", "A-1", "C", "D"]
    assert list(adata.var["gene_ids"]) == ["ENSG1", "ENSG2", "ENSG3", "ENSG4", "ENSG5"]
    np.testing.assert_array_equal(adata.X.toarray(), counts.toarray()[:5].T)
    assert read_10x_mtx(v3, var_names="gene_ids", gex_only=False).shape == (5, 6)

    v2 = tmp_path / "v2"
    v2.mkdir()
    scipy.io.mmwrite(v2 / "matrix.mtx", counts)
    (v2 / "genes.tsv").write_text("".join(f"ENSG{i}\tG{i}\n" for i in range(6)))
    (v2 / "barcodes.tsv").write_text("".join(f"BC{i}\n" for i in range(5)))
    adata = read_input(v2)
    assert adata.shape == (5, 6) and list(adata.obs_names) == [f"BC{i}" for i in range(5)]
    np.testing.assert_array_equal(adata.X.toarray(), counts.toarray().T)
    (v2 / "barcodes.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="barcodes"):
        read_10x_mtx(v2)


def write_10x_h5(path: Path, counts, v3: bool = True) -> None:
    n_genes, n_cells = counts.shape
    with h5py.File(path, "w") as f:
        group = f.create_group("matrix" if v3 else "GRCh38")
        group["data"] = counts.data.astype(np.int32)
        group["indices"], group["indptr"] = counts.indices, counts.indptr
        group["shape"] = np.array([n_genes, n_cells])
        group["barcodes"] = np.array([f"BC{i}".encode() for i in range(n_cells)])
        ids = np.array([f"ENSG{i}".encode() for i in range(n_genes)])
        names = np.array([f"G{i}".encode() for i in range(n_genes)])
        if v3:
            feats = group.create_group("features")
            feats["id"], feats["name"] = ids, names
            feats["feature_type"] = np.array([b"Gene Expression"] * n_genes)
            feats["genome"] = np.array([b"GRCh38"] * n_genes)
        else:
            group["genes"], group["gene_names"] = ids, names


def test_read_10x_h5_v3_and_v2(tmp_path):
    counts = _counts(n_genes=7, n_cells=4, seed=1)
    for v3 in (True, False):
        path = tmp_path / f"{'v3' if v3 else 'v2'}.h5"
        write_10x_h5(path, counts, v3=v3)
        adata = read_10x_h5(path)
        assert adata.shape == (4, 7) and list(adata.var_names) == [f"G{i}" for i in range(7)]
        np.testing.assert_array_equal(adata.X.toarray(), counts.toarray().T)
    with pytest.raises(FileNotFoundError):
        read_10x_h5(tmp_path / "missing.h5")
    (tmp_path / "not10x.h5").touch()
    with h5py.File(tmp_path / "not10x.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a 10x"):
        read_input(tmp_path / "not10x.h5")
