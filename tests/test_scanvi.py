"""scANVI: the enumerated loss, label transfer on generated data, from_scvi_model, save/load, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pyro import poutine

from pyro_scvi import SCANVI, SCVI
from pyro_scvi.data.synthetic import synthetic_iid
from pyro_scvi.infer.scanvi import SemiSupervisedBatch, SemiSupervisedELBO, scanvi_cell_terms
from pyro_scvi.models.scanvi import Z2, Y
from pyro_scvi.models.sites import X, Z

SMALL = dict(n_hidden=16, n_latent=4)


def _partly_labelled(fraction: float = 0.1, seed: int = 0, n_cells: int = 150, n_genes: int = 60):
    """Three well separated cell types; ``fraction`` of the cells keep their label, the rest "Unknown"."""
    adata = synthetic_iid(batch_size=n_cells, n_genes=n_genes, n_batches=1, n_labels=3, n_markers=10,
                          log_fold_change=3.0, seed=seed)
    truth = np.asarray(adata.obs["labels"].astype(str))
    rng = np.random.default_rng(seed)
    keep = np.zeros(adata.n_obs, dtype=bool)
    for label in np.unique(truth):  # at least a few labels of each type
        cells = np.flatnonzero(truth == label)
        keep[rng.choice(cells, max(2, round(fraction * len(cells))), replace=False)] = True
    adata.obs["partial"] = np.where(keep, truth, "Unknown")
    return adata, truth


def _model(adata, **kwargs):
    SCANVI.setup_anndata(adata, labels_key="partial", unlabeled_category="Unknown")
    return SCANVI(adata, **SMALL, **kwargs)


def test_label_coding_puts_unlabeled_last():
    adata, _ = _partly_labelled()
    model = _model(adata)
    assert list(model._label_mapping) == ["label_2", "label_0", "label_1", "Unknown"]  # scvi-tools' swap
    assert model.n_labels == 3
    codes = adata.obs["_scvi_labels"].to_numpy()
    assert np.all(model._label_mapping[codes] == adata.obs["partial"].to_numpy())


def _fixed(fn, values: dict):
    """``fn`` with the latent sites in ``values`` set to those values (still latent, unlike ``condition``)."""
    trace = poutine.Trace()
    for name, value in values.items():
        trace.add_node(name, name=name, type="sample", is_observed=False, value=value, infer={})
    return poutine.replay(fn, trace=trace)


def test_enumerated_loss_equals_explicit_sum_over_labels():
    """Σ_y by poutine.enum equals a loop over y = k with poutine.condition, weighted by q(y | z1)."""
    adata, _ = _partly_labelled()
    model = _model(adata)
    module = model.module.eval()
    batch = next(model.minibatches(indices=np.arange(12)))
    torch.manual_seed(0)
    z1 = torch.randn(12, 4)
    z2 = torch.randn(3, 12, 4)  # one draw per (label, cell)
    guide = _fixed(module.guide, {Z: z1, Z2: z2})
    with torch.no_grad():
        reconstruction, kl = scanvi_cell_terms(module.model, guide, batch)
        enumerated = reconstruction[X] + sum(kl.values())  # (n,)

        probs = module.classify(z1)  # (n, L)
        explicit = torch.zeros(12)
        for k in range(3):
            y = torch.full((12,), k)
            g = poutine.trace(_fixed(module.guide, {Z: z1, Y: y, Z2: z2[k]})).get_trace(batch)
            m = poutine.trace(poutine.replay(module.model, trace=g)).get_trace(batch)
            per_label = (-m.nodes[X]["fn"].log_prob(m.nodes[X]["value"]) + g.nodes[Z]["fn"].log_prob(z1)
                         - m.nodes[Z]["fn"].log_prob(z1)
                         + torch.distributions.kl_divergence(g.nodes[Z2]["fn"], m.nodes[Z2]["fn"])
                         + g.nodes[Y]["fn"].log_prob(y) - m.nodes[Y]["fn"].log_prob(y))
            explicit += probs[:, k] * per_label
    assert float(probs.min()) > 1e-3  # every label carries weight: the sum is not trivial
    torch.testing.assert_close(enumerated, explicit, rtol=1e-5, atol=1e-5)  # float32: ~1e-7 relative


def test_predicts_generated_cell_types_from_ten_percent_of_labels():
    adata, truth = _partly_labelled(0.1)
    model = _model(adata)
    model.train(max_epochs=40, batch_size=64, check_val_every_n_epoch=1)
    predicted = model.predict()
    assert (predicted == truth).mean() >= 0.95
    history = model.history
    for key in ("train_loss", "elbo_train", "train_classification_loss", "train_accuracy",
                "train_f1_score", "validation_loss", "validation_accuracy", "validation_f1_score",
                "validation_classification_loss"):
        assert key in history, key
    soft = model.predict(soft=True)
    assert list(soft.columns) == ["label_2", "label_0", "label_1"]
    assert list(soft.index) == list(adata.obs_names)
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, rtol=1e-5)
    elbo = model.get_elbo(return_mean=False)  # every cell's ELBO with the label summed out
    assert elbo.shape == (adata.n_obs,) and bool(torch.isfinite(elbo).all()) and float(elbo.mean()) < 0


def test_from_scvi_model_starts_from_the_scvi_weights():
    adata, _ = _partly_labelled()
    SCVI.setup_anndata(adata)
    scvi = SCVI(adata, **SMALL)
    scvi.train(max_epochs=2, batch_size=64)
    with pytest.warns(UserWarning, match="Ignoring param 'n_latent'"):
        model = SCANVI.from_scvi_model(scvi, "Unknown", labels_key="partial", n_latent=7)
    assert model.was_pretrained and model.module.n_latent == 4
    scanvi_state = model.module.state_dict()
    for name, value in scvi.module.state_dict().items():
        assert torch.equal(scanvi_state[name], value), name  # bitwise equal
        assert scanvi_state[name].data_ptr() != value.data_ptr()  # copied, not shared
    assert list(model._label_mapping) == ["label_2", "label_0", "label_1", "Unknown"]
    model.train(max_epochs=1, batch_size=64)
    assert not torch.equal(model.module.z_encoder.loc_head.weight, scvi.module.z_encoder.loc_head.weight)


def test_save_load_round_trip_is_exact(tmp_path):
    adata, _ = _partly_labelled()
    model = _model(adata, linear_classifier=True, y_prior=[0.2, 0.3, 0.5])
    model.train(max_epochs=2, batch_size=64)
    model.save(tmp_path / "scanvi", save_anndata=True)
    loaded = SCANVI.load(tmp_path / "scanvi")
    assert loaded.module.linear_classifier and loaded.n_labels == 3
    assert torch.equal(loaded.module.y_prior, model.module.y_prior)
    pd.testing.assert_frame_equal(model.predict(soft=True), loaded.predict(soft=True), check_exact=True)
    np.testing.assert_array_equal(model.get_latent_representation(), loaded.get_latent_representation())
    assert list(loaded.history["train_classification_loss"].iloc[:, 0]) == list(
        model.history["train_classification_loss"].iloc[:, 0])


def test_bad_inputs_raise_clear_errors():
    adata, _ = _partly_labelled()
    with pytest.raises(ValueError, match="not a column of adata.obs"):
        SCANVI.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
    adata.obs["all_unknown"] = "Unknown"
    SCANVI.setup_anndata(adata, labels_key="all_unknown", unlabeled_category="Unknown")
    with pytest.raises(ValueError, match="at least one labelled cell type"):
        SCANVI(adata, **SMALL)
    model = _model(adata)
    with pytest.raises(ValueError, match="n_samples_per_label"):
        model.train(max_epochs=1, n_samples_per_label=0)
    with pytest.raises(ValueError, match="y_prior"):
        _model(adata, y_prior=[0.5, 0.5])
    SCVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="labels_key"), pytest.warns(UserWarning, match="trained yet"):
        SCANVI.from_scvi_model(SCVI(adata, **SMALL), "Unknown")
    with pytest.raises(ValueError, match="z_prior='mog'"), pytest.warns(UserWarning, match="trained yet"):
        SCANVI.from_scvi_model(SCVI(adata, z_prior="mog", **SMALL), "Unknown", labels_key="partial")
    with pytest.raises(TypeError, match="unexpected keyword"):
        SCANVI(adata, guide="flow")


def test_elbo_adds_the_weighted_classification_term():
    adata, _ = _partly_labelled()
    model = _model(adata)
    module = model.module.eval()
    batch = next(model.minibatches(indices=np.arange(20)))
    labelled = next(model.minibatches(indices=model._labeled_indices))
    torch.manual_seed(0)
    with torch.no_grad():
        without = SemiSupervisedELBO(module, 50.0).loss(module.model, module.guide, batch)
        torch.manual_seed(0)
        elbo = SemiSupervisedELBO(module, 50.0)
        with_labels = elbo.loss(module.model, module.guide, SemiSupervisedBatch.of(batch, labelled))
        cross_entropy = module.classification_loss(labelled)
    torch.testing.assert_close(with_labels - without, 50.0 * cross_entropy)
    assert set(elbo.last_metrics) == {"classification_loss", "accuracy", "f1_score"}


def test_split_keeps_labelled_fraction_and_subsamples_labels():
    adata, _ = _partly_labelled(0.2)
    model = _model(adata)
    model._n_samples_per_label = 3
    data = model._registered_training_data(0.8, None, 32, True, False, None, False, "cpu", None)
    train, validation, _ = data.indices
    labelled = set(model._labeled_indices.tolist())
    assert abs(np.mean([i in labelled for i in train]) - len(labelled) / adata.n_obs) < 0.02
    assert len(set(train) & set(validation)) == 0 and len(train) + len(validation) == adata.n_obs
    batches = list(data.train())
    assert len(batches) == -(-len(train) // 32)
    for batch in batches:
        assert batch.labelled.n_cells == 9  # 3 per label, all labelled
        assert int(batch.labelled.labels.max()) < model.n_labels


@pytest.mark.parametrize("options", [
    dict(gene_likelihood="nb", use_observed_lib_size=False),
    dict(dispersion="gene-batch", y_prior=[0.2, 0.3, 0.5], n_layers=2),
])
def test_options_train_and_predict_on_new_data(options):
    adata, _ = _partly_labelled()
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "a", "b")
    SCANVI.setup_anndata(adata, labels_key="partial", unlabeled_category="Unknown", batch_key="batch")
    model = SCANVI(adata, **SMALL, **options)
    model.train(max_epochs=1, batch_size=64)
    query = adata[:20].copy()
    query.obs["partial"] = "Unknown"
    predicted = model.predict(query)
    assert predicted.shape == (20,) and set(predicted) <= {"label_0", "label_1", "label_2"}
    assert np.isfinite(float(model.get_elbo(query)))


def test_differential_expression_with_uniform_weights_and_a_clear_refusal_of_importance():
    """DE resamples posterior draws of ρ as for scVI. Importance weights need p(x | z) in closed form,
    which scANVI's extra latents (y, z2) do not give: refused with an error that names the way out."""
    adata, _ = _partly_labelled()
    SCANVI.setup_anndata(adata, labels_key="partial", unlabeled_category="Unknown")
    model = SCANVI(adata, **SMALL)
    model.train(max_epochs=1, batch_size=64)
    de = model.differential_expression(groupby="partial", group1="label_0", n_samples_overall=100)
    assert de.shape[0] == adata.n_vars and np.isfinite(de["bayes_factor"]).all()
    with pytest.raises(ValueError, match=r"discrete.*weights='uniform'"):
        model.differential_expression(groupby="partial", group1="label_0", n_samples_overall=100,
                                      weights="importance")
    with pytest.raises(ValueError, match="further per-cell latent"):
        model.differential_expression(groupby="partial", group1="label_0", n_samples_overall=100,
                                      weights="importance", importance_weighting_kwargs={"proposal": "guide"})

