"""Priors of z and the library, the dispersion hyper-prior (a global latent), and their ELBO terms."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_scvi import SCVI, settings
from pyro_scvi.data import synthetic_iid
from pyro_scvi.data.minibatch import Minibatch
from pyro_scvi.infer.elbo import elbo_parts, traces
from pyro_scvi.infer.importance import marginal_log_likelihood
from pyro_scvi.models.module import SCVIModule
from pyro_scvi.models.priors import LogNormalLibraryPrior, MixtureOfGaussiansPrior, NormalPrior, VampPrior


def _batch(n=16, G=12, B=2, seed=0, identical=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.full((1 if identical else n, G), 3.0), generator=g).expand(n, G).clone()
    x[:, 0] += 1  # no empty cell
    batch_index = (
        torch.zeros(n, 1, dtype=torch.long) if identical else torch.randint(0, B, (n, 1), generator=g)
    )
    return Minibatch(x=x, batch_index=batch_index, labels=torch.zeros(n, 1, dtype=torch.long),
                     log_library=x.sum(1, keepdim=True).log())


def _module(**kwargs):
    torch.manual_seed(0)
    return SCVIModule(12, n_batch=2, n_hidden=16, n_latent=3, **kwargs).eval()


def _monte_carlo_kl(q, p, n_samples=200_000):
    """E_q[log q − log p] from ``n_samples`` draws, and its standard error."""
    z = q.sample((n_samples,))
    values = q.log_prob(z) - p.log_prob(z)
    return values.mean().item(), values.std().item() / math.sqrt(n_samples)


@pytest.mark.parametrize("z_prior", ["normal", "mog", "vamp"])
def test_kl_of_each_prior_matches_large_sample_monte_carlo(z_prior):
    pyro.set_rng_seed(1)
    module = _module(z_prior=z_prior, n_prior_components=4)
    n = 4000
    batch = _batch(n=n, identical=True)  # every cell has the same q(z | x)
    parts = elbo_parts(module.model, module.guide, batch)
    kl = parts.kl["z"]  # (n,): analytic (normal) or one-sample estimates (mixtures)
    model_trace, guide_trace = traces(module.model, module.guide, batch)
    q = guide_trace.nodes["z"]["fn"].base_dist
    p_one = module.z_prior(_batch(n=1, identical=True))  # batch shape (1,)
    q_one = dist.Normal(q.loc[:1], q.scale[:1]).to_event(1)
    expected, stderr = _monte_carlo_kl(q_one, p_one)
    if z_prior == "normal":  # analytic: exactly the closed form, equal for every cell
        closed = 0.5 * (q.scale**2 + q.loc**2 - 1 - torch.log(q.scale**2)).sum(-1)
        torch.testing.assert_close(kl, closed)
        assert abs(kl[0].item() - expected) < 5 * stderr + 1e-4
    else:  # Monte Carlo: unbiased, so the mean over cells matches within a few standard errors
        assert kl.std() > 0
        assert abs(kl.mean().item() - expected) < 4 * (kl.std().item() / math.sqrt(n)) + 5 * stderr


def test_mog_with_one_standard_component_gives_the_normal_prior_elbo():
    normal = _module()
    mog = _module(z_prior=MixtureOfGaussiansPrior(3, n_components=1, init_spread=0.0))
    missing, unexpected = mog.load_state_dict(normal.state_dict(), strict=False)
    assert sorted(missing) == ["z_prior.log_scales", "z_prior.logits", "z_prior.means"] and not unexpected
    batch = _batch(n=2000)
    pyro.set_rng_seed(5)
    a = elbo_parts(normal.model, normal.guide, batch)
    pyro.set_rng_seed(5)
    model_trace, guide_trace = traces(mog.model, mog.guide, batch)
    pyro.set_rng_seed(5)
    b = elbo_parts(mog.model, mog.guide, batch)
    torch.testing.assert_close(b.reconstruction["x"], a.reconstruction["x"])  # same draw, same weights
    z = guide_trace.nodes["z"]["value"]
    torch.testing.assert_close(
        model_trace.nodes["z"]["fn"].log_prob(z), dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    )
    # the Monte-Carlo KL is unbiased for the analytic one: same ELBO up to MC noise
    difference = b.kl["z"] - a.kl["z"]
    assert abs(difference.mean().item()) < 4 * difference.std().item() / math.sqrt(batch.n_cells)
    assert abs(b.loss.item() - a.loss.item()) < 4 * difference.std().item() / math.sqrt(batch.n_cells)


@pytest.fixture(scope="module")
def small_adata():
    adata = synthetic_iid(batch_size=100, n_genes=40, n_batches=2, seed=3)
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    return adata


@pytest.mark.parametrize("z_prior", ["mog", "vamp"])
def test_mixture_prior_models_train_answer_queries_and_round_trip(small_adata, tmp_path, z_prior):
    pyro.set_rng_seed(0)
    model = SCVI(small_adata, n_latent=4, n_hidden=32, z_prior=z_prior, n_prior_components=5)
    before = {k: v.clone() for k, v in model.module.z_prior.state_dict().items()}
    model.train(max_epochs=3, enable_progress_bar=False, check_val_every_n_epoch=1)
    after = model.module.z_prior.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the prior's parameters learn
    latent = model.get_latent_representation()
    assert latent.shape == (small_adata.n_obs, 4) and np.isfinite(latent).all()
    assert torch.isfinite(model.get_elbo())
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=10))
    model.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", small_adata)
    np.testing.assert_allclose(loaded.get_latent_representation(), latent, rtol=1e-6, atol=1e-6)
    assert loaded.init_params_["kwargs"]["kwargs"]["z_prior"] == z_prior
    with pytest.raises(ValueError, match="z_prior="):
        model.save(tmp_path / "st", scvi_tools_format=True)


def test_vamp_pseudo_inputs_start_at_cells_and_ignore_batchnorm_state(small_adata):
    model = SCVI(small_adata, n_latent=4, z_prior="vamp", n_prior_components=3)
    prior = model.module.z_prior
    assert prior.pseudo_inputs.shape == (3, small_adata.n_vars)
    assert torch.all(prior.pseudo_inputs >= 0)  # log1p counts of real cells
    model.module.train()
    batch = _batch(n=8, G=small_adata.n_vars, identical=False)
    bn = [m for m in model.module.z_encoder.modules() if isinstance(m, nn.BatchNorm1d)][0]
    running = bn.running_mean.clone()
    loc1 = prior(batch).component_distribution.base_dist.loc
    loc2 = prior(batch).component_distribution.base_dist.loc
    torch.testing.assert_close(loc1, loc2)  # no dropout, no minibatch statistics
    assert torch.equal(bn.running_mean, running) and model.module.z_encoder.training


class StudentTPrior(nn.Module):
    """A custom prior following the protocol: heavy-tailed, learnable scale (no analytic KL)."""

    def __init__(self, n_latent, df=4.0):
        super().__init__()
        self.n_latent, self.df = n_latent, df
        self.log_scale = nn.Parameter(torch.zeros(n_latent))

    def forward(self, batch):
        loc = batch.log_library.new_zeros((batch.n_cells, self.n_latent))
        return dist.StudentT(self.df, loc, self.log_scale.exp()).to_event(1)


def test_custom_prior_object_trains_and_must_be_passed_again_on_load(small_adata, tmp_path):
    pyro.set_rng_seed(0)
    model = SCVI(small_adata, n_latent=3, z_prior=StudentTPrior(3))
    model.train(max_epochs=2, enable_progress_bar=False)
    assert not torch.equal(model.module.z_prior.log_scale.detach(), torch.zeros(3))
    assert model.init_params_["kwargs"]["kwargs"]["z_prior"] == "custom:StudentTPrior"
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="z_prior=StudentTPrior"):
        SCVI.load(tmp_path / "m", small_adata)
    loaded = SCVI.load(tmp_path / "m", small_adata, z_prior=StudentTPrior(3))
    torch.testing.assert_close(loaded.module.z_prior.log_scale, model.module.z_prior.log_scale)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
    first = SCVI(small_adata, n_latent=3, z_prior=VampPrior(2))
    with pytest.raises(ValueError, match="another model"):  # one prior object per model
        SCVI(small_adata, n_latent=3, z_prior=first.module.z_prior)


class ShiftedLibraryPrior(nn.Module):
    """A custom library prior: one learnable log-normal for every batch."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.tensor(7.0))

    def forward(self, batch):
        return dist.Normal(self.loc.expand(batch.n_cells, 1), 0.5).to_event(1)


def test_library_priors_default_and_custom(small_adata):
    pyro.set_rng_seed(0)
    default = SCVI(small_adata, n_latent=3, use_observed_lib_size=False)
    assert isinstance(default.module.library_prior, LogNormalLibraryPrior)
    # scvi-tools' names kept
    assert not any(k.startswith("library_prior") for k in default.module.state_dict())
    custom = SCVI(small_adata, n_latent=3, use_observed_lib_size=False, library_prior=ShiftedLibraryPrior())
    custom.train(max_epochs=2, enable_progress_bar=False)
    assert custom.module.library_prior.loc.item() != 7.0
    assert np.isfinite(custom.get_marginal_ll(n_mc_samples=5))
    with pytest.raises(ValueError, match="use_observed_lib_size=False"):
        SCVI(small_adata, library_prior=ShiftedLibraryPrior())


def test_default_model_keeps_its_parameters_and_the_analytic_kl():
    module = _module()
    assert isinstance(module.z_prior, NormalPrior)
    assert not any(k.startswith(("z_prior", "library_prior")) for k in module.state_dict())
    assert not module.has_global_latents and module.cells_plate(_batch()).size == 16


def test_global_kl_is_divided_by_the_number_of_training_cells():
    module = _module(dispersion_prior="lognormal", gene_likelihood="nb")
    module.n_train_cells = 1000
    batch = _batch(n=50)
    pyro.set_rng_seed(2)
    parts = elbo_parts(module.model, module.guide, batch)
    assert parts.n_obs == 1000 and set(parts.kl_global) == {"inverse_dispersion"}
    kl_theta = torch.distributions.kl_divergence(
        module.dispersion_posterior(), module.dispersion_hyperprior()
    ).sum()
    torch.testing.assert_close(parts.kl_global["inverse_dispersion"], kl_theta)
    expected = (parts.reconstruction["x"] + parts.kl["z"]).mean() + kl_theta / 1000
    torch.testing.assert_close(parts.loss, expected)
    # the same draw under Pyro's own mean-field ELBO is the full-data estimate: N times our loss
    pyro.set_rng_seed(2)
    pyro_loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(module.model, module.guide, batch)
    torch.testing.assert_close(pyro_loss, 1000 * parts.loss, rtol=1e-5, atol=1e-3)


def test_marginal_ll_with_global_theta_conditions_on_its_posterior_mean():
    module = _module(dispersion_prior="gamma", gene_likelihood="nb")
    point = _module(gene_likelihood="nb")
    point.load_state_dict({k: v for k, v in module.state_dict().items() if k != "log_dispersion_log_scale"})
    with torch.no_grad():
        point.log_dispersion.copy_(module.dispersion_posterior().mean.log())
    batch = _batch(n=20)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        a = marginal_log_likelihood(module.model, module.guide, batch, n_samples=2000)
        b = marginal_log_likelihood(point.model, point.guide, batch, n_samples=2000)
    assert torch.isfinite(a).all()
    assert abs(a.mean().item() - b.mean().item()) < 0.02 * abs(b.mean().item())


def _nb_data(theta, n_cells=1500, seed=0):
    import anndata

    rng = np.random.default_rng(seed)
    G = len(theta)
    rho = rng.dirichlet(np.full(G, 5.0))
    library = rng.lognormal(np.log(3000), 0.2, n_cells)
    mean = library[:, None] * rho[None, :]
    counts = rng.poisson(rng.gamma(theta[None, :], mean / theta[None, :])).astype(np.float32)
    adata = anndata.AnnData(counts)
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{i}" for i in range(G)]
    return adata


def test_dispersion_hyperprior_learns_theta():
    theta = np.array([0.7, 1.5, 3.0, 6.0, 12.0] * 4)
    adata = _nb_data(theta, n_cells=800)
    SCVI.setup_anndata(adata)
    pyro.set_rng_seed(0)
    model = SCVI(adata, n_latent=2, n_hidden=16, gene_likelihood="nb", dispersion_prior="lognormal")
    model.train(max_epochs=12, enable_progress_bar=False, check_val_every_n_epoch=4,
                plan_kwargs={"lr": 5e-2, "n_epochs_kl_warmup": None})
    history = model.history
    assert history["kl_global_train"].values.min() > 0 and "kl_global_validation" in history
    assert model.module.n_train_cells == len(model.train_indices)
    np.testing.assert_allclose(history["elbo_train"].values,
                               (history["reconstruction_loss_train"].values + history["kl_local_train"].values
                                + history["kl_global_train"].values), rtol=1e-6)
    fitted = model.module.dispersion_posterior().mean.detach().numpy()
    log_error = np.abs(np.log(fitted) - np.log(theta))
    assert np.median(log_error) < 0.3, (fitted, theta)
    assert np.corrcoef(np.log(fitted), np.log(theta))[0, 1] > 0.9
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=10))
    with pytest.raises(ValueError, match="dispersion_prior"):
        model.save("unused", scvi_tools_format=True)


def test_dispersion_hyperprior_gives_calibrated_90_percent_intervals():
    """θ ~ Gamma(2, scale 2.5) per gene, 2000 cells of one type: once trained, the central 90 %
    intervals of the log-normal posterior cover the true θ of about 90 % of the genes (0.95 and 0.85
    on these two seeds; 0.90 ± 0.04 over five larger fits in benchmarks/bench_dispersion_recovery.py),
    and the posterior is not trivially wide. An under-trained fit (bias −0.12) covers about half."""
    coverage, log_error = [], []
    for seed in (0, 1):
        theta = np.random.default_rng(seed).gamma(2.0, 2.5, size=40)
        adata = _nb_data(theta, n_cells=2000, seed=seed)
        SCVI.setup_anndata(adata)
        settings.seed = seed
        model = SCVI(adata, n_hidden=32, n_latent=2, gene_likelihood="nb", dispersion_prior="gamma")
        model.train(max_epochs=100, batch_size=256, enable_progress_bar=False,
                    plan_kwargs={"n_epochs_kl_warmup": 10, "lr": 1e-2})
        error = model.module.log_dispersion.detach().numpy() - np.log(theta)
        sd = model.module.log_dispersion_log_scale.exp().detach().numpy()
        coverage.append(np.mean(np.abs(error) <= 1.645 * sd))
        log_error.append(np.median(np.abs(error)))
        assert np.median(sd) < 0.15
    print(f"90 % interval coverage of θ per seed: {coverage}")
    assert 0.75 <= np.mean(coverage) <= 0.99 and max(log_error) < 0.1


def test_dispersion_hyperprior_validation_and_gene_batch_shapes(small_adata, tmp_path):
    with pytest.raises(ValueError, match="per-gene θ"):
        SCVI(small_adata, dispersion="gene-cell", dispersion_prior="gamma")
    with pytest.raises(ValueError, match="dispersion_prior='beta'"):
        SCVI(small_adata, dispersion_prior="beta")
    pyro.set_rng_seed(0)
    model = SCVI(small_adata, n_latent=3, dispersion="gene-batch", dispersion_prior="gamma")
    model.train(max_epochs=2, enable_progress_bar=False)
    assert model.module.dispersion_posterior().batch_shape == (small_adata.n_vars,)
    assert model.module.dispersion_posterior().event_shape == (2,)
    params = model.get_likelihood_parameters(n_samples=2)
    assert params["dispersions"].shape == (2, small_adata.n_obs, small_adata.n_vars)
    model.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", small_adata)
    torch.testing.assert_close(
        loaded.module.dispersion_posterior().mean, model.module.dispersion_posterior().mean
    )
    assert loaded.module.n_train_cells == model.module.n_train_cells


def test_kl_from_a_log_normal_to_a_gamma_is_the_closed_form():
    """KL(LogNormal ‖ Gamma) (θ's posterior against the gamma hyper-prior) against Monte Carlo."""
    from torch.distributions import kl_divergence

    torch.manual_seed(0)
    q = dist.LogNormal(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
                       torch.tensor([0.3, 0.2, 1.1], dtype=torch.float64))
    p = dist.Gamma(torch.tensor(1.5, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)).expand([3])
    draws = q.sample((400_000,))
    monte_carlo = (q.log_prob(draws) - p.log_prob(draws)).mean(0)
    torch.testing.assert_close(kl_divergence(q, p), monte_carlo, atol=3e-3, rtol=0)
    torch.testing.assert_close(kl_divergence(q.to_event(1), p.to_event(1)), kl_divergence(q, p).sum())


def test_the_gamma_dispersion_prior_has_an_analytic_global_kl(adata):
    """Two evaluations at the same weights give the same global KL: no Monte-Carlo term left."""
    from pyro_scvi.infer.elbo import elbo_parts

    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=16, n_latent=2, gene_likelihood="nb", dispersion_prior="gamma")
    batch = model.registered_data()[1].minibatch(np.arange(50))
    model.module.eval()
    with model.pyro_scope(), torch.no_grad():
        first, second = (elbo_parts(model.module.model, model.module.guide, batch).kl_global
                         for _ in range(2))
    assert first.keys() == second.keys() and len(first) == 1
    for name in first:
        assert torch.equal(first[name], second[name])
