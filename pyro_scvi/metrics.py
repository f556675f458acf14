"""Small evaluation metrics for latent spaces."""

from __future__ import annotations

import numpy as np
from sklearn import metrics

__all__ = ["silhouette_score"]


def silhouette_score(X: np.ndarray, labels) -> float:
    """Mean silhouette width of ``X`` (n, d) under ``labels`` (n,), Euclidean distance, in [−1, 1]
    (not rescaled).

    ``sklearn.metrics.silhouette_score`` on all points, in float64: for each point
    ``(b − a) / max(a, b)`` with ``a`` the mean distance to its own cluster and ``b`` the smallest
    mean distance to another cluster; points in singleton clusters score 0. Needs
    ``2 ≤ n_labels ≤ n − 1`` (``ValueError`` otherwise). The distances are computed in chunks;
    the time is O(n²): subsample beyond a few tens of thousands of cells.
    """
    return float(metrics.silhouette_score(np.asarray(X, dtype=np.float64), np.asarray(labels)))
