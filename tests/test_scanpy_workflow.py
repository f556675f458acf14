"""The workflow around the model: scanpy's gene selection before it, and neighbours, UMAP and Leiden
clustering on its latent space after it (``adata.obsm["X_scVI"]``).

Most of this test's time is one-off: importing scanpy and numba compiling umap-learn's code on the
first ``sc.pp.neighbors`` and ``sc.tl.umap`` calls of the process (about 15 s on 2 CPU threads).

On CellBench 5cl the five cell lines are a ground truth independent of expression: Leiden clusters of
the scVI latent space must recover them, and the same pipeline on a latent space of noise must not.
Without ../shared/data the generated stand-in (5 cell types) is used and the output says so.
"""

from __future__ import annotations

import time

import anndata
import numpy as np
import pytest
from conftest import SHARED_DATA
from sklearn.metrics import adjusted_rand_score

from pyro_scvi import SCVI, pp, settings
from pyro_scvi.data import synthetic_iid

sc = pytest.importorskip("scanpy")
pytest.importorskip("leidenalg")
pytest.importorskip("igraph")
pytest.importorskip("umap")


def _counts():
    path = SHARED_DATA / "cellbench_5cl.h5ad"
    if path.exists():
        print(f"\n[data] using real CellBench data: {path}")
        return anndata.read_h5ad(path), "cellbench"
    print("\n[data] ../shared/data is absent: using generated data (3 batches, 5 cell types)")
    generated = synthetic_iid(batch_size=303, n_genes=2000, n_batches=3, n_labels=5,
                              sparse_format="csr_matrix", seed=5)
    generated.obs["cell_line"] = generated.obs["labels"]
    return generated, "generated"


def _leiden(adata, key: str) -> np.ndarray:
    sc.pp.neighbors(adata, use_rep=key, n_neighbors=15, random_state=0)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, resolution=0.3, random_state=0)
    return adata.obs["leiden"].to_numpy()


def test_neighbours_umap_and_leiden_on_the_scvi_latent_recover_cell_lines():
    start = time.perf_counter()
    adata, source = _counts()
    pp.highly_variable_genes(adata, 1000, batch_key="batch", subset=True)
    settings.seed = 0
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=10)
    model.train(max_epochs=15, batch_size=256, enable_progress_bar=False)
    trained = time.perf_counter()
    adata.obsm["X_scVI"] = model.get_latent_representation()
    leiden = _leiden(adata, "X_scVI")
    sc.tl.umap(adata, random_state=0)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2) and np.isfinite(adata.obsm["X_umap"]).all()
    assert "connectivities" in adata.obsp and adata.obsp["connectivities"].shape == (adata.n_obs,) * 2
    ari = adjusted_rand_score(adata.obs["cell_line"], leiden)
    plates = adjusted_rand_score(adata.obs["batch"], leiden)

    noise = adata.copy()  # the same pipeline on a latent space that carries nothing
    noise.obsm["X_scVI"] = np.random.default_rng(0).normal(size=adata.obsm["X_scVI"].shape)
    broken = adjusted_rand_score(noise.obs["cell_line"], _leiden(noise, "X_scVI"))
    print(f"[{source}] Leiden ({len(set(leiden))} clusters) vs cell line: ARI {ari:.3f}; vs plate "
          f"{plates:.3f}; noise latent {broken:.3f}; selection and training {trained - start:.1f} s, scanpy "
          f"{time.perf_counter() - trained:.1f} s (its first neighbours call compiles numba code)")
    assert ari > 0.8
    assert plates < 0.1 and broken < 0.1
