"""Posterior API: likelihood parameters, posterior predictive sampling, gene correlations, batch embedding."""

import numpy as np
import pytest
import torch

from pyro_scvi import SCVI, settings


def test_likelihood_parameters_are_consistent_with_the_model(trained):
    settings.seed = 5
    params = trained.get_likelihood_parameters()
    settings.seed = 5
    scale = trained.get_normalized_expression(return_numpy=True)
    totals = np.asarray(trained.adata.X.sum(1)).reshape(-1, 1)
    np.testing.assert_allclose(params["mean"], scale * totals, rtol=1e-4)
    theta = trained.module.log_dispersion.exp().detach().numpy()
    np.testing.assert_allclose(params["dispersions"], np.broadcast_to(theta, params["mean"].shape), rtol=1e-6)
    assert ((params["dropout"] > 0) & (params["dropout"] < 1)).all()
    many = trained.get_likelihood_parameters(n_samples=4, indices=[0, 1, 2])
    assert many["mean"].shape == (4, 3, trained.adata.n_vars)
    assert (
        trained.get_likelihood_parameters(n_samples=4, give_mean=True, indices=[0, 1, 2])["mean"].shape
        == (3, trained.adata.n_vars)
    )


@pytest.mark.parametrize(
    "likelihood, keys",
    [("poisson", {"mean"}), ("normal", {"mean", "dispersions"}), ("nb", {"mean", "dispersions"})],
)
def test_likelihood_parameters_for_every_likelihood(adata, likelihood, keys):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, gene_likelihood=likelihood, n_hidden=16)
    model.train(max_epochs=1, enable_progress_bar=False)
    params = model.get_likelihood_parameters()
    assert set(params) == keys and all(np.isfinite(v).all() for v in params.values())
    if likelihood == "normal":
        np.testing.assert_allclose(
            params["dispersions"][0], model.module.log_dispersion.exp().detach().numpy(), rtol=1e-6
        )


def test_posterior_predictive_matches_the_likelihood_mean(trained):
    indices = np.arange(40)
    draws = trained.posterior_predictive_sample(indices=indices, n_samples=300)
    assert draws.shape == (40, trained.adata.n_vars, 300)
    dense = draws.todense()
    assert (dense >= 0).all() and np.array_equal(dense, np.round(dense))
    params = trained.get_likelihood_parameters(indices=indices, n_samples=300, give_mean=True)
    expected = ((1 - params["dropout"]) * params["mean"]).sum(0)  # per gene, summed over cells
    observed = dense.mean(-1).sum(0)
    busy = expected > 20
    np.testing.assert_allclose(observed[busy], expected[busy], rtol=0.1)
    one = trained.posterior_predictive_sample(indices=[0, 1], gene_list=list(trained.adata.var_names[:5]))
    assert one.shape == (2, 5)


def test_feature_correlation_matrix(trained):
    genes = trained.adata.n_vars
    pearson = trained.get_feature_correlation_matrix(n_samples=5, correlation_type="pearson")
    assert pearson.shape == (genes, genes) and list(pearson.index) == list(trained.adata.var_names)
    np.testing.assert_allclose(np.diag(pearson), 1.0, rtol=1e-6)
    np.testing.assert_allclose(pearson.to_numpy(), pearson.to_numpy().T, atol=1e-10)
    spearman = trained.get_feature_correlation_matrix(n_samples=5, transform_batch=["batch_0", "batch_1"])
    assert np.abs(spearman.to_numpy()).max() <= 1 + 1e-9
    # genes that mark the same cell type co-vary in the denoised expression
    marker = trained.adata.var["marker_of"].to_numpy()
    same = [(i, j) for i in range(genes) for j in range(i) if marker[i] and marker[i] == marker[j]]
    unrelated = [(i, j) for i in range(genes) for j in range(i) if not marker[i] and not marker[j]]
    mean_abs = lambda pairs: np.mean([abs(spearman.iat[i, j]) for i, j in pairs])  # noqa: E731
    assert mean_abs(same) > mean_abs(unrelated)
    with pytest.raises(ValueError, match="correlation_type"):
        trained.get_feature_correlation_matrix(correlation_type="kendall")


def test_batch_embedding_representation(adata, tmp_path):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(
        adata,
        batch_representation="embedding",
        batch_embedding_kwargs={"embedding_dim": 3},
        encode_covariates=True,
        n_hidden=16,
    )
    assert model.module.decoder.hidden.fc_layers[0][0].in_features == 10 + 3
    model.train(max_epochs=2, enable_progress_bar=False)
    rep = model.get_batch_representation()
    codes = adata.obs["_scvi_batch"].to_numpy()
    np.testing.assert_array_equal(rep, model.module.batch_embedding.weight.detach().numpy()[codes])
    model.save(tmp_path / "emb")
    loaded = SCVI.load(tmp_path / "emb", adata=adata)
    np.testing.assert_array_equal(loaded.get_batch_representation(), rep)
    with pytest.raises(KeyError, match="one-hot"):
        SCVI(adata).get_batch_representation()


def test_importance_weighted_expression(trained):
    cells = np.flatnonzero(trained.adata.obs["labels"].to_numpy() == "label_0")[:60]
    weighted = trained.get_normalized_expression(indices=cells, n_samples_overall=400, weights="importance",
                                                 max_cells=60, n_mc_samples=50)
    uniform = trained.get_normalized_expression(indices=cells, n_samples_overall=400)
    assert weighted.shape == uniform.shape == (400, trained.adata.n_vars)
    np.testing.assert_allclose(weighted.sum(1), 1.0, rtol=1e-4)
    assert np.corrcoef(weighted.mean(0), uniform.mean(0))[0, 1] > 0.9  # a correction, not a different answer
    z = torch.randn(30, 10)
    w = trained.get_importance_weights(None, cells, z, max_cells=20, n_mc_samples=20)
    assert w.shape == (30,) and np.isclose(w.sum(), 1.0) and (w >= 0).all()
    with pytest.raises(ValueError, match="single transform_batch"):
        trained.get_normalized_expression(
            n_samples_overall=10, weights="importance", transform_batch=["batch_0", "batch_1"]
        )
    with pytest.raises(ValueError, match="weights must be"):
        trained.get_normalized_expression(weights="magic")
