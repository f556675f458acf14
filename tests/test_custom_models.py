"""User extensions: the likelihood registry, custom model/guide functions, SCVIModule subclasses.

The examples are the code blocks of docs/custom_models.md, executed as they are written there.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats as st
import torch

from pyro_scvi import SCVI, SCVIModule, settings
from pyro_scvi.data import synthetic_iid
from pyro_scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from pyro_scvi.models import LIKELIHOODS, register_likelihood, unregister_likelihood
from pyro_scvi.models.likelihoods import likelihood_parameters

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_models.md"


def doc_example(name: str) -> str:
    """The python block after ``<!-- example: name -->`` in docs/custom_models.md."""
    blocks = dict(re.findall(r"<!-- example: (\S+) -->\s*```python\n(.*?)```", DOC.read_text(), re.S))
    return blocks[name]


def run_example(name: str) -> dict:
    namespace: dict = {"__name__": f"doc_{name.replace('-', '_')}"}
    exec(compile(doc_example(name), f"{DOC}:{name}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def doc_likelihoods():
    namespace = run_example("likelihoods")
    yield namespace
    for name in ("zip", "nb1"):
        unregister_likelihood(name)


@pytest.fixture(scope="module")
def student_t():
    """The doc's Student-t example, run as written (it trains its model for 10 epochs)."""
    settings.seed = 0
    return run_example("student-t")


def small_adata(seed=3, n_genes=40):
    adata = synthetic_iid(batch_size=50, n_genes=n_genes, n_batches=2, n_labels=2, seed=seed)
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    return adata


# ------------------------------------------------------------------------------- likelihood registry
def test_builtin_likelihoods_keep_their_heads_and_distributions():
    assert {
        k: (v.dispersion, v.zero_inflation)
        for k, v in LIKELIHOODS.items()
        if k in ("zinb", "nb", "poisson", "normal")
    } == {"zinb": (True, True), "nb": (True, False), "poisson": (False, False), "normal": (True, False)}
    torch.manual_seed(0)
    module = SCVIModule(n_input=7, n_batch=2, n_hidden=8, n_latent=3).eval()
    mean, hidden = torch.rand(4, 7) + 0.1, torch.randn(4, 8)
    index = torch.zeros(4, 1, dtype=torch.long)
    theta = module.log_dispersion.exp()
    expected = {
        "zinb": ZeroInflatedNegativeBinomial(mean, theta, module.decoder.zero_inflation_head(hidden)),
        "nb": NegativeBinomial(mean, theta),
        "poisson": dist.Poisson(mean),
        "normal": dist.Normal(mean, theta.expand_as(mean)),
    }
    x = torch.poisson(mean * 3)
    for name, reference in expected.items():
        module.gene_likelihood = name
        built = module.likelihood(mean, hidden, index, index)
        assert type(built) is type(reference)
        torch.testing.assert_close(built.log_prob(x), reference.log_prob(x))
        assert set(likelihood_parameters(built, name)) == {
            "zinb": {"mean", "dispersions", "dropout"},
            "nb": {"mean", "dispersions"},
            "poisson": {"mean"},
            "normal": {"mean", "dispersions"},
        }[name]


def test_unknown_likelihood_names_the_registered_ones_and_how_to_register():
    adata = small_adata()
    with pytest.raises(ValueError, match=r"'zinb'.*register_likelihood"):
        SCVI(adata, gene_likelihood="zero-inflated-banana")


def test_register_likelihood_guards_names():
    factory = lambda mean, theta, logits: dist.Poisson(mean)  # noqa: E731
    with pytest.raises(ValueError, match="built-in"):
        register_likelihood("nb", factory)
    register_likelihood("tmp_poisson", factory, dispersion=False)
    try:
        with pytest.raises(ValueError, match="overwrite=True"):
            register_likelihood("tmp_poisson", factory)
        spec = register_likelihood("tmp_poisson", factory, dispersion=False, overwrite=True)
        assert (
            LIKELIHOODS["tmp_poisson"] is spec
            and spec.parameters_of(dist.Poisson(torch.ones(2, 3))).keys() == {"mean"}
        )
    finally:
        unregister_likelihood("tmp_poisson")
    assert "tmp_poisson" not in LIKELIHOODS
    with pytest.raises(TypeError):
        register_likelihood("bad", "not callable")


def test_zero_inflated_poisson_matches_scipy(doc_likelihoods):
    rng = np.random.default_rng(0)
    mean = torch.tensor(rng.gamma(2.0, 2.0, size=(5, 6)), dtype=torch.float64)
    logits = torch.tensor(rng.normal(size=(5, 6)), dtype=torch.float64)
    x = torch.tensor(rng.poisson(3.0, size=(5, 6)), dtype=torch.float64)
    x[0] = 0
    d = LIKELIHOODS["zip"](mean, None, logits)
    gate = 1 / (1 + np.exp(-logits.numpy()))
    expected = np.log(gate * (x.numpy() == 0) + (1 - gate) * st.poisson.pmf(x.numpy(), mean.numpy()))
    np.testing.assert_allclose(d.log_prob(x).numpy(), expected, rtol=1e-10)
    params = LIKELIHOODS["zip"].parameters_of(d)
    np.testing.assert_allclose(params["dropout"].numpy(), gate, rtol=1e-12)
    np.testing.assert_allclose(params["mean"].numpy(), mean.numpy())


def test_linear_variance_negative_binomial_matches_scipy(doc_likelihoods):
    rng = np.random.default_rng(1)
    mean = torch.tensor(rng.gamma(2.0, 3.0, size=(4, 5)), dtype=torch.float64)
    theta = torch.tensor(rng.gamma(2.0, 1.0, size=5), dtype=torch.float64)  # per gene, (G,)
    x = torch.tensor(rng.poisson(4.0, size=(4, 5)), dtype=torch.float64)
    d = LIKELIHOODS["nb1"](mean, theta, None)
    assert d.batch_shape == (4, 5)
    n, p = mean.numpy() * theta.numpy(), theta.numpy() / (1 + theta.numpy())
    np.testing.assert_allclose(d.log_prob(x).numpy(), st.nbinom.logpmf(x.numpy(), n, p), rtol=1e-9)
    np.testing.assert_allclose(d.mean.numpy(), mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(d.variance.numpy(), mean.numpy() * (1 + 1 / theta.numpy()), rtol=1e-9)
    params = LIKELIHOODS["nb1"].parameters_of(d)
    np.testing.assert_allclose(
        params["dispersions"].numpy(), np.broadcast_to(theta.numpy(), (4, 5)), rtol=1e-9
    )


@pytest.mark.parametrize("name, keys", [("zip", {"mean", "dropout"}), ("nb1", {"mean", "dispersions"})])
def test_registered_likelihood_end_to_end_and_reload(doc_likelihoods, tmp_path, name, keys):
    settings.seed = 0
    adata = small_adata()
    model = SCVI(adata, gene_likelihood=name, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, enable_progress_bar=False)
    assert np.isfinite(model.history["elbo_train"].values).all()
    elbo = model.get_elbo()
    assert torch.isfinite(elbo) and elbo < 0
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=10))
    counts = model.posterior_predictive_sample(indices=np.arange(10), n_samples=2).todense()
    assert (
        counts.shape == (10, adata.n_vars, 2)
        and (counts >= 0).all()
        and np.allclose(counts, np.round(counts))
    )
    params = model.get_likelihood_parameters(indices=np.arange(10))
    assert set(params) == keys and all(v.shape == (10, adata.n_vars) for v in params.values())

    model.save(tmp_path / name)
    spec = LIKELIHOODS[name]
    unregister_likelihood(name)
    try:
        with pytest.raises(ValueError, match=rf"gene_likelihood='{name}'.*register_likelihood"):
            SCVI.load(tmp_path / name, adata)
    finally:
        register_likelihood(name, spec.factory, dispersion=spec.dispersion,
                            zero_inflation=spec.zero_inflation, parameters=spec.parameters)
    loaded = SCVI.load(tmp_path / name, adata)
    assert loaded.module.gene_likelihood == name
    settings.seed = 1
    before = model.get_likelihood_parameters(indices=np.arange(5))
    settings.seed = 1
    after = loaded.get_likelihood_parameters(indices=np.arange(5))
    for key in keys:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5)
    with pytest.raises(ValueError, match="scvi_tools_format"):
        model.save(tmp_path / "for_scvi_tools", scvi_tools_format=True)


# ------------------------------------------------------------------------------- custom functions
def test_doc_example_runs_every_api_method(student_t):
    ns = student_t
    model, adata = ns["model"], ns["adata"]
    assert model.module.has_custom_model and model.module.has_custom_guide
    assert np.isfinite(model.history["elbo_train"].values).all()
    assert ns["latent"].shape == (adata.n_obs, 5) and np.isfinite(ns["latent"]).all()
    expression = ns["expression"].to_numpy()
    assert expression.shape == (adata.n_obs, adata.n_vars)
    np.testing.assert_allclose(expression.sum(1), 1.0, rtol=1e-4)
    assert ns["corrected"].shape == (adata.n_obs, adata.n_vars)
    assert torch.isfinite(ns["elbo"]) and ns["elbo"] < 0
    assert np.isfinite(ns["log_evidence"]) and ns["log_evidence"] < 0
    assert ns["counts"].shape == (adata.n_obs, adata.n_vars, 2)
    assert set(ns["parameters"]) == {"mean", "dispersions", "dropout"}
    assert {"proba_m1", "bayes_factor", "scale1"} <= set(ns["de"].columns) and len(ns["de"]) == adata.n_vars
    # ν was learned (it starts at 5) and lives in the model's own parameter-store scope only
    assert ns["df"] > 0 and not torch.isclose(ns["df"], torch.tensor(5.0))
    assert "z_prior_df" not in pyro.get_param_store()
    # the Student-t prior makes the KL Monte-Carlo: the reconstruction and KL still split the ELBO
    rec = model.get_reconstruction_error()["reconstruction_loss"]
    assert torch.isfinite(rec) and rec > 0


def test_pyro_params_of_custom_models_are_private_to_each_instance(student_t):
    ns = student_t
    first = ns["model"]
    learned = first.get_pyro_params()["z_prior_df"].clone()
    settings.seed = 1
    second = SCVI(
        ns["adata"], n_latent=5, n_hidden=32, model_fn=ns["student_t_model"], guide_fn=ns["normal_guide"]
    )
    second.train(max_epochs=1, enable_progress_bar=False, plan_kwargs={"lr": 0.05})
    assert not torch.isclose(second.get_pyro_params()["z_prior_df"], learned)
    torch.testing.assert_close(first.get_pyro_params()["z_prior_df"], learned)  # untouched by the other model
    assert "z_prior_df" not in pyro.get_param_store()


def test_custom_functions_save_and_need_to_be_passed_to_load(student_t, tmp_path):
    ns = student_t
    model, adata = ns["model"], ns["adata"]
    model.save(tmp_path / "student")
    with pytest.raises(ValueError, match="model_fn"):
        SCVI.load(tmp_path / "student", adata)
    with pytest.raises(ValueError, match="guide_fn"):
        SCVI.load(tmp_path / "student", adata, model_fn=ns["student_t_model"])
    loaded = SCVI.load(
        tmp_path / "student", adata, model_fn=ns["student_t_model"], guide_fn=ns["normal_guide"]
    )
    torch.testing.assert_close(loaded.get_pyro_params()["z_prior_df"], model.get_pyro_params()["z_prior_df"])
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="scvi_tools_format"):
        model.save(tmp_path / "for_scvi_tools", scvi_tools_format=True)
    with pytest.raises(ValueError, match="custom guide"):
        model.minify_adata()


def _contract_model(drop_x=False, extra_latent=False, record_expression=True):
    """A short scVI model with optional breaches of the contract."""

    def model_fn(module, batch, transform_batch=None):
        pyro.module("scvi", module)
        n, d = batch.n_cells, module.n_latent
        cells = batch if transform_batch is None else batch.with_batch(transform_batch)
        with pyro.plate("cells", n, dim=-1):
            # (…, n, d)
            z = pyro.sample("z", dist.Normal(batch.log_library.new_zeros((n, d)), 1.0).to_event(1))
            log_library = batch.log_library  # (n, 1)
            if extra_latent:  # a per-cell size-factor correction u ~ N(0, 0.1)
                log_library = log_library + pyro.sample(
                    "u", dist.Normal(batch.log_library.new_zeros((n, 1)), 0.1).to_event(1)
                )
            h, covs = module.decoder_input(z, cells, cells.batch_index)
            hidden = module.decoder(h, *covs)
            rho = module.decoder.scale_head(hidden)  # (…, n, G)
            if record_expression:
                pyro.deterministic("normalized_expression", rho, event_dim=1)
            likelihood = module.likelihood(log_library.exp() * rho, hidden, cells.batch_index, batch.labels)
            if not drop_x:
                pyro.sample("x", likelihood.to_event(1), obs=batch.x)  # (n, G)

    return model_fn


def test_train_names_the_site_a_custom_model_lacks():
    adata = small_adata()
    with pytest.raises(ValueError, match="no site 'x'"):
        SCVI(adata, n_hidden=8, model_fn=_contract_model(drop_x=True)).train(
            max_epochs=1, enable_progress_bar=False
        )
    with pytest.raises(ValueError, match=r"\['u'\] have no guide site"):
        SCVI(adata, n_hidden=8, model_fn=_contract_model(extra_latent=True)).train(
            max_epochs=1, enable_progress_bar=False
        )
    with pytest.raises(TypeError, match="model_fn must be a function"):
        SCVI(adata, model_fn="scvi")


def test_queries_name_missing_sites_and_refuse_what_they_cannot_do():
    settings.seed = 0
    adata = small_adata()

    # the built-in q(z | x) and q(u | x) = N(loc_u, 0.05)
    def guide_with_u(module, batch, transform_batch=None):
        pyro.module("scvi", module)
        loc = pyro.param("u_loc", torch.zeros(1))  # (1,)
        with pyro.plate("cells", batch.n_cells, dim=-1):  # one "cells" plate per function
            z_loc, z_scale = module.z_encoder(*module.encoder_input(batch)[:1])  # (n, d) each
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))  # (…, n, d)
            pyro.sample("u", dist.Normal(loc.expand(batch.n_cells, 1), 0.05).to_event(1))  # (…, n, 1)

    model = SCVI(adata, n_hidden=8, n_latent=3,
                 model_fn=_contract_model(extra_latent=True, record_expression=False), guide_fn=guide_with_u)
    assert model.module.has_custom_model and model.module.has_custom_guide
    model.train(max_epochs=2, enable_progress_bar=False)
    assert set(model.history) >= {"elbo_train", "kl_local_train"}
    assert torch.isfinite(model.get_elbo()) and np.isfinite(model.get_marginal_ll(n_mc_samples=5))
    assert model.get_latent_representation().shape == (adata.n_obs, 3)
    with pytest.raises(KeyError, match="no site 'normalized_expression'.*pyro.deterministic"):
        model.get_normalized_expression()
    with pytest.raises(KeyError, match="no site 'mean'"):
        model.get_normalized_expression(library_size="latent")
    record = SCVI(
        adata, n_hidden=8, n_latent=3, model_fn=_contract_model(extra_latent=True), guide_fn=guide_with_u
    )
    record.module.load_state_dict(model.module.state_dict())
    record.is_trained_ = True
    assert record.get_normalized_expression(return_numpy=True).shape == (adata.n_obs, adata.n_vars)
    with pytest.raises(ValueError, match=r"further per-cell latent site\(s\) \['u'\]"):
        record.get_normalized_expression(indices=np.arange(20), n_samples_overall=10, weights="importance",
                                         max_cells=10, n_mc_samples=4, n_mc_samples_per_pass=4)


def test_subclassed_module_trains_saves_and_loads(tmp_path):
    ns = run_example("subclass")
    BackgroundSCVI = ns["BackgroundSCVI"]
    settings.seed = 0
    adata = synthetic_iid(batch_size=60, n_genes=40, n_batches=2, n_labels=2, seed=4)
    BackgroundSCVI.setup_anndata(adata, batch_key="batch")
    model = BackgroundSCVI(adata, n_hidden=16, n_latent=3)
    assert isinstance(model.module, ns["BackgroundModule"]) and model.module.has_custom_model
    assert not model.module.has_custom_guide
    start = model.module.log_background.detach().clone()
    model.train(max_epochs=3, enable_progress_bar=False)
    assert not torch.equal(model.module.log_background.detach(), start)  # the new weight trains
    assert model.get_normalized_expression(return_numpy=True).shape == (adata.n_obs, adata.n_vars)
    assert torch.isfinite(model.get_elbo())

    model.save(tmp_path / "background")
    loaded = BackgroundSCVI.load(tmp_path / "background", adata)
    torch.testing.assert_close(loaded.module.log_background, model.module.log_background)
    with pytest.raises(ValueError, match="module class 'BackgroundModule'"):
        SCVI.load(tmp_path / "background", adata, allowed_classes_names_list=["BackgroundSCVI"])
