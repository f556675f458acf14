import numpy as np
import pytest

from pyro_scvi.metrics import silhouette_score


def test_silhouette_by_hand():
    # clusters {0, 1} and {10}: the singleton scores 0; point 0: a = 1, b = 10 -> 0.9; point 1: a = 1, b = 9
    X = np.array([[0.0], [1.0], [10.0]])
    expected = (0.9 + (9 - 1) / 9 + 0.0) / 3
    assert silhouette_score(X, ["a", "a", "b"]) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        silhouette_score(X, ["a", "b", "c"])  # needs 2 <= n_labels <= n - 1
