"""pyro_scvi.diagnostics: ArviZ conversion, PSIS diagnostics of the importance weights and
posterior-predictive checks, each against a hand computation or a case with a known answer."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_scvi import SCVI, diagnostics, plotting, settings
from pyro_scvi.data.minibatch import Minibatch
from pyro_scvi.infer.importance import log_importance_weights_in_passes, marginal_log_likelihood

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

torch.set_num_threads(2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELLS = np.arange(0, 500, 5)  # 100 cells of the trained fixture, both batches


def _png(fig, path):
    out = plotting.save_figure(fig, path)
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 1000


# ---------------------------------------------------------------------------- ArviZ conversion
@pytest.fixture(scope="module")
def idata(trained):
    settings.seed = 3
    return trained.to_arviz(indices=CELLS, n_samples=20, batch_size=64)


def test_to_arviz_groups_dims_and_coords(trained, idata):
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
    }
    cells = np.asarray(trained.adata.obs_names[CELLS])
    genes = np.asarray(trained.adata.var_names)
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "cell", "latent_dim") and z.shape == (
        1,
        20,
        100,
        trained.module.n_latent,
    )
    assert "library" not in idata.posterior  # observed library: not a latent variable
    x_rep = idata.posterior_predictive["x"]
    assert x_rep.dims == ("chain", "draw", "cell", "gene") and x_rep.shape == (1, 20, 100, 150)
    assert x_rep.dtype == np.int32 and int(x_rep.min()) >= 0
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "cell")
    assert idata.observed_data["x"].dims == ("cell", "gene")
    np.testing.assert_array_equal(idata.posterior.cell.values, cells)
    np.testing.assert_array_equal(idata.posterior_predictive.gene.values, genes)
    np.testing.assert_array_equal(idata.observed_data["x"].values, np.asarray(trained.adata.X[CELLS]))
    np.testing.assert_array_equal(
        idata.constant_data["batch"].values, trained.adata.obs["batch"].to_numpy()[CELLS].astype(str)
    )
    np.testing.assert_array_equal(
        idata.constant_data["labels"].values, trained.adata.obs["labels"].to_numpy()[CELLS].astype(str)
    )
    # the posterior mean of z is the guide's mean
    latent = trained.get_latent_representation(indices=CELLS)
    assert np.abs(z.mean(("chain", "draw")).values - latent).mean() < 0.15


def test_to_arviz_log_likelihood_is_per_cell_sum_over_genes(trained, idata):
    ll = idata.log_likelihood["x"].values[0]  # (S, n)
    assert np.isfinite(ll).all() and (ll < 0).all()
    # a one-draw log-likelihood is on the scale of the reconstruction loss of get_elbo's terms
    reconstruction = trained.get_reconstruction_error(indices=CELLS, return_mean=False)["reconstruction_loss"]
    assert np.corrcoef(-ll.mean(0), reconstruction.numpy())[0, 1] > 0.9


def test_to_arviz_predictive_matches_posterior_predictive_sample(trained, idata):
    """Same distribution as pyro.infer.Predictive in posterior_predictive_sample (not the same
    draws: Predictive consumes random numbers to guess the plate nesting)."""
    pytest.importorskip("sparse")
    settings.seed = 4
    reference = np.moveaxis(
        trained.posterior_predictive_sample(indices=CELLS, n_samples=10, batch_size=64).todense(), -1, 0
    )
    ours = idata.posterior_predictive["x"].values[0]  # (S, n, G)
    assert ours.shape[1:] == reference.shape[1:]
    gene_mean, reference_mean = ours.mean((0, 1)), reference.mean((0, 1))
    assert np.corrcoef(np.log1p(gene_mean), np.log1p(reference_mean))[0, 1] > 0.98
    assert abs(gene_mean.sum() / reference_mean.sum() - 1) < 0.05
    np.testing.assert_allclose((ours == 0).mean((0, 1)), (reference == 0).mean((0, 1)), atol=0.06)


def test_to_arviz_without_predictive_and_latent_library(adata):
    settings.seed = 0
    adata = adata[:200].copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=3, use_observed_lib_size=False)
    model.train(max_epochs=2, enable_progress_bar=False)
    result = model.to_arviz(indices=np.arange(40), n_samples=5, posterior_predictive=False)
    assert "posterior_predictive" not in result.groups()
    library = result.posterior["library"]
    assert library.dims == ("chain", "draw", "cell") and library.shape == (1, 5, 40)
    observed_log_library = np.log(np.asarray(adata.X[:40]).sum(1))
    assert np.corrcoef(library.mean(("chain", "draw")).values, observed_log_library)[0, 1] > 0.5


def test_to_arviz_global_latent_site(adata):
    """A latent dispersion (outside the cells plate) goes to the posterior with a gene axis."""
    settings.seed = 0
    adata = adata[:100].copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=3, gene_likelihood="nb", dispersion_prior="lognormal")
    model.train(max_epochs=1, enable_progress_bar=False)
    result = model.to_arviz(n_samples=4, batch_size=64)
    theta = result.posterior["inverse_dispersion"]
    assert theta.dims == ("chain", "draw", "gene") and theta.shape == (1, 4, adata.n_vars)
    assert (theta.values > 0).all()
    assert result.log_likelihood["x"].shape == (1, 4, 100)


def test_to_arviz_uses_one_draw_of_a_global_latent_for_all_minibatches(adata, monkeypatch):
    """Draw s of the latent dispersion is the same value for the cells of every minibatch, so
    each draw of the posterior (and its log-likelihood) is one joint sample."""
    from pyro_scvi.infer import posterior

    settings.seed = 0
    adata = adata[:100].copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=3, gene_likelihood="nb", dispersion_prior="lognormal")
    model.train(max_epochs=1, enable_progress_bar=False)
    used = []
    real = posterior.posterior_traces

    def spy(*args, **kwargs):
        guide_trace, model_traces = real(*args, **kwargs)
        (model_trace,) = model_traces
        used.append(
            (
                model_trace.nodes["inverse_dispersion"]["value"],
                guide_trace.nodes["inverse_dispersion"]["value"],
            )
        )
        return guide_trace, model_traces

    monkeypatch.setattr(posterior, "posterior_traces", spy)
    result = model.to_arviz(n_samples=4, batch_size=32)
    assert len(used) == 4  # 100 cells in minibatches of 32
    first_model, first_guide = used[0]
    for model_value, guide_value in used[1:]:
        assert torch.equal(guide_value, first_guide) and torch.equal(model_value, first_model)
    stored = result.posterior["inverse_dispersion"].values[0]  # (draw, gene)
    np.testing.assert_allclose(stored, first_guide.reshape(4, -1).numpy(), rtol=1e-6)


def test_loo_runs_and_relates_to_the_log_likelihood(idata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about high Pareto k
        loo = az.loo(idata, pointwise=True)
    ll = idata.log_likelihood["x"].values[0].astype(np.float64)  # (S, n)
    lppd = float((np.logaddexp.reduce(ll, axis=0) - math.log(ll.shape[0])).sum())
    assert loo["n_data_points"] == 100 and loo["n_samples"] == 20
    assert loo["elpd_loo"] <= lppd + 1e-6
    assert loo["p_loo"] == pytest.approx(lppd - loo["elpd_loo"], rel=1e-6)
    np.testing.assert_array_equal(loo["loo_i"].cell.values, idata.log_likelihood.cell.values)
    assert loo["loo_i"].values.sum() == pytest.approx(loo["elpd_loo"], rel=1e-9)


def test_plot_ppc_renders(idata, tmp_path):
    import matplotlib.pyplot as plt

    small = idata.isel(cell=slice(0, 20), gene=slice(0, 20))
    axes = az.plot_ppc(small, kind="cumulative", num_pp_samples=5, random_seed=0)
    fig = np.ravel(axes)[0].figure
    _png(fig, tmp_path / "ppc.png")
    plt.close("all")


# ---------------------------------------------------------------------------- PSIS on synthetic log-weights
def test_effective_sample_size_by_hand():
    assert diagnostics.effective_sample_size(np.log([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)
    assert diagnostics.effective_sample_size(np.zeros(50)) == pytest.approx(50)
    assert diagnostics.effective_sample_size(np.array([0.0, -1e3, -1e3])) == pytest.approx(1.0)
    # per column, invariant to a constant shift
    lw = np.random.default_rng(0).normal(size=(40, 3))
    np.testing.assert_allclose(
        diagnostics.effective_sample_size(lw + 500.0), diagnostics.effective_sample_size(lw)
    )


@pytest.mark.parametrize("k_true", [0.2, 0.5, 0.9])
def test_pareto_k_recovers_the_tail_shape(k_true):
    rng = np.random.default_rng(1)
    weights = 1.0 + rng.pareto(1.0 / k_true, size=(4000, 8))  # Pareto tail with shape k
    result = diagnostics.psis_diagnostics(np.log(weights))
    assert result.pareto_k.shape == (8,) and result.ess.shape == (8,)
    assert abs(np.median(result.pareto_k) - k_true) < 0.12
    np.testing.assert_allclose(np.logaddexp.reduce(result.smoothed_log_weights, axis=0), 0.0, atol=1e-9)
    assert ((result.ess >= 1) & (result.ess <= 4000)).all()


def test_psis_equal_weights_and_one_set():
    result = diagnostics.psis_diagnostics(np.full((200, 2), -3.0))
    assert np.all(result.pareto_k == -np.inf)
    np.testing.assert_allclose(result.ess, 200.0)
    one = diagnostics.psis_diagnostics(np.random.default_rng(2).normal(scale=0.1, size=500))
    assert np.ndim(one.pareto_k) == 0 and one.pareto_k < 0.5 and one.ess > 450


# -------------------------------------------------------------- importance sampling: a conjugate toy model
# x | z ~ Normal(z, NOISE²), z ~ Normal(0, 1): z | x ~ Normal(x / (1 + NOISE²), NOISE² / (1 + NOISE²))
NOISE = 0.5


def _toy_model(batch):
    with pyro.plate("cells", batch.n_cells, dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
        pyro.sample("x", dist.Normal(z, NOISE), obs=batch.x[:, 0])


def _toy_guide(scale_factor):
    def guide(batch):
        loc = batch.x[:, 0] / (1 + NOISE**2)
        scale = math.sqrt(NOISE**2 / (1 + NOISE**2)) * scale_factor
        with pyro.plate("cells", batch.n_cells, dim=-1):
            pyro.sample("z", dist.Normal(loc, scale))

    return guide


def _toy_batch(n=6):
    x = torch.linspace(-2, 2, n, dtype=torch.float64)[:, None]
    zeros = torch.zeros((n, 1), dtype=torch.long)
    return Minibatch(
        x=x, batch_index=zeros, labels=zeros, log_library=torch.zeros((n, 1), dtype=torch.float64)
    )


def test_importance_weights_exact_posterior_proposal():
    pyro.set_rng_seed(0)
    batch = _toy_batch()
    log_weights = log_importance_weights_in_passes(
        _toy_model, _toy_guide(1.0), batch, 500, samples_per_pass=128
    )
    assert log_weights.shape == (500, 6)
    evidence = dist.Normal(0.0, math.sqrt(1 + NOISE**2)).log_prob(batch.x[:, 0])
    np.testing.assert_allclose(log_weights.numpy(), evidence.expand(500, 6).numpy(), atol=1e-10)  # w = p(x)
    result = diagnostics.psis_diagnostics(log_weights)
    np.testing.assert_allclose(result.ess, 500.0, rtol=1e-8)
    assert (result.pareto_k < 0.3).all()


def test_importance_weights_good_and_bad_proposals():
    batch = _toy_batch()
    pyro.set_rng_seed(1)
    wide = diagnostics.psis_diagnostics(
        log_importance_weights_in_passes(_toy_model, _toy_guide(1.5), batch, 2000)
    )
    pyro.set_rng_seed(1)
    narrow = diagnostics.psis_diagnostics(
        log_importance_weights_in_passes(_toy_model, _toy_guide(0.2), batch, 2000)
    )
    assert (wide.pareto_k < 0.5).all() and (
        wide.ess > 0.5 * 2000
    ).all()  # a wider proposal has bounded weights
    # a proposal with 0.2 × the posterior's scale: weight tail with k = 1 − 0.2² = 0.96 (k̂ is biased low)
    assert np.median(narrow.pareto_k) > 0.7 and (narrow.pareto_k > wide.pareto_k + 0.4).all()
    assert (narrow.ess < 0.25 * 2000).all()


def test_marginal_ll_is_logsumexp_of_the_weights_in_passes():
    batch = _toy_batch()
    pyro.set_rng_seed(5)
    estimate = marginal_log_likelihood(_toy_model, _toy_guide(1.5), batch, 300, samples_per_pass=64)
    pyro.set_rng_seed(5)
    log_weights = log_importance_weights_in_passes(
        _toy_model, _toy_guide(1.5), batch, 300, samples_per_pass=64
    )
    torch.testing.assert_close(estimate, torch.logsumexp(log_weights, 0) - math.log(300))
    evidence = dist.Normal(0.0, math.sqrt(1 + NOISE**2)).log_prob(batch.x[:, 0])
    torch.testing.assert_close(estimate, evidence, atol=0.05, rtol=0)


# ------------------------------------------------------------------ get_marginal_ll(return_diagnostics=True)
def test_marginal_ll_diagnostics_on_the_trained_model(trained):
    settings.seed = 7
    plain = trained.get_marginal_ll(indices=CELLS, n_mc_samples=200, return_mean=False, batch_size=64)
    settings.seed = 7
    table = trained.get_marginal_ll(indices=CELLS, n_mc_samples=200, batch_size=64, return_diagnostics=True)
    assert isinstance(table, pd.DataFrame) and list(table.columns) == ["marginal_ll", "pareto_k", "ess"]
    assert list(table.index) == list(trained.adata.obs_names[CELLS])
    np.testing.assert_allclose(
        table["marginal_ll"].to_numpy(), plain.numpy(), rtol=1e-6
    )  # same draws, same estimate
    assert np.isfinite(table["pareto_k"]).all()
    assert ((table["ess"] >= 1) & (table["ess"] <= 200)).all()
    assert (
        table["pareto_k"].corr(table["ess"], method="spearman") < -0.5
    )  # heavier tail, fewer effective draws
    # the trained guide is a much better proposal than an untrained one
    settings.seed = 7
    untrained = SCVI(trained.adata)
    untrained.is_trained_ = True
    untrained_table = untrained.get_marginal_ll(
        indices=CELLS, n_mc_samples=200, batch_size=64, return_diagnostics=True
    )
    assert table["pareto_k"].median() < untrained_table["pareto_k"].median()
    assert table["marginal_ll"].mean() > untrained_table["marginal_ll"].mean()


# ---------------------------------------------------------------------------- posterior-predictive statistics
OBSERVED = np.array([[0, 2, 4, 0], [1, 1, 1, 0], [3, 0, 6, 0]], dtype=float)
SAMPLES = np.stack(
    [OBSERVED + 1, np.array([[0, 0, 5, 0], [2, 2, 0, 0], [1, 0, 3, 2]], dtype=float)]
)  # (S=2, 3, 4)


def _cv(a, axis):
    mean = a.mean(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, a.std(axis) / mean, np.nan)


def test_statistics_equal_numpy_by_hand():
    np.testing.assert_allclose(
        diagnostics.coefficient_of_variation(OBSERVED, axis=-1),
        [np.std([0, 2, 4, 0]) / 1.5, np.std([1, 1, 1, 0]) / 0.75, np.std([3, 0, 6, 0]) / 2.25],
    )
    cv_gene = diagnostics.coefficient_of_variation(OBSERVED, axis=-2)
    np.testing.assert_allclose(
        cv_gene[:3], [np.std([0, 1, 3]) / (4 / 3), np.std([2, 1, 0]) / 1.0, np.std([4, 1, 6]) / (11 / 3)]
    )
    assert np.isnan(cv_gene[3])  # gene with no counts
    np.testing.assert_allclose(diagnostics.zero_fraction(OBSERVED), [1 / 3, 1 / 3, 0, 1])

    ppc = diagnostics.PosteriorPredictiveCheck.from_arrays(OBSERVED, SAMPLES, cell_names=list("abc"))
    np.testing.assert_allclose(ppc.cv_cell["observed"], _cv(OBSERVED, 1))
    np.testing.assert_allclose(ppc.cv_cell["generated"], np.nanmean(_cv(SAMPLES, 2), axis=0))
    np.testing.assert_allclose(ppc.cv_gene["observed"], _cv(OBSERVED, 0))
    np.testing.assert_allclose(
        ppc.cv_gene["generated"], np.nanmean(_cv(SAMPLES, 1), axis=0)
    )  # draw 0 of gene 3 only
    np.testing.assert_allclose(ppc.zero_fraction["observed"], (OBSERVED == 0).mean(0))
    np.testing.assert_allclose(ppc.zero_fraction["generated"], (SAMPLES == 0).mean(1).mean(0))
    assert list(ppc.cv_cell.index) == list("abc")
    # the (cells, genes, S) layout of posterior_predictive_sample gives the same check
    moved = diagnostics.PosteriorPredictiveCheck.from_arrays(
        OBSERVED, np.moveaxis(SAMPLES, 0, -1), sample_axis=-1
    )
    pd.testing.assert_frame_equal(moved.cv_gene, ppc.cv_gene)

    metrics = ppc.metrics
    assert list(metrics.index) == ["cv_cell", "cv_gene", "zero_fraction"]
    zeros = ppc.zero_fraction
    assert metrics.loc["zero_fraction", "mae"] == pytest.approx(
        np.abs(zeros["observed"] - zeros["generated"]).mean()
    )
    assert metrics.loc["zero_fraction", "pearson"] == pytest.approx(
        np.corrcoef(zeros["observed"], zeros["generated"])[0, 1]
    )
    finite = ppc.cv_gene.dropna()
    assert metrics.loc["cv_gene", "mae"] == pytest.approx(
        np.abs(finite["observed"] - finite["generated"]).mean()
    )


def test_pit_by_hand():
    samples = np.array([0, 1, 1, 2])[:, None].astype(float)  # (S=4, 1)
    pit = diagnostics.predictive_pit(np.array([1.0]), samples, seed=0)
    u = np.random.default_rng(0).random(1)
    np.testing.assert_allclose(pit, 0.25 + u * 0.5)  # F(1⁻) = 1/4, F(1) = 3/4


def test_calibration_true_and_miscalibrated_predictive():
    rng = np.random.default_rng(0)
    n, g, s = 300, 40, 60
    mean = rng.gamma(2.0, 2.0, size=(n, g))
    observed = rng.poisson(mean)
    calibrated = diagnostics.calibration_coverage(observed, rng.poisson(mean, size=(s, n, g)))
    np.testing.assert_allclose(calibrated, diagnostics.CALIBRATION_LEVELS, atol=0.02)
    assert diagnostics.calibration_error(calibrated) < 2e-4
    # observations more dispersed than the predictive: intervals cover too little
    overdispersed = rng.poisson(rng.gamma(1.0, mean))
    too_narrow = diagnostics.calibration_coverage(overdispersed, rng.poisson(mean, size=(s, n, g)))
    assert (too_narrow < np.asarray(diagnostics.CALIBRATION_LEVELS)).all()
    assert diagnostics.calibration_error(too_narrow) > 5e-3
    # a predictive centred on the wrong mean
    shifted = diagnostics.calibration_coverage(observed, rng.poisson(3 * mean + 2, size=(s, n, g)))
    assert diagnostics.calibration_error(shifted) > 2e-2
    ppc = diagnostics.PosteriorPredictiveCheck.from_arrays(observed, rng.poisson(mean, size=(s, n, g)))
    assert ppc.calibration_error < 2e-4 and list(ppc.calibration.index) == list(
        diagnostics.CALIBRATION_LEVELS
    )


def test_posterior_predictive_check_on_the_model_accumulates_minibatches(trained, tmp_path):
    settings.seed = 11
    ppc = diagnostics.posterior_predictive_check(trained, indices=CELLS, n_samples=8, batch_size=32)
    settings.seed = 11
    idata = trained.to_arviz(
        indices=CELLS, n_samples=8, batch_size=32
    )  # same draws (same traces, same order)
    whole = diagnostics.PosteriorPredictiveCheck.from_arrays(
        idata.observed_data["x"].values, idata.posterior_predictive["x"].values[0],
        cell_names=idata.observed_data.cell.values, gene_names=idata.observed_data.gene.values)
    for name in ("cv_cell", "cv_gene", "zero_fraction"):
        pd.testing.assert_frame_equal(getattr(ppc, name), getattr(whole, name), check_index_type=False)
    np.testing.assert_allclose(
        ppc.calibration["coverage"], whole.calibration["coverage"], atol=0.01
    )  # PIT noise
    assert list(ppc.cv_cell.index) == list(trained.adata.obs_names[CELLS]) and ppc.n_samples == 8
    metrics = ppc.metrics
    assert metrics.loc["cv_cell", "pearson"] > 0.5 and metrics.loc["zero_fraction", "pearson"] > 0.5
    assert 0 <= ppc.calibration_error < 0.05
    _png(ppc.plot_cv("cell"), tmp_path / "cv_cell.png")
    _png(ppc.plot_cv("gene"), tmp_path / "cv_gene.png")
    _png(ppc.plot_zero_fraction(), tmp_path / "zeros.png")
    _png(ppc.plot_calibration(), tmp_path / "calibration.png")
    with pytest.raises(ValueError, match="kind"):
        ppc.plot_cv("batch")


def test_plotting_functions_into_given_axes(tmp_path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3)
    plotting.plot_coefficient_of_variation(
        [0.5, 1.0, np.nan, 2.0], [0.6, 0.9, 1.0, 2.2], kind="gene", ax=axes[0]
    )
    plotting.plot_zero_fraction([0.1, 0.5, 0.9], [0.2, 0.5, 0.8], ax=axes[1])
    out = plotting.plot_calibration([0.1, 0.5, 0.9], [0.05, 0.4, 0.85], ax=axes[2])
    assert out is fig
    assert axes[0].get_xscale() == "log" and len(axes[0].collections[0].get_offsets()) == 3  # NaN left out
    assert "calibration error" in axes[2].get_legend().get_texts()[1].get_text()
    _png(fig, tmp_path / "three.png")


def test_plot_legend_reports_the_agreement_scores():
    """The criticism panels compute their legend without importing diagnostics: same numbers."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    observed = rng.gamma(2.0, size=50)
    generated = observed * rng.normal(1.0, 0.1, size=50)
    scores = diagnostics.agreement(observed, generated)
    fig = plotting.plot_coefficient_of_variation(observed, generated, kind="gene")
    label = fig.axes[0].get_legend().get_texts()[0].get_text()
    assert f"Pearson r = {scores['pearson']:.3f}, MAE = {scores['mae']:.3g} (n = 50)" == label
    plt.close(fig)


def test_diagnostics_and_plotting_do_not_import_each_other():
    import ast
    import inspect

    for module, other in ((plotting, "diagnostics"), (diagnostics, "api")):
        tree = ast.parse(inspect.getsource(module))
        imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        assert not any(other in name.split(".") for name in imported), (module.__name__, imported)
