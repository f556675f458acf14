"""Guide families, SCVI(adata, guide="normal" | "full_rank" | "flow"): densities against the change
of variables, training, queries, save/load, and the refusals of what a family cannot do."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from torch.distributions import kl_divergence

from pyro_scvi import SCVI, settings
from pyro_scvi.data import synthetic_iid
from pyro_scvi.guides import z_posterior
from pyro_scvi.infer.posterior import variational_posterior
from pyro_scvi.models.module import GUIDES

torch.set_num_threads(2)
SMALL = dict(n_hidden=32, n_latent=4)


def _setup(adata):
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    return adata


def _model(adata, guide, seed=0, **kwargs):
    settings.seed = seed
    return SCVI(_setup(adata), guide=guide, **{**SMALL, **kwargs})


def _batch(model, n=25):
    return model.registered_data()[1].minibatch(np.arange(n))


def _randomise(module, prefix, seed=1):
    """Random non-zero values for the zero-initialised heads (so the densities are not mean-field)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(prefix):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def _posterior(model, batch):
    model.module.eval()
    with model.pyro_scope(), torch.no_grad():
        return variational_posterior(model.module.guide, batch)


def _encode(model, batch):
    with torch.no_grad():
        encoder_input, covariates = model.module.encoder_input(batch)
        return model.module.z_encoder.encode(encoder_input, *covariates)  # h, loc, scale


@pytest.fixture(scope="module")
def trained_models():
    """One model per guide, trained 3 epochs on the 600 × 200 generated data (read-only)."""
    models = {}
    for guide in GUIDES:
        data = synthetic_iid(batch_size=300, n_genes=200, n_batches=2, n_labels=3, seed=1)
        model = _model(data, guide)
        model.train(max_epochs=3, enable_progress_bar=False)
        models[guide] = model
    return models


# ------------------------------------------------------------------ densities


def test_normal_guide_log_prob_is_diagonal_gaussian(adata):
    model = _model(adata, "normal")
    batch = _batch(model)
    qz = _posterior(model, batch)
    _, loc, scale = _encode(model, batch)
    z = qz.sample((3,))  # (3, n, d)
    with torch.no_grad():
        ours = qz.log_prob(z).sum(-1)  # variational_posterior strips the Independent: (3, n, d) → (3, n)
    for i in range(batch.n_cells):
        covariance = np.diag(scale[i].numpy() ** 2)
        expected = stats.multivariate_normal(loc[i].numpy(), covariance).logpdf(z[:, i].numpy())
        np.testing.assert_allclose(ours[:, i].numpy(), expected, rtol=1e-5, atol=1e-4)


def test_full_rank_guide_log_prob_is_the_gaussian_of_its_cholesky_factor(adata):
    model = _model(adata, "full_rank")
    _randomise(model.module, "z_cholesky.")
    batch = _batch(model)
    qz = _posterior(model, batch)
    assert isinstance(qz, dist.MultivariateNormal)
    h, loc, scale = _encode(model, batch)
    head = model.module.z_cholesky.off_diagonal
    with torch.no_grad():
        off = (h @ head.weight.T + head.bias).numpy()
        z = qz.sample((3,)) + torch.randn(3, batch.n_cells, 4)  # draws and points the guide did not make
        ours = qz.log_prob(z).numpy()
    rows, cols = np.tril_indices(4, k=-1)
    for i in range(batch.n_cells):
        factor = np.diag(scale[i].numpy())
        factor[rows, cols] = off[i]
        expected = stats.multivariate_normal(loc[i].numpy(), factor @ factor.T).logpdf(z[:, i].numpy())
        np.testing.assert_allclose(ours[:, i], expected, rtol=1e-5, atol=1e-4)


def test_full_rank_with_zero_off_diagonal_equals_normal_and_shares_its_weights(adata):
    normal, full = _model(adata, "normal"), _model(adata, "full_rank")
    shared = normal.module.state_dict()
    state = full.module.state_dict()
    assert set(state) - set(shared) == {"z_cholesky.off_diagonal.weight", "z_cholesky.off_diagonal.bias"}
    for name, value in shared.items():
        assert torch.equal(value, state[name]), name
    batch = _batch(normal)
    q_normal, q_full = _posterior(normal, batch), _posterior(full, batch)
    z = torch.randn(5, batch.n_cells, 4)
    with torch.no_grad():
        np.testing.assert_allclose(q_full.log_prob(z), q_normal.log_prob(z).sum(-1), rtol=1e-5, atol=1e-5)


def test_full_rank_kl_to_the_normal_prior_is_analytic():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4)
    q = dist.MultivariateNormal(torch.randn(3, 4), scale_tril=torch.linalg.cholesky(a @ a.mT + torch.eye(4)))
    loc, scale = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    diagonal = dist.Normal(loc, scale).to_event(1)
    expected = kl_divergence(q, dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)))
    torch.testing.assert_close(kl_divergence(q, diagonal), expected)


def _flow_log_prob_by_hand(module, h, loc, scale, z):
    """log N(z_0; μ, σ) − Σ_k log|det ∂f_k| with each coupling inverted by hand (reversed between
    layers, and at the end for an even number of layers)."""
    flow = module.z_flow
    log_det = torch.zeros(z.shape[:-1])
    y = z.flip(-1) if len(flow.couplings) % 2 == 0 else z
    for k in reversed(range(len(flow.couplings))):
        coupling = flow.couplings[k]
        split = coupling.split_dim
        kept, moved = y[..., :split], y[..., split:]
        shift, log_scale = coupling.nn(kept, context=h)
        log_scale = log_scale.clamp(-5.0, 3.0)  # AffineCoupling's default clips
        y = torch.cat([kept, (moved - shift) * torch.exp(-log_scale)], dim=-1)
        log_det = log_det + log_scale.sum(-1)
        if k > 0:
            y = y.flip(-1)  # the reversal is its own inverse
    base = torch.distributions.Normal(loc, scale).log_prob(y).sum(-1)
    return base - log_det


@pytest.mark.parametrize("latent_distribution", ["normal", "ln"])
def test_flow_guide_log_prob_is_the_change_of_variables(adata, latent_distribution):
    model = _model(adata, "flow", n_flows=2 if latent_distribution == "ln" else 3,
                   latent_distribution=latent_distribution)
    _randomise(model.module, "z_flow.")
    batch = _batch(model)
    qz = _posterior(model, batch)
    h, loc, scale = _encode(model, batch)
    with torch.no_grad():
        drawn = qz.sample((3,))  # (3, n, d): the flow's own draws (cached inverse) ...
        others = drawn + torch.randn_like(drawn)  # ... and points it did not make (exact inverse)
        for z in (drawn, others):
            expected = _flow_log_prob_by_hand(model.module, h, loc, scale, z)
            torch.testing.assert_close(qz.log_prob(z), expected, rtol=1e-4, atol=5e-4)  # float32 rounding
        assert not torch.allclose(qz.log_prob(others), dist.Normal(loc, scale).log_prob(others).sum(-1))


def test_guides_start_as_the_mean_field_guide(adata):
    """The zero-initialised heads make every family equal the normal guide at initialisation."""
    normal, flow = _model(adata, "normal"), _model(adata, "flow")
    batch = _batch(normal)
    z = torch.randn(4, batch.n_cells, 4)
    with torch.no_grad():
        np.testing.assert_allclose(_posterior(flow, batch).log_prob(z),
                                   _posterior(normal, batch).log_prob(z).sum(-1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ construction


def test_unknown_guide_lists_the_choices(adata):
    with pytest.raises(ValueError, match="'normal', 'full_rank', 'flow'"):
        _model(adata, "iaf")
    with pytest.raises(ValueError, match="n_latent >= 2"):
        _model(adata, "flow", n_latent=1)
    with pytest.raises(ValueError, match="n_flows"):
        _model(adata, "flow", n_flows=0)


def test_flow_networks_are_owned_by_the_module(adata):
    model = _model(adata, "flow", n_flows=2)
    names = [name for name, _ in model.module.named_parameters() if name.startswith("z_flow.")]
    assert len(names) == 12  # 2 couplings × (shift matrix + 2 tanh-network layers) × (weight, bias)
    assert all(name in model.module.state_dict() for name in names)
    assert model.init_params_["kwargs"]["kwargs"] == {"guide": "flow", "n_flows": 2}


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("config", [{}, {"latent_distribution": "ln"}, {"use_observed_lib_size": False}],
                         ids=["normal-latent", "ln", "latent-library"])
def test_training_each_guide(adata, guide, config):
    model = _model(adata, guide, gene_likelihood="zinb", **config)
    before = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    model.train(max_epochs=3, batch_size=128, enable_progress_bar=False, check_val_every_n_epoch=1)
    elbo = model.history["elbo_train"].values.ravel()
    assert np.isfinite(elbo).all() and elbo[-1] < elbo[0]
    assert np.isfinite(model.history["elbo_validation"].values).all()
    for name, value in model.module.named_parameters():
        if name.startswith(("z_cholesky.", "z_flow.")):
            assert not torch.equal(value, before[name]), f"{name} did not train"
    if config.get("use_observed_lib_size") is False:
        assert model.get_latent_library_size().shape == (adata.n_obs, 1)
    assert np.isfinite(model.get_latent_representation(mc_samples=50)).all()


# ------------------------------------------------------------------ queries


@pytest.mark.parametrize("guide", GUIDES)
def test_latent_representation_shapes(trained_models, guide):
    model = trained_models[guide]
    n = model.adata.n_obs
    settings.seed = 2
    mean = model.get_latent_representation(mc_samples=2000)
    sample = model.get_latent_representation(give_mean=False)
    loc, variance = model.get_latent_representation(return_dist=True, mc_samples=2000)
    assert mean.shape == sample.shape == loc.shape == variance.shape == (n, 4)
    assert (variance > 0).all() and np.isfinite(sample).all()
    if guide == "flow":  # two Monte-Carlo estimates of the same mean
        assert np.abs(mean - loc).mean() < 0.05
    else:
        np.testing.assert_array_equal(mean, loc)


def test_full_rank_variance_is_the_diagonal_of_the_covariance(trained_models):
    model = trained_models["full_rank"]
    _, variance = model.get_latent_representation(indices=np.arange(20), return_dist=True)
    qz = _posterior(model, _batch(model, 20))
    np.testing.assert_allclose(variance, torch.diagonal(qz.covariance_matrix, dim1=-2, dim2=-1), rtol=1e-5)
    assert not np.allclose(variance, qz.scale_tril.diagonal(dim1=-2, dim2=-1).pow(2))  # trained off-diagonals


def test_flow_moments_are_monte_carlo_estimates(trained_models):
    model = trained_models["flow"]
    settings.seed = 3
    loc, variance = model.get_latent_representation(indices=np.arange(20), return_dist=True, mc_samples=4000)
    qz = _posterior(model, _batch(model, 20))
    with torch.no_grad():
        draws = qz.sample((4000,))
    standard_error = np.sqrt(2 * variance / 4000)  # of the difference of two independent estimates
    assert (np.abs(loc - draws.mean(0).numpy()) < 5 * standard_error).all()
    np.testing.assert_allclose(variance, draws.var(0), rtol=0.15, atol=1e-3)


@pytest.mark.parametrize("guide", ["full_rank", "flow"])
def test_to_arviz_and_differential_expression(trained_models, guide):
    model = trained_models[guide]
    settings.seed = 4
    idata = model.to_arviz(indices=np.arange(30), n_samples=10)
    assert idata.posterior["z"].shape == (1, 10, 30, 4)
    assert np.isfinite(idata.log_likelihood["x"].values).all()
    de = model.differential_expression(groupby="labels", group1="label_0", n_samples_overall=200)
    assert de.shape[0] == model.adata.n_vars and np.isfinite(de["bayes_factor"]).all()
    # importance weights use the guide's joint density of z (summed over dimensions once, whatever the
    # family): normalised and finite. After 3 epochs they are poor for every family (k̂ 1.5–2.8 over
    # seeds, with the largest weight 0.5–0.9999), and the warning says so
    cells = np.arange(40)
    z = torch.as_tensor(model.get_latent_representation(indices=cells, give_mean=False), dtype=torch.float32)
    with pytest.warns(UserWarning, match="Pareto"):
        weights, pareto_k = model.get_importance_weights(model.adata, cells, z, max_cells=40, n_mc_samples=20,
                                                         return_pareto_k=True)
    assert weights.shape == (40,) and np.isfinite(weights).all() and np.isfinite(pareto_k)
    assert weights.sum() == pytest.approx(1.0) and pareto_k > 0.7
    # the default (refined) proposal, on few cells and draws: the defaults (all 600 cells, 500 draws,
    # 50 refinement steps) cost most of this test's time and check nothing more
    de = model.differential_expression(groupby="labels", group1="label_0", n_samples_overall=200,
                                       weights="importance", importance_weighting_kwargs={
                                           "max_cells": 40, "n_mc_samples": 20, "refine_steps": 5})
    assert np.isfinite(de["bayes_factor"]).all()


# ------------------------------------------------------------------ files, minification, mapping


@pytest.mark.parametrize("guide", GUIDES)
def test_save_load_round_trip(trained_models, guide, tmp_path):
    model = trained_models[guide]
    model.save(tmp_path / guide)
    loaded = SCVI.load(tmp_path / guide, model.adata)
    assert loaded.module.guide_family == guide
    assert set(loaded.module.state_dict()) == set(model.module.state_dict())
    for seed in (5,):
        settings.seed = seed
        expected = model.get_latent_representation(mc_samples=100)
        settings.seed = seed
        np.testing.assert_array_equal(loaded.get_latent_representation(mc_samples=100), expected)


@pytest.mark.parametrize("guide", ["full_rank", "flow"])
def test_scvi_tools_export_and_minify_refuse_other_guides(trained_models, guide, tmp_path):
    model = trained_models[guide]
    with pytest.raises(ValueError, match=f"guide='{guide}'"):
        model.save(tmp_path / "st", scvi_tools_format=True)
    assert not (tmp_path / "st" / "model.pt").exists()
    adata = model.adata
    adata.obsm["X_latent_qzm"], adata.obsm["X_latent_qzv"] = model.get_latent_representation(return_dist=True)
    with pytest.raises(ValueError, match=f"minify_adata .*guide='{guide}'"):
        model.minify_adata()
    assert model.minified_data_type is None


@pytest.mark.parametrize("guide", ["full_rank", "flow"])
def test_load_query_data(guide):
    settings.seed = 0
    data = synthetic_iid(batch_size=150, n_genes=60, n_batches=3, n_labels=3, seed=4)
    reference = _setup(data[data.obs["batch"] != "batch_2"].copy())
    query = data[data.obs["batch"] == "batch_2"].copy()
    model = SCVI(reference, guide=guide, encode_covariates=True, **SMALL)
    model.train(max_epochs=2, enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mapped = SCVI.load_query_data(query, model)
    assert mapped.module.guide_family == guide
    prefix = "z_cholesky." if guide == "full_rank" else "z_flow."
    heads = {k: v.detach().clone() for k, v in mapped.module.named_parameters() if k.startswith(prefix)}
    assert heads and all(name in mapped.module.frozen_parameters for name in heads)  # like the loc/var heads
    mapped.train(max_epochs=2, enable_progress_bar=False)
    for name, value in heads.items():
        assert torch.equal(dict(mapped.module.named_parameters())[name], value), name
    assert mapped.get_latent_representation(mc_samples=50).shape == (query.n_obs, 4)
    unfrozen = SCVI.load_query_data(query, model, unfrozen=True)
    unfrozen.train(max_epochs=1, enable_progress_bar=False)
    assert any(not torch.equal(v, heads[k]) for k, v in unfrozen.module.named_parameters() if k in heads)


def test_custom_guide_reuses_a_family(adata):
    """guide_fn replaces the built-in guide; with guide="flow" it can reuse the module's flow."""

    def flow_guide(module, batch, transform_batch=None):
        pyro.module("scvi", module)
        with pyro.plate("cells", batch.n_cells, dim=-1):
            encoder_input, covariates = module.encoder_input(batch)
            pyro.sample("z", z_posterior(module, encoder_input, covariates))  # (n, d)

    model = _model(adata, "flow", guide_fn=flow_guide)
    before = {k: v.detach().clone() for k, v in model.module.named_parameters() if k.startswith("z_flow.")}
    model.train(max_epochs=2, batch_size=128, enable_progress_bar=False)
    assert model.module.has_custom_guide
    assert any(not torch.equal(v, before[k]) for k, v in model.module.named_parameters() if k in before)
    assert model.get_latent_representation(mc_samples=50).shape == (adata.n_obs, 4)
