"""scANVI's share of SCVI's API: minified data, ArviZ export, a proper marginal likelihood, training
from a datamodule, and the z2 networks' layer shapes (labels injected into every layer)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pyro import plate, poutine
from test_scanvi import _fixed, _model, _partly_labelled

from pyro_scvi import SCANVI
from pyro_scvi.data.synthetic import synthetic_iid
from pyro_scvi.infer.importance import log_importance_weights_in_passes
from pyro_scvi.models.scanvi import Z2, Y
from pyro_scvi.models.scanvi_module import SCANVIModule
from pyro_scvi.models.sites import PARTICLES, X, Z

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    adata, _ = _partly_labelled(0.2)
    model = _model(adata)
    model.train(max_epochs=25, batch_size=64, enable_progress_bar=False)
    return model


def _with_posterior(model):
    adata = model.adata.copy()
    adata.obsm["X_latent_qzm"], adata.obsm["X_latent_qzv"] = model.get_latent_representation(return_dist=True)
    return adata


@pytest.fixture
def minified(trained, tmp_path):
    """A copy of the trained model (saved and loaded) on its minified AnnData, and the full model."""
    trained.save(tmp_path / "full", save_anndata=True, overwrite=True)
    model = SCANVI.load(tmp_path / "full", adata=_with_posterior(trained))
    model.minify_adata(use_latent_qzm_key="X_latent_qzm", use_latent_qzv_key="X_latent_qzv")
    return model


# ---------------------------------------------------------------------------------- 5. layer shapes
@pytest.mark.parametrize("n_labels", [3, 1])
def test_labels_are_injected_into_every_layer_of_the_z2_networks(n_labels):
    """scvi-tools' encoder_z2_z1/decoder_z1_z2: (H, d + L) then (H, H + L); L = 1 adds no column."""
    module = SCANVIModule(30, n_labels=n_labels, n_batch=1, n_hidden=16, n_latent=4, n_layers=3)
    state = module.state_dict()
    extra = n_labels if n_labels > 1 else 0
    for network in ("z2_encoder", "z1_decoder"):
        assert state[f"{network}.hidden.fc_layers.Layer 0.0.weight"].shape == (16, 4 + extra)
        for layer in (1, 2):
            assert state[f"{network}.hidden.fc_layers.Layer {layer}.0.weight"].shape == (16, 16 + extra)
        assert state[f"{network}.loc_head.weight"].shape == (4, 16)
    for layer in (1, 2):  # the classifier has no label input
        assert state[f"classifier.hidden.fc_layers.Layer {layer}.0.weight"].shape == (16, 16)
    module.eval()
    z = torch.randn(5, 4)
    enumerated = torch.arange(n_labels).reshape(-1, 1)  # (L, 1): every label for every cell
    loc, scale = module.z2_posterior(z, enumerated)
    assert loc.shape == scale.shape == (n_labels, 5, 4)
    for k in range(n_labels):  # the enumerated rows are the per-label evaluations
        one = module.z2_posterior(z, torch.full((5,), k))
        torch.testing.assert_close(loc[k], one[0])
        torch.testing.assert_close(scale[k], one[1])


def test_two_layer_model_trains_and_predicts():
    adata, truth = _partly_labelled(0.2)
    model = _model(adata, n_layers=2)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    assert model.predict().shape == (adata.n_obs,)


# ------------------------------------------------------------------------------------ 1. minified
def test_minified_model_predicts_and_queries_from_the_stored_posterior(trained, minified):
    mini = minified.adata
    assert minified.minified_data_type == "latent_posterior_parameters"
    assert {"scanvi_latent_qzm", "scanvi_latent_qzv"} <= set(mini.obsm) and "observed_lib_size" in mini.obs
    assert mini.X.nnz == 0
    pd.testing.assert_frame_equal(minified.predict(soft=True), trained.predict(soft=True))
    np.testing.assert_array_equal(minified.predict(), trained.predict())
    np.testing.assert_array_equal(minified.get_latent_representation(), trained.get_latent_representation())
    expression = minified.get_normalized_expression(n_samples=2, return_mean=True)
    assert expression.shape == (mini.n_obs, mini.n_vars) and np.isfinite(expression.to_numpy()).all()


@pytest.mark.parametrize("call", [
    lambda m: m.get_elbo(), lambda m: m.get_reconstruction_error(),
    lambda m: m.get_marginal_ll(n_mc_samples=2),
    lambda m: m.to_arviz(n_samples=2), lambda m: m.train(max_epochs=1),
])
def test_minified_model_refuses_what_needs_counts(minified, call):
    with pytest.raises(ValueError, match="does not support minified data"):
        call(minified)


def test_minified_model_saves_and_loads(trained, minified, tmp_path):
    minified.save(tmp_path / "mini", save_anndata=True)
    loaded = SCANVI.load(tmp_path / "mini")
    assert loaded.minified_data_type == "latent_posterior_parameters"
    pd.testing.assert_frame_equal(loaded.predict(soft=True), trained.predict(soft=True))
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())


@pytest.mark.parametrize("names", [
    ("_scanvi_latent_qzm", "_scanvi_latent_qzv", "_scanvi_observed_lib_size"),  # scvi-tools ≤ 1.2.0
    ("latent_qzm", "latent_qzv", "observed_lib_size"),  # 1.2.1
])
def test_minified_anndata_of_older_releases_is_read(trained, minified, tmp_path, names):
    minified.save(tmp_path / "mini", overwrite=True)
    old = minified.adata.copy()
    qzm, qzv, library = names
    old.obsm[qzm] = old.obsm.pop("scanvi_latent_qzm")
    old.obsm[qzv] = old.obsm.pop("scanvi_latent_qzv")
    old.obs[library] = old.obs.pop("observed_lib_size")
    loaded = SCANVI.load(tmp_path / "mini", adata=old)
    np.testing.assert_array_equal(loaded.predict(), trained.predict())
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())


def test_minified_with_counts_keeps_every_method(trained, tmp_path):
    trained.save(tmp_path / "full", save_anndata=True)
    model = SCANVI.load(tmp_path / "full", adata=_with_posterior(trained))
    model.minify_adata("latent_posterior_parameters_with_counts")
    assert np.asarray(model.adata.X).sum() > 0 and "scanvi_latent_qzm" in model.adata.obsm
    pd.testing.assert_frame_equal(model.predict(soft=True), trained.predict(soft=True))
    assert np.isfinite(float(model.get_elbo()))
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)


# ------------------------------------------------------------------------------------ 2. to_arviz
def test_to_arviz_has_sampled_labels_label_probabilities_and_the_count_likelihood(trained):
    cells = np.arange(8)
    torch.manual_seed(1)
    idata = trained.to_arviz(indices=cells, n_samples=6)
    post = idata.posterior
    assert post["z"].shape == (1, 6, 8, 4) and post[Z2].shape == (1, 6, 8, 4)
    assert post[Y].shape == (1, 6, 8) and post[Y].dtype == np.int64
    assert set(np.unique(post[Y].values)) <= {0, 1, 2}
    assert post[Y].attrs["categories"] == ["label_2", "label_0", "label_1"]
    assert post["y_probs"].shape == (1, 6, 8, 3) and list(post["label"].values) == ["label_2", "label_0",
                                                                                    "label_1"]
    np.testing.assert_allclose(post["y_probs"].sum("label").values, 1.0, rtol=1e-5)
    assert idata.posterior_predictive[X].shape == (1, 6, 8, trained.adata.n_vars)
    assert idata.log_likelihood[X].shape == (1, 6, 8)

    module = trained.module.eval()
    batch = next(trained.minibatches(indices=cells))
    z1 = torch.as_tensor(post["z"].values[0])  # (S, n, d)
    with torch.no_grad():
        torch.testing.assert_close(module.classify(z1), torch.as_tensor(post["y_probs"].values[0]))
        for s in (0, 5):  # log p(x | z1) of the model at draw s, whatever y and z2
            values = {Z: z1[s], Y: torch.as_tensor(post[Y].values[0, s]),
                      Z2: torch.as_tensor(post[Z2].values[0, s])}
            trace = poutine.trace(_fixed(module.model, values)).get_trace(batch)
            log_lik = trace.nodes[X]["fn"].log_prob(batch.x)
            np.testing.assert_allclose(idata.log_likelihood[X].values[0, s], log_lik.numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------- 3. marginal likelihood
def _quadrature_log_evidence(module, batch, half_width: float = 9.0, n_grid: int = 1201) -> torch.Tensor:
    """log p(x_n) by Riemann sums on grids of z1 and z2 (d = 1; the grid error is below 1e-4 nats here)."""
    grid = torch.linspace(-half_width, half_width, n_grid, dtype=torch.float64)
    step = float(grid[1] - grid[0])
    n, n_labels = batch.n_cells, module.n_labels
    z1 = grid.reshape(-1, 1, 1).expand(n_grid, n, 1).float()
    with plate(PARTICLES, n_grid, dim=-2):  # log p(x | z1) for every grid point and cell: (M, n)
        values = {Z: z1, Y: torch.zeros(n_grid, n, dtype=torch.long), Z2: torch.zeros(n_grid, n, 1)}
        trace = poutine.trace(_fixed(module.model, values)).get_trace(batch)
    log_lik = trace.nodes[X]["fn"].log_prob(batch.x).double()  # (M, n)
    log_prior_z1 = []  # log p(z1) = log Σ_y p(y) ∫ p(z1 | z2, y) N(z2; 0, 1) dz2 on the grid: (M,)
    for k in range(n_labels):
        loc, scale = module.z1_prior(grid.reshape(-1, 1).float(), torch.full((n_grid,), k))  # (M2, 1)
        p_z1 = torch.distributions.Normal(loc.double().T, scale.double().T)  # batch (1, M2)
        log_density = p_z1.log_prob(grid.reshape(-1, 1))  # (M, M2)
        log_z2 = torch.distributions.Normal(0.0, 1.0).log_prob(grid)  # (M2,)
        log_prior_z1.append(torch.logsumexp(log_density + log_z2, dim=1) + math.log(step)
                            + module.y_prior[0, k].double().log())
    log_prior_z1 = torch.logsumexp(torch.stack(log_prior_z1), dim=0)  # (M,)
    return torch.logsumexp(log_lik + log_prior_z1[:, None], dim=0) + math.log(step)  # (n,)


def test_marginal_ll_agrees_with_quadrature_in_one_latent_dimension():
    adata = synthetic_iid(batch_size=60, n_genes=12, n_batches=1, n_labels=2, seed=3)
    labelled = np.arange(adata.n_obs) % 3 == 0
    adata.obs["partial"] = np.where(labelled, adata.obs["labels"].astype(str), "Unknown")
    SCANVI.setup_anndata(adata, labels_key="partial", unlabeled_category="Unknown")
    torch.manual_seed(0)
    model = SCANVI(adata, n_hidden=16, n_latent=1, gene_likelihood="nb")
    model.train(max_epochs=3, batch_size=30, enable_progress_bar=False)
    cells = np.arange(4)
    module = model.module.eval()
    with torch.no_grad():
        exact = _quadrature_log_evidence(module, next(model.minibatches(indices=cells)))
    torch.manual_seed(0)
    estimate = model.get_marginal_ll(indices=cells, n_mc_samples=4000, return_mean=False).double()
    # Monte-Carlo spread ≈ 0.07 nats per cell here (ESS 200-400 of 4000); the ELBO is 2-11 nats below
    torch.testing.assert_close(estimate, exact, atol=0.3, rtol=0)
    assert abs(float((estimate - exact).mean())) < 0.12
    elbo = model.get_elbo(indices=cells, return_mean=False).double()
    assert bool((elbo < exact).all())


def test_marginal_ll_is_above_the_elbo_and_matches_the_estimator_that_samples_y(trained):
    cells = np.arange(40)
    torch.manual_seed(0)
    elbo = trained.get_elbo(indices=cells, return_mean=False)
    few = trained.get_marginal_ll(indices=cells, n_mc_samples=5, return_mean=False)
    many = trained.get_marginal_ll(indices=cells, n_mc_samples=1000, return_mean=False)
    assert bool(torch.isfinite(many).all()) and many.shape == (40,)
    assert float(many.mean()) >= float(few.mean()) >= float(elbo.mean())
    assert float((many - elbo.cpu()).mean()) > 0
    module = trained.module.eval()
    with trained.pyro_scope(), torch.no_grad():  # y sampled from q(y | z1): the same p(x), noisier
        batch = next(trained.minibatches(indices=cells))
        log_w = log_importance_weights_in_passes(module.model, module.guide, batch, 1000)
    sampled_y = torch.logsumexp(log_w, 0) - math.log(1000)
    assert abs(float(sampled_y.mean() - many.mean())) < 1.0
    assert isinstance(trained.get_marginal_ll(indices=cells, n_mc_samples=3), float)
    table = trained.get_marginal_ll(indices=cells, n_mc_samples=20, return_diagnostics=True)
    assert list(table.columns) == ["marginal_ll", "pareto_k", "ess"] and len(table) == 40
    with pytest.raises(ValueError, match="proposal='guide'"):
        trained.get_marginal_ll(indices=cells, n_mc_samples=3, proposal="defensive")


# ------------------------------------------------------------------------------- 4. datamodule, DDP
class _DataModule:
    """A custom datamodule: tensor dicts with scvi-tools' keys, or [full, labelled] pairs of them."""

    def __init__(self, adata, pairs: bool, with_labels: bool = True, batch_size: int = 50):
        self.x = torch.as_tensor(np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X),
                                 dtype=torch.float32)
        self.labels = torch.as_tensor(adata.obs["_scvi_labels"].to_numpy()).reshape(-1, 1)
        self.pairs, self.with_labels, self.batch_size = pairs, with_labels, batch_size
        self.labelled = np.flatnonzero(adata.obs["partial"].to_numpy() != "Unknown")

    def _dict(self, rows):
        tensors = {"X": self.x[rows], "batch": torch.zeros(len(rows), 1, dtype=torch.long)}
        if self.with_labels:
            tensors["labels"] = self.labels[rows]
        return tensors

    def train_dataloader(self):
        order = np.random.permutation(len(self.x))
        for start in range(0, len(order), self.batch_size):
            full = self._dict(order[start:start + self.batch_size])
            yield [full, self._dict(np.random.permutation(self.labelled)[:20])] if self.pairs else full


@pytest.mark.parametrize("pairs", [True, False])
def test_training_from_a_datamodule_keeps_the_classification_term(pairs):
    adata, _ = _partly_labelled(0.2)
    model = _model(adata)
    model.train(max_epochs=2, datamodule=_DataModule(adata, pairs), enable_progress_bar=False)
    assert model.is_trained_
    loss = model.history["train_classification_loss"].to_numpy()
    assert loss.shape[0] == 2 and np.isfinite(loss).all()
    assert "train_accuracy" in model.history


def test_datamodule_without_labels_and_data_parallel_training_are_refused():
    adata, _ = _partly_labelled(0.2)
    model = _model(adata)
    with pytest.raises(ValueError, match=r"\[full, labelled\] pairs.*'labels'"):
        model.train(max_epochs=1, datamodule=_DataModule(adata, pairs=False, with_labels=False),
                    enable_progress_bar=False)
    with pytest.warns(UserWarning, match="sampler is not available"):
        model.train(max_epochs=1, datamodule=_DataModule(adata, pairs=True), n_samples_per_label=5,
                    enable_progress_bar=False)
    for options in (dict(strategy="ddp"), dict(devices=2), dict(devices=[0, 1], strategy="ddp")):
        with pytest.raises(ValueError, match="SCANVI does not train data-parallel.*devices=1"):
            model.train(max_epochs=1, **options)

