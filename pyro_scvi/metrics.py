"""Small evaluation metrics for latent spaces (NumPy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["silhouette_score"]


def silhouette_score(X: np.ndarray, labels) -> float:
    """Mean silhouette width of ``X`` (n, d) under ``labels`` (n,), Euclidean distance.

    Same definition as ``sklearn.metrics.silhouette_score``: for each point, ``(b − a) / max(a, b)``
    with ``a`` the mean distance to its own cluster and ``b`` the smallest mean distance to another
    cluster; points in singleton clusters score 0. Memory is O(n²): meant for up to ~20k cells.
    """
    X = np.asarray(X, dtype=np.float64)
    codes, labels = np.unique(np.asarray(labels), return_inverse=True)
    if not 2 <= len(codes) <= len(X) - 1:
        raise ValueError(f"silhouette needs 2 ≤ n_labels ≤ n_samples − 1, got {len(codes)} labels for {len(X)} points.")
    squared = (X**2).sum(1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * X @ X.T, 0.0))
    one_hot = np.eye(len(codes))[labels]  # (n, K)
    sizes = one_hot.sum(0)
    sums = distances @ one_hot  # (n, K): summed distance to each cluster
    own = sizes[labels]
    a = sums[np.arange(len(X)), labels] / np.maximum(own - 1, 1)
    mean_to_other = sums / sizes
    mean_to_other[np.arange(len(X)), labels] = np.inf
    b = mean_to_other.min(1)
    width = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(width.mean())
