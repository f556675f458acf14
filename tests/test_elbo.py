"""The ELBO against closed forms, Monte Carlo, and the marginal likelihood against exact enumeration."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from pyro_scvi.data.minibatch import Minibatch
from pyro_scvi.distributions import ZeroInflatedNegativeBinomial
from pyro_scvi.infer.elbo import CellMeanELBO, elbo_terms
from pyro_scvi.infer.importance import marginal_log_likelihood
from pyro_scvi.models.module import SCVIModule


def _batch(n=16, G=12, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.full((n, G), 3.0), generator=g)
    x[0, :] += 1  # no empty cell
    return Minibatch(x=x, batch_index=torch.randint(0, B, (n, 1), generator=g),
                     labels=torch.zeros(n, 1, dtype=torch.long), log_library=x.sum(1, keepdim=True).log())


@pytest.mark.parametrize("latent_library", [False, True])
def test_loss_is_cell_mean_of_reconstruction_plus_weighted_analytic_kl(latent_library):
    kwargs = (
        dict(use_observed_lib_size=False, library_log_means=[[3.0, 3.5]], library_log_vars=[[0.5, 0.2]])
        if latent_library
        else {}
    )
    module = SCVIModule(12, n_batch=2, n_hidden=8, n_latent=3, **kwargs).eval()
    batch = _batch()
    pyro.set_rng_seed(3)
    loss, rec, kl = elbo_terms(module.model, module.guide, batch, kl_weights={"z": 0.25})
    # recompute by hand with the same draw
    pyro.set_rng_seed(3)
    loc, scale = module.z_encoder(torch.log1p(batch.x))
    z = torch.distributions.Normal(loc, scale).rsample()
    kl_z = 0.5 * (scale**2 + loc**2 - 1 - torch.log(scale**2)).sum(-1)
    torch.testing.assert_close(kl["z"], kl_z)
    if latent_library:
        l_loc, l_scale = module.library_encoder(torch.log1p(batch.x))
        library = torch.distributions.Normal(l_loc, l_scale).rsample()
        prior = torch.distributions.Normal(
            module.library_log_means[0, batch.batch_index],
            module.library_log_vars[0, batch.batch_index].sqrt(),
        )
        kl_l = torch.distributions.kl_divergence(torch.distributions.Normal(l_loc, l_scale), prior).sum(-1)
        torch.testing.assert_close(kl["library"], kl_l)
    else:
        library = batch.log_library
        kl_l = 0.0
    hidden = module.decoder(z, batch.batch_index)
    mean = library.exp() * module.decoder.scale_head(hidden)
    px = ZeroInflatedNegativeBinomial(
        mean, module.log_dispersion.exp(), module.decoder.zero_inflation_head(hidden)
    )
    rec_manual = -px.log_prob(batch.x).sum(-1)
    torch.testing.assert_close(rec["x"], rec_manual)
    torch.testing.assert_close(loss, (rec_manual + 0.25 * kl_z + kl_l).mean())


def test_kl_weight_zero_is_allowed_and_gradients_flow():
    module = SCVIModule(12, n_batch=2, n_hidden=8, n_latent=3)
    elbo = CellMeanELBO(kl_weights={"z": 0.0})
    loss = elbo.differentiable_loss(module.model, module.guide, _batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert (
        module.decoder.scale_head[0].weight.grad is not None
        and module.z_encoder.loc_head.weight.grad is not None
    )


def test_monte_carlo_kl_fallback_matches_analytic_in_expectation():
    n = 4000

    def model():
        with pyro.plate("cells", n):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.zeros(n))

    def guide_analytic():
        with pyro.plate("cells", n):
            pyro.sample("z", dist.Normal(0.7, 0.5))

    def guide_mc():  # a TransformedDistribution has no registered KL → Monte-Carlo fallback
        with pyro.plate("cells", n):
            pyro.sample("z", dist.TransformedDistribution(dist.Normal(0.7, 0.5), []))

    _, _, kl_exact = elbo_terms(model, guide_analytic)
    _, _, kl_mc = elbo_terms(model, guide_mc)
    exact = float(kl_exact["z"][0])
    assert exact == pytest.approx(math.log(1 / 0.5) + (0.25 + 0.49) / 2 - 0.5, rel=1e-5)
    assert float(kl_mc["z"].mean()) == pytest.approx(exact, abs=4 * float(kl_mc["z"].std()) / math.sqrt(n))


def test_marginal_likelihood_recovers_exact_evidence_of_a_conjugate_model():
    """x ~ N(z, 1), z ~ N(0, 1): log p(x) = log N(x; 0, 2); with the exact posterior as guide every
    importance weight equals p(x), so the estimate is exact; with a poor guide it converges."""
    x = torch.tensor([-1.0, 0.3, 2.0])
    batch = Minibatch(x=x[:, None], batch_index=torch.zeros(3, 1, dtype=torch.long),
                      labels=torch.zeros(3, 1, dtype=torch.long), log_library=torch.zeros(3, 1))

    def model(b):
        with pyro.plate("cells", b.n_cells, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(b.n_cells, 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=b.x)

    def exact_guide(b):
        with pyro.plate("cells", b.n_cells, dim=-1):
            pyro.sample("z", dist.Normal(b.x / 2, math.sqrt(0.5)).to_event(1))

    def poor_guide(b):
        with pyro.plate("cells", b.n_cells, dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros_like(b.x), 1.5).to_event(1))

    truth = stats.norm(0, np.sqrt(2)).logpdf(x.numpy())
    np.testing.assert_allclose(
        marginal_log_likelihood(model, exact_guide, batch, 10).numpy(), truth, rtol=1e-5
    )
    pyro.set_rng_seed(0)
    np.testing.assert_allclose(
        marginal_log_likelihood(model, poor_guide, batch, 20000, samples_per_pass=5000).numpy(),
        truth,
        atol=0.02,
    )


def _conjugate(x):
    batch = Minibatch(x=x[:, None], batch_index=torch.zeros(len(x), 1, dtype=torch.long),
                      labels=torch.zeros(len(x), 1, dtype=torch.long), log_library=torch.zeros(len(x), 1))

    def model(b, transform_batch=None):
        with pyro.plate("cells", b.n_cells, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(b.n_cells, 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=b.x)

    def exact_guide(b, transform_batch=None):
        with pyro.plate("cells", b.n_cells, dim=-1):
            pyro.sample("z", dist.Normal(b.x / 2, math.sqrt(0.5)).to_event(1))

    def poor_guide(b, transform_batch=None):
        with pyro.plate("cells", b.n_cells, dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros_like(b.x), 1.5).to_event(1))

    return batch, model, exact_guide, poor_guide


def test_importance_weights_are_uniform_under_the_exact_posterior_and_correct_a_poor_guide():
    from pyro_scvi.infer.importance import aggregate_posterior_log_weights

    x = torch.tensor([-2.0, 0.5, 1.0, 3.0])
    batch, model, exact_guide, poor_guide = _conjugate(x)
    log_evidence = torch.as_tensor(stats.norm(0, np.sqrt(2)).logpdf(x.numpy()), dtype=torch.float32)
    z_exact = (x / 2 + math.sqrt(0.5) * torch.randn(50, 4)).reshape(-1, 1)
    log_w = aggregate_posterior_log_weights(model, exact_guide, z_exact, batch, log_evidence)
    torch.testing.assert_close(log_w, torch.zeros_like(log_w), atol=1e-5, rtol=0)
    # draws from the poor guide, reweighted, have the aggregate posterior's mean Σ_a (x_a / 2) / A
    pyro.set_rng_seed(0)
    z_poor = 1.5 * torch.randn(40000, 1)
    weights = torch.softmax(
        aggregate_posterior_log_weights(model, poor_guide, z_poor, batch, log_evidence), 0
    )
    assert float((weights[:, None] * z_poor).sum()) == pytest.approx(float(x.mean() / 2), abs=0.03)
