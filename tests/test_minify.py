"""Minified models: counts dropped, the stored posterior and library answer the queries."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_scvi import SCVI, settings


@pytest.fixture
def minified(trained):
    import copy

    model = copy.copy(trained)  # a shallow copy: shares the weights, not the AnnData slot
    model._instance_managers = dict(trained._instance_managers)
    adata = trained.adata.copy()
    model.adata = adata
    adata.obsm["X_latent_qzm"], adata.obsm["X_latent_qzv"] = model.get_latent_representation(return_dist=True)
    model.minify_adata()
    return model, adata


def test_minify_drops_counts_and_keeps_posterior(minified):
    model, original = minified
    assert model.minified_data_type == "latent_posterior_parameters"
    assert "Model's adata is minified?: True" in model.summary_string
    reduced = model.adata
    assert reduced is not original and sp.issparse(reduced.X) and reduced.X.nnz == 0
    assert original.X.sum() > 0  # the user's AnnData is untouched
    np.testing.assert_allclose(
        reduced.obs["observed_lib_size"], np.asarray(original.X.sum(1)).ravel(), rtol=1e-6
    )
    np.testing.assert_array_equal(model.get_latent_representation(), original.obsm["X_latent_qzm"])


def test_minified_queries_match_the_full_model(minified, trained):
    model, original = minified
    settings.seed = 3
    expected = trained.get_normalized_expression(
        original, library_size="latent", return_numpy=True, n_samples=30
    )
    settings.seed = 3
    ours = model.get_normalized_expression(library_size="latent", return_numpy=True, n_samples=30)
    # both draw z from the same Gaussian posterior (stored vs recomputed): equal up to Monte-Carlo noise
    np.testing.assert_allclose(ours.mean(0), expected.mean(0), rtol=0.05)
    params = model.get_likelihood_parameters(indices=[0, 1])
    assert params["mean"].shape == (2, original.n_vars)
    assert model.posterior_predictive_sample(indices=[0, 1]).shape == (2, original.n_vars)
    de = model.differential_expression(groupby="labels", group1="label_0", silent=True, n_samples_overall=200)
    assert isinstance(de, pd.DataFrame) and len(de) == original.n_vars


@pytest.mark.parametrize(
    "method", ["get_elbo", "get_reconstruction_error", "get_marginal_ll", "get_latent_library_size", "train"]
)
def test_methods_needing_counts_refuse(minified, method):
    model, _ = minified
    with pytest.raises(ValueError, match=f"SCVI.{method} function currently does not support minified data"):
        getattr(model, method)()


def test_minified_model_saves_and_loads(minified, tmp_path):
    model, _ = minified
    model.save(tmp_path / "mini", save_anndata=True)
    loaded = SCVI.load(tmp_path / "mini")
    assert loaded.minified_data_type == "latent_posterior_parameters"
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_minify_errors(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, use_observed_lib_size=False)
    with pytest.raises(ValueError, match="observed library size"):
        model.minify_adata()
    model = SCVI(adata)
    with pytest.raises(ValueError, match="X_latent_qzm"):
        model.minify_adata()
    with pytest.raises(ValueError, match="minified_data_type"):
        model.minify_adata("everything")
