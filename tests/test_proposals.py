"""Importance-sampling proposals of the marginal likelihood ("guide", "defensive", "refined") and the
PSIS-smoothed importance weights of expression and DE.

The proposals are checked on a conjugate toy with the shapes of scVI (a ``"cells"`` plate, ``z`` with
event dim 1, ``x`` with event dim 1): z ~ N(0, I), x | z ~ N(Wz + b, σ²I), so that
p(x) = N(b, WWᵀ + σ²I) and p(z | x) = N(ΣWᵀ(x − b)/σ², Σ) with Σ = (I + WᵀW/σ²)⁻¹ in closed form.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal

from pyro_scvi import SCVI, diagnostics, settings
from pyro_scvi.data import synthetic_iid
from pyro_scvi.data.minibatch import Minibatch
from pyro_scvi.infer.importance import log_importance_weights_in_passes, marginal_log_likelihood
from pyro_scvi.infer.proposals import DefensiveMixture, refined_proposal

torch.set_num_threads(2)
SIGMA = 0.5
N_CELLS, N_GENES = 8, 5
# orthogonal columns: WᵀW is diagonal, so the exact posterior is a diagonal Gaussian
W_ORTHO = torch.tensor([[1.0, 0.5], [1.0, -0.5], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
W_CORR = torch.tensor([[1.0, 0.8], [0.7, 1.0], [0.2, -0.4], [1.2, 0.9], [0.5, 0.1]], dtype=torch.float64)
B = torch.tensor([0.3, -0.2, 0.0, 1.0, -1.0], dtype=torch.float64)


def _model(w):
    def model(batch, **kwargs):
        with pyro.plate("cells", batch.n_cells, dim=-1):
            loc = torch.zeros(w.shape[1], dtype=torch.float64)
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))  # (n, d)
            pyro.sample("x", dist.Normal(z @ w.T + B, SIGMA).to_event(1), obs=batch.x)  # (n, G)

    return model


def _posterior(w, x):
    """Exact posterior mean (n, d) and covariance (d, d)."""
    cov = torch.linalg.inv(torch.eye(w.shape[1], dtype=torch.float64) + w.T @ w / SIGMA**2)
    return (x - B) @ w @ cov / SIGMA**2, cov


def _evidence(w, x):
    cov = (w @ w.T + SIGMA**2 * torch.eye(w.shape[0], dtype=torch.float64)).numpy()
    return torch.as_tensor(multivariate_normal(B.numpy(), cov).logpdf(x.numpy()))


def _guide(w, shift=0.0, scale_factor=1.0, full_rank=False):
    """The exact posterior, its loc shifted by ``shift`` and its scale multiplied by ``scale_factor``."""

    def guide(batch, **kwargs):
        mean, cov = _posterior(w, batch.x)
        with pyro.plate("cells", batch.n_cells, dim=-1):
            if full_rank:
                fn = dist.MultivariateNormal(mean + shift, cov * scale_factor**2)
            else:
                fn = dist.Normal(mean + shift, cov.diagonal().sqrt() * scale_factor).to_event(1)
            pyro.sample("z", fn)

    return guide


def _batch(w, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(N_CELLS, w.shape[1], generator=generator, dtype=torch.float64)
    x = z @ w.T + B + SIGMA * torch.randn(N_CELLS, w.shape[0], generator=generator, dtype=torch.float64)
    zeros = torch.zeros((N_CELLS, 1), dtype=torch.long)
    return Minibatch(x=x, batch_index=zeros, labels=zeros, log_library=torch.zeros((N_CELLS, 1)))


def _weights(w, guide, proposal, n=2000, seed=0, **options):
    pyro.set_rng_seed(seed)
    return log_importance_weights_in_passes(_model(w), guide, _batch(w), n, proposal=proposal, **options)


# ------------------------------------------------------------------------------------- conjugate toy
@pytest.mark.parametrize(
    "proposal, full_rank",
    [("guide", False), ("defensive", False), ("refined", False), ("guide", True), ("defensive", True)],
)
def test_every_proposal_matches_the_closed_form(proposal, full_rank):
    w = W_CORR if full_rank else W_ORTHO
    batch = _batch(w)
    guide = _guide(w, shift=0.2, scale_factor=1.3, full_rank=full_rank)
    pyro.set_rng_seed(1)
    estimate = marginal_log_likelihood(_model(w), guide, batch, 4000, proposal=proposal)
    assert estimate.shape == (N_CELLS,)
    pyro.set_rng_seed(1)
    log_weights = log_importance_weights_in_passes(_model(w), guide, batch, 4000, proposal=proposal)
    torch.testing.assert_close(estimate, torch.logsumexp(log_weights, 0) - np.log(4000))  # same draws
    # the standard error of log p̂ is about sqrt(1 / ESS − 1 / S): allow 4 of them
    tolerance = 4 * np.sqrt(1 / diagnostics.effective_sample_size(log_weights))
    assert (tolerance < 0.15).all()
    error = (estimate - _evidence(w, batch.x)).abs().numpy()
    assert (error < tolerance).all(), (error, tolerance)


def test_a_diagonal_refinement_of_a_correlated_posterior_is_flagged_by_pareto_k():
    """A diagonal refinement of a posterior with correlation −0.8 reaches the mean-field ELBO optimum,
    too narrow across the correlation; the estimate is biased low and k̂ says so."""
    guide = _guide(W_CORR, shift=0.2, scale_factor=1.3, full_rank=True)
    k_guide = diagnostics.psis_diagnostics(_weights(W_CORR, guide, "guide", 4000)).pareto_k
    log_weights = _weights(W_CORR, guide, "refined", 4000, refine_widening=1.0, refine_covariance="diagonal")
    k_refined = diagnostics.psis_diagnostics(log_weights).pareto_k
    estimate = torch.logsumexp(log_weights, 0) - np.log(4000)
    error = (estimate - _evidence(W_CORR, _batch(W_CORR).x)).numpy()
    assert (np.abs(error) < 0.3).all() and np.median(error) < 0
    assert (k_guide < 0.5).all() and np.median(k_refined) > 0.5


@pytest.mark.parametrize("df", [None, 5.0])
def test_a_full_refinement_follows_the_correlation(df):
    """The default refinement has a full covariance: from a diagonal, shifted guide it reaches the
    correlated posterior, with reliable weights and the exact evidence (Gaussian or Student-t)."""
    guide = _guide(W_CORR, shift=0.5, scale_factor=0.5)
    k_guide = diagnostics.psis_diagnostics(_weights(W_CORR, guide, "guide", 4000)).pareto_k
    log_weights = _weights(W_CORR, guide, "refined", 4000, refine_steps=100, refine_lr=0.05, refine_df=df)
    k_refined = diagnostics.psis_diagnostics(log_weights).pareto_k
    estimate = torch.logsumexp(log_weights, 0) - np.log(4000)
    error = (estimate - _evidence(W_CORR, _batch(W_CORR).x)).numpy()
    assert np.median(k_guide) > 0.7 and (k_refined < 0.5).all()
    assert (np.abs(error) < 0.05).all()


def test_the_exact_posterior_gives_the_exact_marginal_likelihood():
    batch = _batch(W_ORTHO)
    evidence = _evidence(W_ORTHO, batch.x)
    guide_weights = _weights(W_ORTHO, _guide(W_ORTHO), "guide", 500)
    np.testing.assert_allclose(guide_weights.numpy(), evidence.expand(500, N_CELLS).numpy(), atol=1e-10)
    assert (diagnostics.psis_diagnostics(guide_weights).pareto_k < 0.5).all()
    for proposal in ("defensive", "refined"):
        log_weights = _weights(W_ORTHO, _guide(W_ORTHO), proposal, 2000)
        estimate = torch.logsumexp(log_weights, 0) - np.log(2000)
        tolerance = 4 * np.sqrt(1 / diagnostics.effective_sample_size(log_weights))
        assert (tolerance < 0.15).all() and ((estimate - evidence).abs().numpy() < tolerance).all()
        assert (diagnostics.psis_diagnostics(log_weights).pareto_k < 0.5).all()


def test_defensive_mixture_has_lighter_tails_than_a_too_narrow_guide():
    narrow = _guide(W_ORTHO, scale_factor=0.2)
    k_guide = diagnostics.psis_diagnostics(_weights(W_ORTHO, narrow, "guide")).pareto_k
    k_defensive = diagnostics.psis_diagnostics(_weights(W_ORTHO, narrow, "defensive")).pareto_k
    assert np.median(k_guide) > 0.7
    assert np.median(k_defensive) < np.median(k_guide) - 0.3 and (k_defensive < k_guide).mean() >= 0.75
    # a Normal wide component is defensive too, less so
    normal_weights = _weights(W_ORTHO, narrow, "defensive", defensive_df=None)
    k_normal = diagnostics.psis_diagnostics(normal_weights).pareto_k
    assert np.median(k_normal) < np.median(k_guide)


def test_refinement_moves_a_wrong_guide_towards_the_posterior():
    batch = _batch(W_ORTHO)
    mean, cov = _posterior(W_ORTHO, batch.x)
    wrong = _guide(W_ORTHO, shift=1.5, scale_factor=0.5)
    pyro.set_rng_seed(0)
    refined = refined_proposal(_model(W_ORTHO), wrong, batch, steps=100, lr=0.05, widening=1.0)["z"]
    assert isinstance(refined, dist.MultivariateNormal)
    assert refined.loc.shape == (N_CELLS, 2) and not refined.loc.requires_grad
    error = (refined.loc - mean).abs().max()
    assert error < 0.3 * 1.5
    scale_error = (refined.variance.sqrt() / cov.diagonal().sqrt() - 1).abs().max()
    assert scale_error < 0.5  # from 0.5 × the posterior scale towards it
    diagonal = refined_proposal(_model(W_ORTHO), wrong, batch, steps=3, covariance="diagonal")["z"]
    assert isinstance(diagonal.base_dist, dist.Normal)
    k_guide = diagnostics.psis_diagnostics(_weights(W_ORTHO, wrong, "guide")).pareto_k
    k_refined = diagnostics.psis_diagnostics(
        _weights(W_ORTHO, wrong, "refined", refine_steps=100, refine_lr=0.05)
    ).pareto_k
    assert np.median(k_guide) > 0.7 and np.median(k_refined) < 0.5 and (k_refined < k_guide).all()


def test_defensive_mixture_samples_and_density():
    torch.manual_seed(0)
    first = dist.Normal(torch.zeros(3, 2), 1.0).to_event(1)
    second = dist.StudentT(4.0, torch.zeros(3, 2), 3.0).to_event(1)
    mixture = DefensiveMixture(first, second, 0.3).expand((500, 3))
    draws = mixture.sample()
    assert draws.shape == (500, 3, 2) and mixture.log_prob(draws).shape == (500, 3)
    expected = torch.log(0.3 * first.log_prob(draws).exp() + 0.7 * second.log_prob(draws).exp())
    torch.testing.assert_close(mixture.log_prob(draws), expected)
    # the share of draws from the wide component: |z| > 4 is ~never drawn from the unit Normal
    assert 0.1 < (draws.abs() > 4).any(-1).float().mean() < 0.5


def test_unknown_proposal_and_options_are_refused():
    with pytest.raises(ValueError, match=r"proposal must be one of \['guide', 'defensive', 'refined'\]"):
        _weights(W_ORTHO, _guide(W_ORTHO), "wide", 10)
    with pytest.raises(TypeError, match="refine_steps"):
        _weights(W_ORTHO, _guide(W_ORTHO), "defensive", 10, refine_steps=3)
    with pytest.raises(ValueError, match="defensive_alpha"):
        _weights(W_ORTHO, _guide(W_ORTHO), "defensive", 10, defensive_alpha=1.0)


# ------------------------------------------------------------------------------- a small trained SCVI
CELLS = np.arange(0, 600, 10)  # 60 cells, both batches


@pytest.fixture(scope="module")
def small_model():
    """The ``adata`` fixture's data (600 cells × 200 genes), 10 epochs."""
    settings.seed = 0
    data = synthetic_iid(batch_size=300, n_genes=200, n_batches=2, n_labels=3, seed=1)
    SCVI.setup_anndata(data, batch_key="batch", labels_key="labels")
    model = SCVI(data, n_latent=5)
    model.train(max_epochs=10, enable_progress_bar=False)
    return model


@pytest.mark.parametrize("proposal", ["guide", "defensive", "refined"])
def test_every_proposal_runs_on_scvi_with_diagnostics(small_model, proposal):
    options = {"refine_steps": 10} if proposal == "refined" else {}
    settings.seed = 3
    table = small_model.get_marginal_ll(indices=CELLS, n_mc_samples=100, batch_size=32, proposal=proposal,
                                        return_diagnostics=True, **options)
    assert isinstance(table, pd.DataFrame) and list(table.columns) == ["marginal_ll", "pareto_k", "ess"]
    assert list(table.index) == list(small_model.adata.obs_names[CELLS])
    assert np.isfinite(table.to_numpy()).all() and (table["marginal_ll"] < 0).all()
    assert ((table["ess"] >= 1) & (table["ess"] <= 100)).all()
    settings.seed = 3
    plain = small_model.get_marginal_ll(indices=CELLS, n_mc_samples=100, batch_size=32, proposal=proposal,
                                        return_mean=False, **options)
    np.testing.assert_allclose(plain.numpy(), table["marginal_ll"].to_numpy(), rtol=1e-6)  # same draws


def test_refinement_leaves_the_model_untouched(small_model):
    store = {name: value.detach().clone() for name, value in small_model.module.state_dict().items()}
    small_model.get_marginal_ll(indices=CELLS[:10], n_mc_samples=20, proposal="refined", refine_steps=3)
    for name, value in small_model.module.state_dict().items():
        torch.testing.assert_close(value, store[name], rtol=0, atol=0)
    assert all(parameter.grad is None for parameter in small_model.module.parameters())


def test_unknown_proposal_is_refused_by_the_model(small_model):
    with pytest.raises(ValueError, match="proposal must be one of"):
        small_model.get_marginal_ll(indices=CELLS, proposal="prior")


# ------------------------------------------------------------------- PSIS-smoothed importance weights
def test_smoothed_weights_psis_truncation_and_none():
    rng = np.random.default_rng(0)
    log_w = rng.standard_t(2, size=400)  # a heavy tail
    raw, k_raw = diagnostics.smoothed_weights(log_w, "none")
    np.testing.assert_allclose(raw, np.exp(log_w) / np.exp(log_w).sum())
    smoothed, k = diagnostics.smoothed_weights(log_w, "psis")
    assert k == k_raw == pytest.approx(float(diagnostics.psis_diagnostics(log_w).pareto_k))
    expected = np.exp(diagnostics.psis_diagnostics(log_w).smoothed_log_weights)
    np.testing.assert_allclose(smoothed, expected / expected.sum())
    assert np.isclose(smoothed.sum(), 1.0) and np.argmax(smoothed) == np.argmax(raw)
    truncated, _ = diagnostics.smoothed_weights(log_w, "truncation")
    floor = np.log(np.exp(log_w).mean())
    expected = np.exp(np.maximum(log_w, floor))
    np.testing.assert_allclose(truncated, expected / expected.sum())
    with pytest.raises(ValueError, match="method must be"):
        diagnostics.smoothed_weights(log_w, "clip")


def test_importance_weights_are_smoothed_and_report_pareto_k(small_model):
    cells = np.flatnonzero(small_model.adata.obs["labels"].to_numpy() == "label_0")[:40]
    z = torch.as_tensor(small_model.get_latent_representation(indices=cells), dtype=torch.float32)
    z = z.repeat(10, 1) + 0.3 * torch.randn(400, z.shape[1])
    kwargs = dict(max_cells=20, n_mc_samples=30)
    settings.seed = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        weights, k = small_model.get_importance_weights(None, cells, z, return_pareto_k=True, **kwargs)
        settings.seed = 4
        raw = small_model.get_importance_weights(None, cells, z, smoothing="none", **kwargs)
        settings.seed = 4
        truncated = small_model.get_importance_weights(None, cells, z, truncation=True, **kwargs)
    assert weights.shape == raw.shape == truncated.shape == (400,) and np.isfinite(k)
    for w in (weights, raw, truncated):
        assert np.isclose(w.sum(), 1.0) and (w >= 0).all()
    # PSIS replaces the largest weights by Pareto quantiles (capped at the largest): same order, new values
    assert np.argmax(weights) == np.argmax(raw) and not np.allclose(weights, raw)
    assert truncated.max() <= raw.max() + 1e-12 and truncated.min() > raw.min()
    with pytest.raises(ValueError, match="smoothing must be"):
        small_model.get_importance_weights(None, cells, z, smoothing="clip", **kwargs)
    far = torch.randn(400, z.shape[1]) * 3  # mostly far from the selected cells' posteriors
    with pytest.warns(UserWarning, match=r"Pareto k̂ of .* \(> 0.7\)"):
        small_model.get_importance_weights(None, cells, far, **kwargs)


def test_expression_refuses_return_pareto_k_and_says_where_it_is(small_model):
    with pytest.raises(TypeError, match=r"get_importance_weights\(\.\.\., return_pareto_k=True\)"):
        small_model.get_normalized_expression(indices=CELLS[:20], n_samples_overall=50, weights="importance",
                                              return_pareto_k=True)


def _draws_and_weights(model, cells, refine):
    """Expression draws of ``cells`` from the guide (``refine=None``) or refined proposals, their raw
    aggregate importance weights' k̂, and the proposals."""
    mask = np.ones(model.adata.n_vars, dtype=bool)
    proposals = []
    with torch.no_grad():
        blocks = list(model._expression_blocks(None, cells, None, mask, 1, 10, 16, None, refine, proposals))
    z = torch.cat([latents for _, latents in blocks], dim=1).reshape(-1, model.module.n_latent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, pareto_k = model._aggregate_importance_weights(None, cells, z, proposals, n_mc_samples=100,
                                                          smoothing="none", return_pareto_k=True)
    return pareto_k, proposals


def test_refined_importance_weights_are_more_reliable_than_the_guides(small_model):
    """weights="importance" with proposal="refined" draws z from each cell's refined proposal, which
    then also stands for q in the weights and proposes log p(x_a): the weights come out far flatter."""
    cells = np.flatnonzero(small_model.adata.obs["labels"].to_numpy() == "label_1")[:30]
    settings.seed = 5
    k_guide, none = _draws_and_weights(small_model, cells, None)
    settings.seed = 5
    k_refined, proposals = _draws_and_weights(small_model, cells, {"steps": 100})  # 3.6 → 0.26
    assert none == [] and len(proposals) == 2  # two minibatches of 16 cells
    assert isinstance(proposals[0]["z"], dist.MultivariateNormal) and proposals[0]["z"].batch_shape == (16,)
    assert k_refined < 0.7 < k_guide


def test_expression_and_de_take_the_refined_proposal_and_check_its_options(small_model):
    cells = CELLS[:20]
    settings.seed = 6
    options = {"proposal": "refined", "refine_steps": 5, "n_mc_samples": 20}
    draws = small_model.get_normalized_expression(indices=cells, n_samples_overall=40, weights="importance",
                                                  **options)
    assert draws.shape == (40, small_model.adata.n_vars) and np.isfinite(draws).all()
    de = small_model.differential_expression(groupby="labels", group1="label_0", weights="importance",
                                             n_samples_overall=60, importance_weighting_kwargs=options)
    assert np.isfinite(de["bayes_factor"]).all()
    with pytest.raises(ValueError, match="'guide' or 'refined'"):
        small_model.get_normalized_expression(indices=cells, n_samples_overall=40, weights="importance",
                                              proposal="defensive")
    with pytest.raises(TypeError, match="need proposal='refined'"):
        small_model.get_normalized_expression(indices=cells, n_samples_overall=40, weights="importance",
                                              proposal="guide", refine_steps=3)
    with pytest.raises(ValueError, match="with weights='importance'"):
        small_model.get_normalized_expression(indices=cells, n_samples_overall=40, proposal="refined")
    settings.seed = 6  # the default proposal of importance weights is the refined one
    default = small_model.get_normalized_expression(indices=cells, n_samples_overall=40, weights="importance",
                                                    refine_steps=5, n_mc_samples=20)
    np.testing.assert_array_equal(default, draws)
