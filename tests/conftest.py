"""Shared fixtures: seeded generated data, the real CellBench data (or a generated stand-in), and a
small trained model reused by the read-only API tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_scvi import SCVI, settings
from pyro_scvi.data import synthetic_iid

torch.set_num_threads(2)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def top_variable_genes(adata, n_genes: int):
    """The ``n_genes`` genes with the highest variance of log1p counts (as in the CellBench README)."""
    X = adata.X
    logged = X.copy()
    logged.data = np.log1p(logged.data)
    mean = np.asarray(logged.mean(0)).ravel()
    squared = np.asarray(logged.multiply(logged).mean(0)).ravel()
    keep = np.sort(np.argsort(-(squared - mean**2))[:n_genes])
    return adata[:, keep].copy()


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CI machines have none)")


@pytest.fixture(autouse=True)
def _seed():
    settings.seed = 0
    yield


@pytest.fixture
def adata():
    """600 generated cells × 200 genes, 2 batches, 3 labels, counts in X and layers['counts']."""
    return synthetic_iid(batch_size=300, n_genes=200, n_batches=2, n_labels=3, seed=1)


@pytest.fixture(scope="session")
def cellbench():
    """CellBench 5cl, top 2000 variable genes, obs 'batch' and 'cell_line'; generated stand-in if absent."""
    path = SHARED_DATA / "cellbench_5cl.h5ad"
    if path.exists():
        import anndata

        print(f"\n[data] using real CellBench data: {path}")
        return top_variable_genes(anndata.read_h5ad(path), 2000), "cellbench"
    print(
        "\n[data] ../shared/data is absent: using generated data (3 batches, 5 cell types) "
        "instead of CellBench"
    )
    generated = synthetic_iid(
        batch_size=303, n_genes=2000, n_batches=3, n_labels=5, sparse_format="csr_matrix", seed=5
    )
    generated.obs["cell_line"] = generated.obs["labels"]
    return generated, "generated"


@pytest.fixture(scope="session")
def trained():
    """A small model trained for 40 epochs with validation, shared by every module that asks for it
    (read-only: tests must not train it further or change its weights, AnnData or setup)."""
    settings.seed = 0
    data = synthetic_iid(batch_size=250, n_genes=150, n_batches=2, n_labels=3, seed=2)
    SCVI.setup_anndata(data, batch_key="batch", labels_key="labels")
    model = SCVI(data)
    model.train(max_epochs=40, check_val_every_n_epoch=5, enable_progress_bar=False)
    return model
