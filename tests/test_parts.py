"""The parts of ``pyro_scvi.api`` are reusable: a second model class composes them without copying."""

from __future__ import annotations

import numpy as np
import pytest

from pyro_scvi import SCVI, SCVIModule
from pyro_scvi.api.base import BaseModel
from pyro_scvi.api.evaluation import EvaluationMixin
from pyro_scvi.api.protocol import ModelProtocol
from pyro_scvi.api.queries import QueriesMixin
from pyro_scvi.api.saving import SavingMixin
from pyro_scvi.api.training import TrainingMixin
from pyro_scvi.data.manager import AnnDataManager
from pyro_scvi.data.registry import Registry, setup_registry


class TinyNB(TrainingMixin, QueriesMixin, EvaluationMixin, SavingMixin, BaseModel):
    """A second model class: scVI's module with a negative binomial, 16 hidden units and no labels."""

    _module_cls = SCVIModule
    _summary_params = ("n_latent",)

    def __init__(self, adata=None, registry=None, n_latent: int = 3, model_fn=None, guide_fn=None):
        self._init_state(adata, registry)
        self.init_params_ = {"non_kwargs": {"n_latent": n_latent}, "kwargs": {"kwargs": {}}}
        r = self.registry_
        self.module = SCVIModule(n_input=r.n_vars, n_batch=r.n_batch, n_labels=r.n_labels, n_hidden=16,
                                 n_latent=n_latent, gene_likelihood="nb")
        self.module.n_train_cells = r.n_cells

    @classmethod
    def setup_anndata(cls, adata, batch_key: str | None = None) -> None:
        registry = setup_registry(adata, batch_key=batch_key, model_name=cls.__name__)
        cls.register_manager(AnnDataManager(adata, registry))


def test_a_second_model_class_trains_queries_evaluates_and_saves_with_the_parts(adata, tmp_path):
    TinyNB.setup_anndata(adata, batch_key="batch")
    model = TinyNB(adata)
    assert isinstance(model, ModelProtocol) and isinstance(model.registry_, Registry)
    model.train(max_epochs=2, batch_size=100, enable_progress_bar=False)
    assert list(model.history["elbo_train"].index) == [0, 1]
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 3) and np.isfinite(latent).all()
    expression = model.get_normalized_expression(indices=np.arange(10), return_numpy=True)
    np.testing.assert_allclose(expression.sum(1), 1.0, rtol=1e-5)
    assert np.isfinite(model.get_marginal_ll(indices=np.arange(20), n_mc_samples=10))
    model.save(tmp_path / "tiny", save_anndata=True)
    loaded = TinyNB.load(tmp_path / "tiny")
    np.testing.assert_array_equal(loaded.get_latent_representation(), latent)
    assert "TinyNB model with the following parameters" in repr(loaded)
    with pytest.raises(ValueError, match="different class"):
        SCVI.load(tmp_path / "tiny")


def test_each_model_class_keeps_its_own_store_of_set_up_anndata(adata):
    class MySCVI(SCVI):
        pass

    MySCVI.setup_anndata(adata)
    uuid = adata.uns["_scvi_uuid"]
    assert uuid in MySCVI._setup_registries and uuid not in SCVI._setup_registries
    assert MySCVI._setup_registries is not SCVI._setup_registries
    with pytest.raises(ValueError, match=r"SCVI\.setup_anndata"):
        SCVI(adata)
    assert isinstance(MySCVI(adata, n_latent=2), SCVI)


def test_the_model_manager_is_built_once_and_follows_the_model_anndata(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=2)
    manager = model.adata_manager
    assert model.adata_manager is manager and manager.adata is adata
    assert model.get_anndata_manager(adata) is manager
    copy = adata.copy()
    model.adata = copy
    assert model.adata_manager is not manager and model.adata_manager.adata is copy
