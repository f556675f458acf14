"""Training: KL schedule, epochs heuristic, split rules, history, early stopping, seeds, options."""

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_scvi import SCVI, settings
from pyro_scvi.data import synthetic_iid
from pyro_scvi.data.loader import split_indices
from pyro_scvi.infer.training import EarlyStopping, kl_weight_at, max_epochs_heuristic
from pyro_scvi.metrics import silhouette_score


def test_kl_weight_schedule():
    assert kl_weight_at(0, 0, 400, None) == 0.0
    assert kl_weight_at(100, 5, 400, None) == 0.25
    assert kl_weight_at(400, 5, 400, None) == 1.0
    assert kl_weight_at(3, 50, None, 100) == 0.5  # steps when no epoch warm-up
    assert kl_weight_at(3, 50, 10, 100) == 0.3  # epochs take precedence
    assert kl_weight_at(3, 50, None, None, max_kl_weight=0.8) == 0.8
    assert kl_weight_at(1, 0, 4, None, min_kl_weight=0.2, max_kl_weight=0.6) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        kl_weight_at(0, 0, 10, None, min_kl_weight=2.0)


def test_max_epochs_heuristic():
    assert max_epochs_heuristic(909) == 400
    assert max_epochs_heuristic(40000) == 200
    assert max_epochs_heuristic(20000) == 400
    with pytest.warns(UserWarning):
        assert max_epochs_heuristic(10_000_000) == 1


def test_split_is_validation_first_and_seeded():
    train, val, test = split_indices(100, 0.9, batch_size=128, seed=0)
    order = np.random.RandomState(0).permutation(100)
    np.testing.assert_array_equal(val, order[:10])
    np.testing.assert_array_equal(train, order[10:])
    assert len(test) == 0
    train, val, test = split_indices(100, 0.7, 0.2, batch_size=128, seed=0)
    assert (len(train), len(val), len(test)) == (70, 20, 10)
    train, _, _ = split_indices(100, 0.9, shuffle=False)
    np.testing.assert_array_equal(train, np.arange(10, 100))


@pytest.mark.parametrize("train_size", [0.9, None, 1.0])
def test_split_never_leaves_a_tiny_training_minibatch(train_size):
    # 143 cells, batch 128: ceil(0.9*143)=129 → remainder 1;
    # with train_size=1.0: 143 → 15 (fine), use 129 cells
    n = 143 if train_size != 1.0 else 129
    with pytest.warns(UserWarning, match="moved"):
        train, val, test = split_indices(n, train_size, batch_size=128, seed=0)
    assert len(train) % 128 not in (1, 2)
    assert len(train) + len(val) + len(test) == n
    assert len(set(train) | set(val) | set(test)) == n


def test_split_errors():
    with pytest.raises(ValueError, match="train_size"):
        split_indices(10, 1.5)
    with pytest.raises(ValueError, match="validation_size"):
        split_indices(10, 0.5, 0.7)
    with pytest.raises(ValueError, match="BatchNorm"):
        split_indices(1, 1.0)


def test_early_stopping_counts_non_improving_checks():
    stopper = EarlyStopping(patience=2)
    assert not stopper.should_stop(0, {"elbo_validation": 10.0})
    assert not stopper.should_stop(1, {"elbo_validation": 11.0})
    assert stopper.should_stop(2, {"elbo_validation": 10.5})
    assert "did not improve" in stopper.reason


def test_history_keys_signs_and_append(trained):
    h = trained.history
    for key in ["train_loss", "elbo_train", "reconstruction_loss_train", "kl_local_train", "kl_global_train",
                "kl_weight", "validation_loss", "elbo_validation", "reconstruction_loss_validation",
                "kl_local_validation", "kl_global_validation"]:
        assert (
            isinstance(h[key], pd.DataFrame)
            and list(h[key].columns) == [key]
            and h[key].index.name == "epoch"
        )
    assert len(h["elbo_train"]) == 40 and len(h["elbo_validation"]) == 8
    assert (h["elbo_train"][["elbo_train"]].to_numpy() > 0).all()  # negative ELBO: positive
    np.testing.assert_allclose(
        h["elbo_train"].to_numpy().ravel(),
        (h["reconstruction_loss_train"].to_numpy() + h["kl_local_train"].to_numpy()).ravel(), rtol=1e-6)
    np.testing.assert_allclose(h["kl_weight"].to_numpy().ravel(), np.arange(40) / 400)
    assert h["elbo_train"].iloc[-1, 0] < h["elbo_train"].iloc[0, 0]
    # get_elbo is the negation of the history's per-cell negative ELBO (same data, same weights: close)
    elbo_val = float(trained.get_elbo(indices=trained.validation_indices))
    assert elbo_val < 0 and abs(-elbo_val - h["elbo_validation"].iloc[-1, 0]) / abs(elbo_val) < 0.05


def test_retraining_appends_history_and_early_stopping(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=3, enable_progress_bar=False)
    assert "elbo_validation" not in model.history  # no validation unless asked
    model.train(max_epochs=200, early_stopping=True, early_stopping_patience=2, early_stopping_min_delta=1e6,
                enable_progress_bar=False, plan_kwargs={"lr": 1e-3})
    epochs = model.history["elbo_train"].index.to_numpy()
    np.testing.assert_array_equal(epochs, np.arange(len(epochs)))
    assert len(epochs) == 3 + 3  # the first check sets the best value, two more without improvement stop it
    with pytest.raises(ValueError, match="no validation set"):
        model.train(max_epochs=2, train_size=1.0, early_stopping=True, enable_progress_bar=False)


def test_bad_arguments_are_named(adata):
    SCVI.setup_anndata(adata)
    model = SCVI(adata)
    with pytest.raises(TypeError, match="max_epoch"):
        model.train(max_epoch=3)
    with pytest.raises(TypeError, match="learning_rate"):
        model.train(max_epochs=1, plan_kwargs={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="optimizer"):
        model.train(max_epochs=1, plan_kwargs={"optimizer": "SGD"})
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):  # DDP needs a torchrun launch
        model.train(max_epochs=1, devices=2)


def test_same_seed_same_numbers_on_cpu(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    latents = []
    for _ in range(2):
        settings.seed = 7
        model = SCVI(adata, n_hidden=32)
        model.train(max_epochs=3, enable_progress_bar=False)
        latents.append(model.get_latent_representation())
        indices = model.validation_indices
    np.testing.assert_array_equal(latents[0], latents[1])
    settings.seed = 8
    other = SCVI(adata, n_hidden=32)
    other.train(max_epochs=3, enable_progress_bar=False)
    assert not np.array_equal(other.validation_indices, indices)


def test_inference_recovers_generated_cell_types_and_expression():
    settings.seed = 0
    data = synthetic_iid(batch_size=300, n_genes=300, n_batches=2, n_labels=3, seed=3)
    SCVI.setup_anndata(data, batch_key="batch", labels_key="labels")
    model = SCVI(data)
    model.train(max_epochs=60, enable_progress_bar=False)
    latent = model.get_latent_representation()
    assert silhouette_score(latent, data.obs["labels"]) > 0.3
    # batches mix (0.17 at 60 epochs, 0.07 at 150)
    assert abs(silhouette_score(latent, data.obs["batch"])) < 0.25
    # decoded in each batch and averaged, the normalized expression of a cell type matches its true profile
    expression = model.get_normalized_expression(transform_batch=["batch_0", "batch_1"], return_numpy=True)
    from scipy.stats import spearmanr

    truth = data.varm["true_expression"]
    for k in range(3):
        cells = (data.obs["labels"] == f"label_{k}").to_numpy()
        assert spearmanr(expression[cells].mean(0), truth[:, k]).statistic > 0.9


@pytest.mark.parametrize(
    "options",
    [
        dict(gene_likelihood="nb", dispersion="gene-batch"),
        dict(gene_likelihood="poisson"),
        dict(gene_likelihood="normal", dispersion="gene-label"),
        dict(dispersion="gene-cell", latent_distribution="ln"),
        dict(use_observed_lib_size=False, n_layers=2, encode_covariates=True, deeply_inject_covariates=False),
        dict(use_batch_norm="none", use_layer_norm="both", var_activation="softplus", log_variational=False),
    ],
)
def test_every_option_trains_and_answers(adata, options):
    adata.obs["cont"] = np.random.default_rng(0).normal(size=adata.n_obs)
    adata.obs["donor"] = np.repeat(["a", "b", "c"], adata.n_obs // 3)
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="labels",
                       categorical_covariate_keys=["donor"], continuous_covariate_keys=["cont"])
    model = SCVI(adata, n_hidden=32, n_latent=5, **options)
    model.train(max_epochs=3, enable_progress_bar=False, check_val_every_n_epoch=1)
    assert np.isfinite(model.history["elbo_validation"].to_numpy()).all()
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 5) and np.isfinite(latent).all()
    if options.get("latent_distribution") == "ln":
        np.testing.assert_allclose(latent.sum(1), 1.0, rtol=1e-5)
    expression = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(expression.sum(1), 1.0, rtol=1e-4)
    assert np.isfinite(float(model.get_elbo()))
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=5))


def test_size_factor_replaces_library(adata):
    adata.obs["sf"] = np.asarray(adata.X.sum(1)).ravel() / 1000.0
    SCVI.setup_anndata(adata, batch_key="batch", size_factor_key="sf")
    model = SCVI(adata, n_hidden=16, use_observed_lib_size=False)
    assert model.module.use_observed_lib_size and not hasattr(model.module, "library_log_means")
    model.train(max_epochs=2, enable_progress_bar=False)
    settings.seed = 1  # the same posterior draw for both calls
    mean = model.get_normalized_expression(library_size="latent", return_numpy=True)
    settings.seed = 1
    scale = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(mean, scale * adata.obs["sf"].to_numpy()[:, None], rtol=1e-4)


def test_datamodule_and_sparse_minibatches(adata):
    import scipy.sparse as sp

    adata.X = sp.csr_matrix(adata.X)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16)
    model.train(max_epochs=2, load_sparse_tensor=True, enable_progress_bar=False)

    class Module:
        def train_dataloader(self):
            X = adata.X.toarray()
            codes = adata.obs["_scvi_batch"].to_numpy()
            for start in range(0, adata.n_obs, 100):
                yield {
                    "X": torch.tensor(X[start:start + 100]),
                    "batch": torch.tensor(codes[start:start + 100])[:, None],
                }

    model.train(max_epochs=2, datamodule=Module(), enable_progress_bar=False)
    assert len(model.history["train_loss"]) == 4


def test_frozen_entries_stay_bitwise_fixed_with_weight_decay(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16)
    weight = model.module.decoder.hidden.fc_layers[0][0].weight
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[:, -2:] = False  # only the batch one-hot columns train
    model.module.frozen_parameters = {
        "decoder.hidden.fc_layers.Layer 0.0.weight": mask,
        "log_dispersion": torch.tensor(True),
    }
    before_weight, before_theta = weight.detach().clone(), model.module.log_dispersion.detach().clone()
    before_other = model.module.decoder.scale_head[0].weight.detach().clone()
    model.train(max_epochs=3, enable_progress_bar=False, plan_kwargs={"weight_decay": 0.1})
    assert torch.equal(weight[mask], before_weight[mask])
    assert not torch.equal(weight[~mask], before_weight[~mask])
    assert torch.equal(model.module.log_dispersion, before_theta)
    assert not torch.equal(model.module.decoder.scale_head[0].weight, before_other)


def test_all_finite_finds_one_bad_entry_and_tolerates_huge_finite_weights():
    from pyro_scvi.infer.training import _all_finite, _snapshot

    module = torch.nn.Linear(300, 200)
    with torch.no_grad():
        module.weight.fill_(3e38)  # float32 sums would overflow to inf; float64 sums do not
    assert _all_finite(module)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with torch.no_grad():
            module.weight[7, 11] = bad
        assert not _all_finite(module)
        with torch.no_grad():
            module.weight[7, 11] = 1.0
    module.register_buffer("counts_f64", torch.ones(3, dtype=torch.float64))  # mixed dtypes
    assert _all_finite(module)
    first = _snapshot(module, None)
    with torch.no_grad():
        module.bias.add_(1.0)
    second = _snapshot(module, first)
    assert second is first and torch.equal(second["bias"], module.bias)
