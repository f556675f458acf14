"""Count-matrix inputs: 10x Genomics ``.h5`` files and matrix directories, and ``.h5ad``.

:func:`read_10x_mtx` reads a matrix directory (``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or
``genes.tsv[.gz]``, ``barcodes.tsv[.gz]``), :func:`read_10x_h5` a Cell Ranger v2/v3 ``.h5`` file,
and :func:`read_input` picks the reader by path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["VAR_NAMES", "read_10x_mtx", "read_10x_h5", "read_input"]

#: how genes can be named: by symbol or by id
VAR_NAMES = ("gene_symbols", "gene_ids")


def _find(directory: Path, names: list[str]) -> Path | None:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def _read_tsv(path: Path):
    """A headerless tab-separated file (gzipped or not) as a DataFrame of strings."""
    import pandas as pd

    return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)


def _unique_index(names):
    import pandas as pd
    from anndata.utils import make_index_unique

    return make_index_unique(pd.Index(np.asarray(names, dtype=object).astype(str), dtype=object))


def _anndata_from_10x(matrix_genes_by_cells, barcodes, gene_ids, gene_names, feature_types, var_names: str,
                      gex_only: bool):
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    X = sp.csr_matrix(matrix_genes_by_cells.T, dtype=np.float32)
    var = pd.DataFrame({"gene_ids": np.asarray(gene_ids, dtype=object)})
    if feature_types is not None:
        var["feature_types"] = np.asarray(feature_types, dtype=object)
    if gex_only and feature_types is not None:
        keep = var["feature_types"].to_numpy() == "Gene Expression"
        if keep.any():
            X, var, gene_names = X[:, keep], var[keep], np.asarray(gene_names, dtype=object)[keep]
    if var_names not in VAR_NAMES:
        raise ValueError(f"var_names must be 'gene_symbols' or 'gene_ids', got {var_names!r}.")
    names = gene_names if var_names == "gene_symbols" else var["gene_ids"].to_numpy()
    var.index = _unique_index(names)
    obs = pd.DataFrame(index=_unique_index(barcodes))
    if X.shape != (len(obs), len(var)):
        raise ValueError(f"The 10x matrix has shape {X.shape[::-1]} (genes x cells) but there are "
                         f"{len(var)} features and {len(obs)} barcodes.")
    return anndata.AnnData(X=X, obs=obs, var=var)


def read_10x_mtx(path: str | Path, var_names: str = "gene_symbols", gex_only: bool = True):
    """Read a 10x matrix directory: ``matrix.mtx[.gz]`` (genes × cells), ``features.tsv[.gz]``
    (Cell Ranger ≥ 3: id, name, type) or ``genes.tsv[.gz]`` (id, name), ``barcodes.tsv[.gz]``.

    Returns an AnnData of cells × genes with float32 CSR counts, ``var["gene_ids"]`` (and
    ``var["feature_types"]``), named by gene symbol (``var_names="gene_symbols"``, made unique)
    or by id; with ``gex_only`` only "Gene Expression" features are kept.
    """
    import scipy.io

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"No such 10x directory: {directory}")
    matrix = _find(directory, ["matrix.mtx"])
    features = _find(directory, ["features.tsv", "genes.tsv"])
    barcodes = _find(directory, ["barcodes.tsv"])
    missing = [name for name, found in [("matrix.mtx[.gz]", matrix),
                                        ("features.tsv[.gz] or genes.tsv[.gz]", features),
                                        ("barcodes.tsv[.gz]", barcodes)] if found is None]
    if missing:
        raise FileNotFoundError(f"{directory} is not a 10x matrix directory: missing {', '.join(missing)}.")
    counts = scipy.io.mmread(matrix)  # reads .gz too
    rows = _read_tsv(features)
    gene_ids = rows[0].to_numpy()
    gene_names = rows[1].to_numpy() if rows.shape[1] > 1 else gene_ids
    feature_types = rows[2].to_numpy() if rows.shape[1] > 2 else None
    cells = _read_tsv(barcodes)[0].to_numpy()
    return _anndata_from_10x(counts, cells, gene_ids, gene_names, feature_types, var_names, gex_only)


def _read_h5_groups(f, path: Path, genome: str | None):
    """``(matrix group, gene ids, gene names, feature types or None, genome mask or None)``."""
    import h5py

    if "matrix" in f:  # Cell Ranger v3
        group = f["matrix"]
        feats = group["features"]
        feature_types = feats["feature_type"].asstr()[()] if "feature_type" in feats else None
        keep = feats["genome"].asstr()[()] == genome if genome is not None and "genome" in feats else None
        return group, feats["id"].asstr()[()], feats["name"].asstr()[()], feature_types, keep
    groups = [k for k in f.keys() if isinstance(f[k], h5py.Group) and "data" in f[k]]  # v2: one per genome
    if not groups:
        raise ValueError(f"{path} is not a 10x .h5 file (no /matrix group and no genome group).")
    if genome is None:
        if len(groups) > 1:
            raise ValueError(f"{path} holds several genomes {groups}: choose one.")
        genome = groups[0]
    if genome not in groups:
        raise ValueError(f"Genome {genome!r} is not in {path} (it has {groups}).")
    group = f[genome]
    return group, group["genes"].asstr()[()], group["gene_names"].asstr()[()], None, None


def read_10x_h5(path: str | Path, genome: str | None = None, var_names: str = "gene_symbols",
                gex_only: bool = True):
    """Read a Cell Ranger ``filtered_feature_bc_matrix.h5``: v3 (``/matrix`` with ``features/id,
    name, feature_type``) or v2 (``/<genome>`` with ``genes``, ``gene_names``). Same output as
    :func:`read_10x_mtx`; ``genome`` picks the group of a v2 file with several."""
    import h5py
    import scipy.sparse as sp

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    with h5py.File(path, "r") as f:
        group, gene_ids, gene_names, feature_types, keep = _read_h5_groups(f, path, genome)
        shape = tuple(int(s) for s in group["shape"][()])
        matrix = sp.csc_matrix((group["data"][()], group["indices"][()], group["indptr"][()]), shape=shape)
        barcodes = group["barcodes"].asstr()[()]
    if keep is not None:
        matrix, gene_ids, gene_names = matrix.tocsr()[keep], gene_ids[keep], gene_names[keep]
        feature_types = None if feature_types is None else feature_types[keep]
    return _anndata_from_10x(matrix, barcodes, gene_ids, gene_names, feature_types, var_names, gex_only)


def read_input(path: str | Path, var_names: str = "gene_symbols"):
    """Read ``.h5ad`` (AnnData), a 10x ``.h5`` file or a 10x matrix directory."""
    import anndata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such file or directory: {path}")
    if path.is_dir():
        return read_10x_mtx(path, var_names=var_names)
    if path.suffix == ".h5ad":
        return anndata.read_h5ad(path)
    if path.suffix in (".h5", ".hdf5"):
        return read_10x_h5(path, var_names=var_names)
    raise ValueError(f"Unsupported input {path}: expected .h5ad, a 10x .h5 file or a 10x matrix directory.")
