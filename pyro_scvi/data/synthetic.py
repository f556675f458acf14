"""Generated single-cell count data with known cell types, batch effects and marker genes.

Each cell type ``k`` has a log-expression profile; a subset of genes are markers whose log mean is
shifted by a known fold change. Each batch multiplies every gene by its own factor. Library sizes
are log-normal, counts negative binomial (optionally zero-inflated)::

    ρ_k      = softmax(β + Δ_k)                      Δ_kg ≠ 0 only for markers of k
    μ_ng     = s_n · ρ_{k_n, g} · γ_{b_n, g} / Σ_g(ρ_{k_n} γ_{b_n})
    x_ng     ~ NB(μ_ng, θ_g)   then set to 0 with probability ``dropout_ratio``
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["synthetic_iid"]


def synthetic_iid(
    batch_size: int = 200,
    n_genes: int = 100,
    n_batches: int = 2,
    n_labels: int = 3,
    dropout_ratio: float = 0.0,
    sparse_format: str | None = None,
    n_markers: int | None = None,
    log_fold_change: float = 2.0,
    batch_effect: float = 0.3,
    mean_library_size: float = 2000.0,
    seed: int | None = 0,
) -> anndata.AnnData:
    """An AnnData of ``batch_size · n_batches`` cells × ``n_genes`` genes with raw counts.

    ``obs["batch"]`` (``"batch_0"``, …) and ``obs["labels"]`` (``"label_0"``, …) are categorical;
    ``X`` and ``layers["counts"]`` hold the counts (dense, or ``"csr_matrix"``/``"csc_matrix"``).
    The truth is kept: ``var["marker_of"]`` (label of which a gene is a marker, or ``""``),
    ``varm["log_fold_change"]`` (``(G, n_labels)`` natural-log shift of each label's profile),
    ``varm["true_expression"]`` (``(G, n_labels)``: each label's normalized expression before the
    batch effects, columns sum to 1) and ``obs["library_size"]``.
    """
    if sparse_format not in (None, "csr_matrix", "csc_matrix"):
        raise ValueError(f"sparse_format must be None, 'csr_matrix' or 'csc_matrix', got {sparse_format!r}.")
    if n_genes < 2 or batch_size < 1 or n_batches < 1 or n_labels < 1:
        raise ValueError("synthetic_iid needs n_genes ≥ 2 and positive batch_size, n_batches, n_labels.")
    rng = np.random.default_rng(seed)
    n_cells = batch_size * n_batches
    n_markers = n_markers if n_markers is not None else max(1, n_genes // (5 * n_labels))

    baseline = rng.normal(0.0, 1.0, n_genes)
    shift = np.zeros((n_genes, n_labels))
    marker_of = np.full(n_genes, "", dtype=object)
    order = rng.permutation(n_genes)
    for k in range(n_labels):
        markers = order[k * n_markers : (k + 1) * n_markers]
        shift[markers, k] = log_fold_change * rng.choice([-1.0, 1.0], size=len(markers), p=[0.3, 0.7])
        marker_of[markers] = f"label_{k}"
    batch_factor = np.exp(rng.normal(0.0, batch_effect, (n_batches, n_genes)))
    theta = rng.gamma(4.0, 1.0, n_genes) + 0.5

    labels = rng.integers(0, n_labels, n_cells)
    batches = np.repeat(np.arange(n_batches), batch_size)
    library = rng.lognormal(np.log(mean_library_size), 0.3, n_cells)
    profile = np.exp(baseline[None, :] + shift.T[labels]) * batch_factor[batches]
    mean = library[:, None] * profile / profile.sum(1, keepdims=True)
    rate = rng.gamma(theta[None, :], mean / theta[None, :])
    counts = rng.poisson(rate).astype(np.float32)
    if dropout_ratio > 0:
        counts[rng.random(counts.shape) < dropout_ratio] = 0.0

    X = counts if sparse_format is None else getattr(sp, sparse_format)(counts)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"batch_{b}" for b in batches]),
            "labels": pd.Categorical([f"label_{k}" for k in labels]),
            "library_size": counts.sum(1),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"marker_of": marker_of.astype(str)}, index=[f"gene_{g}" for g in range(n_genes)])
    adata = anndata.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    adata.varm["log_fold_change"] = shift
    truth = np.exp(baseline[:, None] + shift)
    adata.varm["true_expression"] = truth / truth.sum(0, keepdims=True)
    return adata
