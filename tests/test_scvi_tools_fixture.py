"""A model trained and saved by scvi-tools 1.4.2 gives the same numbers here (../shared/fixtures)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_scvi import SCVI, settings

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "scvi_tools_cellbench5"
needs_fixture = pytest.mark.skipif(not FIXTURE.exists(), reason=f"scvi-tools fixture absent: {FIXTURE}")


@pytest.fixture(scope="module")
def reference():
    settings.seed = 0
    model = SCVI.load(FIXTURE / "model")  # reads the saved adata.h5ad too
    return model, json.loads((FIXTURE / "reference.json").read_text())


@needs_fixture
def test_loaded_model_is_the_saved_one(reference):
    model, _ = reference
    assert model.is_trained and model.summary_stats["n_batch"] == 3 and model.summary_stats["n_labels"] == 5
    assert len(model.history["elbo_train"]) == 100
    assert model.registry["setup_args"]["labels_key"] == "cell_line"


@needs_fixture
def test_latent_mean_and_variance_equal_scvi_tools(reference):
    model, _ = reference
    mean, var = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(mean, np.load(FIXTURE / "latent_mean.npy"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, np.load(FIXTURE / "latent_var.npy"), rtol=1e-5, atol=1e-7)


@needs_fixture
def test_elbo_and_marginal_likelihood_within_one_percent(reference):
    model, ref = reference
    elbo = float(model.get_elbo())
    assert elbo == pytest.approx(ref["elbo_all"], rel=0.01)
    reconstruction = float(model.get_reconstruction_error()["reconstruction_loss"])
    assert reconstruction == pytest.approx(ref["reconstruction_loss_all"], rel=0.01)
    marginal = model.get_marginal_ll(indices=np.arange(100), n_mc_samples=1000)
    assert marginal == pytest.approx(ref["marginal_ll_first100_mc1000"], rel=0.01)


@needs_fixture
def test_normalized_expression_within_monte_carlo_error(reference):
    model, _ = reference
    expected = np.load(FIXTURE / "normalized_expression_mean_n50.npy")
    samples = model.get_normalized_expression(n_samples=50, return_mean=False)  # (50, n, G)
    ours = samples.mean(0)
    # scvi-tools' value is itself a 50-draw mean: the two differ by noise of variance 2·s²/50
    standard_error = np.sqrt(2 * samples.var(0) / 50)
    z = (ours - expected) / np.maximum(standard_error, 1e-12)
    assert np.mean(np.abs(z) < 4) > 0.99
    assert np.corrcoef(np.log(ours.ravel()), np.log(expected.ravel()))[0, 1] > 0.999


@needs_fixture
def test_round_trip_through_our_format_and_back_to_scvi_tools_layout(reference, tmp_path):
    model, _ = reference
    model.save(tmp_path / "ours")
    model.save(tmp_path / "theirs", scvi_tools_format=True, save_anndata=True)
    for path in ("ours", "theirs"):
        again = SCVI.load(tmp_path / path, adata=model.adata)
        for name, tensor in model.module.state_dict().items():
            torch.testing.assert_close(again.module.state_dict()[name], tensor, rtol=0, atol=0)
    assert SCVI.load_registry(tmp_path / "theirs")["setup_args"]["batch_key"] == "batch"
    assert (tmp_path / "theirs" / "adata.h5ad").exists()


@pytest.mark.parametrize("options", [
    dict(gene_likelihood="nb", dispersion="gene-batch"),
    dict(gene_likelihood="poisson", n_layers=2),
    dict(encode_covariates=True, use_observed_lib_size=False),
    dict(dispersion="gene-cell", latent_distribution="ln", use_batch_norm="none", use_layer_norm="both"),
    dict(batch_representation="embedding", encode_covariates=True),
])
def test_every_option_survives_the_scvi_tools_layout(adata, tmp_path, options):
    """Weights written under scvi-tools' names (spec §9) load back into the same model."""
    adata.obs["donor"] = np.repeat(["a", "b", "c"], adata.n_obs // 3)
    adata.obs["age"] = np.linspace(0, 1, adata.n_obs)
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels", categorical_covariate_keys=["donor"],
                       continuous_covariate_keys=["age"])
    model = SCVI(adata, n_hidden=16, **options)
    model.is_trained = True  # random weights are enough to check the mapping
    model.save(tmp_path / "m", scvi_tools_format=True)
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=False)["model_state_dict"]
    assert "px_r" in state or options.get("dispersion") == "gene-cell"
    assert not any(k.startswith(("decoder.hidden", "library_encoder")) for k in state)
    loaded = SCVI.load(tmp_path / "m", adata=adata)
    for ours, theirs in zip(
        loaded.get_latent_representation(return_dist=True), model.get_latent_representation(return_dist=True)
    ):
        np.testing.assert_array_equal(ours, theirs)
    settings.seed = 2
    expected = model.get_normalized_expression(return_numpy=True)
    settings.seed = 2
    np.testing.assert_array_equal(loaded.get_normalized_expression(return_numpy=True), expected)
