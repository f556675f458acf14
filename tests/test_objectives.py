"""Training objectives: the ELBO with K vectorised particles and the IWAE bound with DReG gradients.

A linear-Gaussian toy has a closed-form evidence and posterior: z ~ N(0, I_d),
x | z ~ N(W z + b, σ² I_G), so p(x) = N(b, W Wᵀ + σ² I) and q*(z | x) = N(m, S) with
S = (I + Wᵀ W / σ²)⁻¹ and m = S Wᵀ (x − b) / σ². W has orthogonal columns, so S is diagonal and a
mean-field Gaussian guide can be the exact posterior.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal

from pyro_scvi import SCVI, settings
from pyro_scvi.infer.elbo import CellMeanELBO, dreg_gradients, elbo_parts, iwae_parts
from pyro_scvi.infer.training import TrainingPlan

D, G, SIGMA = 2, 3, 0.7


@pytest.fixture
def toy():
    """One observation x repeated for ``n`` cells, the exact posterior and a model/guide pair."""
    torch.manual_seed(0)
    orthonormal, _ = torch.linalg.qr(torch.randn(G, D, dtype=torch.float64))
    W = orthonormal * torch.tensor([1.5, 0.8], dtype=torch.float64)  # WᵀW = diag(2.25, 0.64)
    b = torch.randn(G, dtype=torch.float64)
    x = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    covariance = torch.linalg.inv(torch.eye(D, dtype=torch.float64) + W.T @ W / SIGMA**2)
    mean = covariance @ W.T @ (x - b) / SIGMA**2
    log_evidence = multivariate_normal(b.numpy(), (W @ W.T).numpy() + SIGMA**2 * np.eye(G)).logpdf(x.numpy())
    W = torch.nn.Parameter(W)

    def model(n):
        with pyro.plate("cells", n, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, SIGMA).to_event(1), obs=x.expand(n, G))

    def guide_at(loc, scale):
        def guide(n):
            with pyro.plate("cells", n, dim=-1):
                pyro.sample("z", dist.Normal(loc, scale).expand([n, D]).to_event(1))
        return guide

    return dict(model=model, guide_at=guide_at, W=W, mean=mean, covariance=covariance,
                log_evidence=float(log_evidence))


def test_iwae_is_the_exact_evidence_for_the_exact_posterior_at_any_k(toy):
    """With q = p(z | x) every weight is p(x): the bound equals the closed form for every K."""
    torch.testing.assert_close(toy["covariance"], torch.diag(toy["covariance"].diagonal()))
    guide = toy["guide_at"](toy["mean"], toy["covariance"].diagonal().sqrt())
    for k in (1, 3, 10):
        bound = iwae_parts(toy["model"], guide, 50, num_particles=k).bound
        np.testing.assert_allclose(bound.numpy(), toy["log_evidence"], rtol=1e-10)


def test_iwae_with_one_particle_is_the_one_draw_elbo_and_matches_the_analytic_elbo_on_average(toy):
    guide = toy["guide_at"](toy["mean"] + 0.3, toy["covariance"].diagonal().sqrt() * 0.8)
    n = 20000
    pyro.set_rng_seed(1)
    bound = iwae_parts(toy["model"], guide, n, num_particles=1).bound
    parts = elbo_parts(toy["model"], guide, n)  # analytic KL, one reconstruction draw per cell
    analytic_elbo = -float(parts.loss)
    standard_error = float(bound.std()) / np.sqrt(n)
    assert abs(float(bound.mean()) - analytic_elbo) < 4 * standard_error + 1e-3
    assert analytic_elbo < toy["log_evidence"]


def test_iwae_bounds_the_elbo_from_above_and_increases_with_k(toy):
    guide = toy["guide_at"](toy["mean"] - 0.4, toy["covariance"].diagonal().sqrt() * 0.6)
    n = 4000
    pyro.set_rng_seed(2)
    elbo = -float(elbo_parts(toy["model"], guide, n).loss)
    means = [float(iwae_parts(toy["model"], guide, n, num_particles=k).bound.mean()) for k in (1, 5, 50)]
    assert means[0] == pytest.approx(elbo, abs=0.05)
    assert means[0] < means[1] < means[2] <= toy["log_evidence"]


def test_elbo_with_k_particles_averages_k_draws_and_keeps_the_analytic_kl(toy):
    guide = toy["guide_at"](toy["mean"] + 0.2, torch.ones(D, dtype=torch.float64))
    one = elbo_parts(toy["model"], guide, 10)
    many = elbo_parts(toy["model"], guide, 10, num_particles=8)
    assert many.reconstruction["x"].shape == (10,) and many.kl["z"].shape == (10,)
    torch.testing.assert_close(many.kl["z"], one.kl["z"])
    torch.testing.assert_close(many.loss, (many.reconstruction["x"] + many.kl["z"]).mean())


def _gradients(loss, params):
    return [g.clone() for g in torch.autograd.grad(loss, params, retain_graph=True)]


def _dreg(terms, params):
    """The gradients of the DReG surrogate (taken with the draws' reweighting hooks)."""
    with dreg_gradients(terms):
        return _gradients(terms.surrogate, params)


def test_dreg_gives_the_iwae_gradient_for_the_model_and_zero_guide_gradient_at_the_optimum(toy):
    loc = torch.nn.Parameter(toy["mean"].clone())
    log_scale = torch.nn.Parameter(toy["covariance"].diagonal().sqrt().log())
    guide = toy["guide_at"](loc, log_scale.exp())
    pyro.set_rng_seed(3)
    terms = iwae_parts(toy["model"], toy["guide_at"](loc, log_scale.exp()), 200, num_particles=5)
    dreg_model = _dreg(terms, [toy["W"]])[0]
    pyro.set_rng_seed(3)
    terms = iwae_parts(toy["model"], guide, 200, num_particles=5)
    plain_model = _gradients(terms.loss, [toy["W"]])[0]
    torch.testing.assert_close(dreg_model, plain_model, rtol=1e-9, atol=1e-9)
    # at q = p(z | x) every log-weight is constant in z: DReG's guide gradient vanishes, while the
    # plain IWAE gradient of the same draws does not (its score term is pure noise)
    for grad in _dreg(terms, [loc, log_scale]):
        assert float(grad.abs().max()) < 1e-8
    assert max(float(g.abs().max()) for g in _gradients(terms.loss, [loc, log_scale])) > 1e-4


@pytest.mark.parametrize("kl_weight", [1.0, 0.3, 0.0])
def test_dreg_and_plain_iwae_guide_gradients_agree_in_expectation(toy, kl_weight):
    """Both are unbiased for ∇φ IWAE: averaged over many independent cells they agree within noise,
    also for the tempered bound of the KL warm-up (β < 1), whose DReG factor is (1 − β) w̃ + β w̃²."""
    loc = torch.nn.Parameter(toy["mean"] + 0.5)
    log_scale = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
    n = 40000

    def per_cell_gradients(use_surrogate: bool) -> torch.Tensor:
        pyro.set_rng_seed(4 if use_surrogate else 5)
        terms = iwae_parts(toy["model"], toy["guide_at"](loc, log_scale.exp()), n, num_particles=4,
                           kl_weights={"z": kl_weight})
        params = [loc, log_scale]
        return torch.cat(_dreg(terms, params) if use_surrogate else _gradients(terms.loss, params))

    dreg, plain = per_cell_gradients(True), per_cell_gradients(False)
    # the per-cell gradients average to these; their spread sets the tolerance (a few standard errors)
    np.testing.assert_allclose(dreg.numpy(), plain.numpy(), atol=0.05)


def test_cell_mean_elbo_rejects_unknown_objectives_and_particle_counts():
    with pytest.raises(ValueError, match="objective"):
        CellMeanELBO(objective="renyi")
    with pytest.raises(ValueError, match="num_particles"):
        CellMeanELBO(num_particles=0)
    with pytest.raises(ValueError, match="objective"):
        TrainingPlan(objective="wake-sleep")
    with pytest.raises(ValueError, match="num_particles"):
        TrainingPlan(num_particles=2.5)


def test_scvi_trains_on_the_iwae_and_records_it_beside_the_elbo(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    settings.seed = 0
    model = SCVI(adata, n_hidden=32, n_latent=4)
    model.train(max_epochs=3, batch_size=128, check_val_every_n_epoch=1, enable_progress_bar=False,
                plan_kwargs={"objective": "iwae", "num_particles": 6})
    history = model.history
    for key in ("iwae_train", "iwae_validation", "elbo_train", "elbo_validation"):
        assert key in history and np.isfinite(history[key].values).all(), key
    # the bound of several draws is at least the one-draw ELBO, on average over the validation cells
    iwae, elbo = (float(history[key].iloc[-1, 0]) for key in ("iwae_validation", "elbo_validation"))
    assert iwae <= elbo + 1.0
    assert np.isfinite(model.get_latent_representation()).all()


def test_the_full_rank_guide_with_the_iwae_warns_and_still_trains(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    settings.seed = 0
    model = SCVI(adata, n_hidden=32, n_latent=4, guide="full_rank")
    with pytest.warns(UserWarning, match="full_rank.*iwae.*unstable"):
        model.train(max_epochs=1, batch_size=128, enable_progress_bar=False,
                    plan_kwargs={"objective": "iwae", "num_particles": 2})
    assert np.isfinite(model.history["iwae_train"].values).all()


def test_scvi_elbo_with_particles_trains_and_the_default_has_no_iwae_key(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    settings.seed = 0
    model = SCVI(adata, n_hidden=32, n_latent=4)
    model.train(max_epochs=2, batch_size=128, enable_progress_bar=False, plan_kwargs={"num_particles": 3})
    assert "iwae_train" not in model.history and np.isfinite(model.history["elbo_train"].values).all()


def test_particles_with_a_global_latent_are_refused_clearly(adata):
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=16, n_latent=2, dispersion_prior="gamma")
    with pytest.raises(ValueError, match="global latent"):
        model.train(max_epochs=1, enable_progress_bar=False, plan_kwargs={"num_particles": 2})


def test_dreg_agrees_with_the_plain_iwae_gradient_for_a_full_rank_guide(toy):
    """A joint (not per-dimension) guide density: the reweighted-draw gradient is still unbiased."""
    loc = torch.nn.Parameter(toy["mean"] + torch.tensor([0.3, -0.2], dtype=torch.float64))
    raw = torch.nn.Parameter(torch.tensor([[0.8, 0.0], [0.3, 0.6]], dtype=torch.float64))

    def guide(n):
        with pyro.plate("cells", n, dim=-1):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.tril(raw)).expand([n]))

    gradients = {}
    for use_surrogate, seed in ((True, 6), (False, 7)):
        pyro.set_rng_seed(seed)
        terms = iwae_parts(toy["model"], guide, 40000, num_particles=4)
        found = _dreg(terms, [loc, raw]) if use_surrogate else _gradients(terms.loss, [loc, raw])
        gradients[use_surrogate] = torch.cat([g.reshape(-1) for g in found])
    np.testing.assert_allclose(gradients[True].numpy(), gradients[False].numpy(), atol=0.08)
