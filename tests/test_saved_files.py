"""Files saved by earlier versions of pyro-scvi load unchanged and give the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyro_scvi import SCVI, settings
from pyro_scvi.data import synthetic_iid

FIXTURE = Path(__file__).parent / "fixtures" / "saved_by_0.1.0"


def fixture_adata():
    """The AnnData the fixture model was trained on (tests/fixtures/README.md), generated again."""
    adata = synthetic_iid(batch_size=40, n_genes=30, n_batches=2, n_labels=3, seed=3)
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 3 == 0, "d1", "d2")
    adata.obs["score"] = np.linspace(0, 1, adata.n_obs)
    return adata


def same(a, b) -> bool:
    """Equality of nested registries (dicts, lists, NumPy arrays, scalars)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
        return a.shape == b.shape and all(same(x, y) for x, y in zip(a.ravel(), b.ravel()))
    return type(a) is type(b) and a == b


def test_a_model_saved_before_the_architecture_step_loads_with_the_same_outputs(tmp_path):
    model = SCVI.load(FIXTURE, fixture_adata())
    assert model.is_trained
    assert model.registry_["setup_args"]["categorical_covariate_keys"] == ["donor"]
    assert model.summary_stats["n_batch"] == 2 and model.summary_stats["n_vars"] == 30
    np.testing.assert_array_equal(model.get_latent_representation(), np.load(FIXTURE / "expected_latent.npy"))
    settings.seed = 0
    np.testing.assert_allclose(model.get_normalized_expression(return_numpy=True),
                               np.load(FIXTURE / "expected_normalized.npy"), rtol=1e-6, atol=0)
    # saved again by today's code, it reloads to the same weights and registry
    model.save(tmp_path / "again", save_anndata=True)
    again = SCVI.load(tmp_path / "again")
    assert same(again.registry_, model.registry_)
    for name, value in model.module.state_dict().items():
        assert np.array_equal(value.numpy(), again.module.state_dict()[name].numpy()), name
