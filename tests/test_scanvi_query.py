"""scANVI reference mapping: load_query_data's registration, freezing (scvi-tools' rules, bitwise) and
label transfer to a held-out batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_scvi import SCANVI, SCVI, settings
from pyro_scvi.data import synthetic_iid

torch.set_num_threads(2)
SMALL = dict(n_hidden=32, n_latent=5)


def _split(seed: int = 0):
    """Three separated cell types in 3 batches; the reference holds batch_0/1 (every cell labelled but
    20 % "Unknown"), the query batch_2 with its true labels kept aside in ``obs["truth"]``."""
    data = synthetic_iid(batch_size=150, n_genes=60, n_batches=3, n_labels=3, n_markers=10,
                         log_fold_change=3.0, seed=seed)
    rng = np.random.default_rng(seed)
    truth = np.asarray(data.obs["labels"].astype(str))
    data.obs["cell_type"] = np.where(rng.random(data.n_obs) < 0.8, truth, "Unknown")
    data.obs["truth"] = truth
    reference = data[data.obs["batch"] != "batch_2"].copy()
    query = data[data.obs["batch"] == "batch_2"].copy()
    del query.obs["cell_type"]
    return reference, query


@pytest.fixture(scope="module")
def reference_model():
    settings.seed = 0
    reference, _ = _split()
    SCVI.setup_anndata(reference, batch_key="batch", labels_key="cell_type")
    scvi = SCVI(reference, encode_covariates=True, **SMALL)
    scvi.train(max_epochs=20, batch_size=64, enable_progress_bar=False)
    model = SCANVI.from_scvi_model(scvi, "Unknown")
    model.train(max_epochs=10, batch_size=64, enable_progress_bar=False)
    return model


def _query_model(reference_model, **kwargs):
    _, query = _split()
    with pytest.warns(UserWarning, match="Missing labels key cell_type"):
        model = SCANVI.load_query_data(query, reference_model, **kwargs)
    return model, query


def _frozen_by_scvi_tools(name: str, freeze_classifier: bool = True) -> bool:
    """scvi-tools 1.4.2's rule (spec scanvi §8) for a parameter of ours that holds no covariate
    column: scANVI networks frozen but the z1|z2 decoder's BatchNorm and, with freeze_classifier,
    the classifier's BatchNorm; scVI's networks as in scVI's query (see test_arches)."""
    batch_norm = ".fc_layers.Layer 0.1." in name
    if name.startswith("classifier."):
        return freeze_classifier and not batch_norm
    if name.startswith(("z1_decoder.", "decoder.")):  # freeze_batchnorm_decoder=False by default
        return not batch_norm
    return True  # z2_encoder, decoder heads, dispersion, ...


def test_query_training_freezes_exactly_what_scvi_tools_freezes(reference_model):
    settings.seed = 1
    model, _ = _query_model(reference_model)
    reference = {k: v.clone() for k, v in reference_model.module.state_dict().items()}
    seen = []
    first = model.module.z1_decoder.loc_head.weight  # wholly frozen: no gradient is even computed
    hook = model.module.decoder.hidden.register_forward_hook(lambda *_: seen.append(first.requires_grad))
    model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)  # default weight decay
    hook.remove()
    assert seen and not any(seen) and first.requires_grad  # off while training, restored after
    trained = model.module.state_dict()
    covariate_inputs = {"z_encoder.hidden.fc_layers.Layer 0.0.weight",
                        "decoder.hidden.fc_layers.Layer 0.0.weight"}
    checked = 0
    for name, value in trained.items():
        if name.startswith("library_encoder."):
            continue  # trains (scVI's rule); the observed library is not used here
        if name in covariate_inputs:  # reference columns frozen, the new batch's column trains
            n_ref = reference[name].shape[1]
            assert torch.equal(value[:, :n_ref - 2], reference[name][:, :n_ref - 2]), name
            assert not torch.equal(value[:, -1], value.new_zeros(value.shape[0])), name
            continue
        if name in dict(model.module.named_parameters()):
            frozen = _frozen_by_scvi_tools(name)
            same = value.shape == reference[name].shape and torch.equal(value, reference[name])
            assert same == frozen, (name, frozen)
            checked += 1
    assert checked > 20
    # running statistics: z2 encoder and z encoder frozen, z1 decoder and classifier keep updating
    stats = "fc_layers.Layer 0.1.running_mean"
    assert torch.equal(trained[f"z2_encoder.hidden.{stats}"], reference[f"z2_encoder.hidden.{stats}"])
    assert torch.equal(trained[f"z_encoder.hidden.{stats}"], reference[f"z_encoder.hidden.{stats}"])
    assert not torch.equal(trained[f"z1_decoder.hidden.{stats}"], reference[f"z1_decoder.hidden.{stats}"])
    assert not torch.equal(trained[f"classifier.hidden.{stats}"], reference[f"classifier.hidden.{stats}"])
    assert torch.equal(trained["y_prior"], reference["y_prior"])


def test_freeze_options_open_the_classifier_and_batch_norms(reference_model):
    model, _ = _query_model(reference_model, freeze_classifier=False, freeze_batchnorm_encoder=False,
                            freeze_batchnorm_decoder=True)
    frozen = model.module.frozen_parameters
    assert not any(name.startswith("classifier.") for name in frozen)
    assert "z2_encoder.hidden.fc_layers.Layer 0.1.weight" not in frozen
    assert "z1_decoder.hidden.fc_layers.Layer 0.1.weight" in frozen
    assert model.module.z1_decoder.hidden.fc_layers[0][1].momentum == 0.0
    assert model.module.z2_encoder.hidden.fc_layers[0][1].momentum == 0.01
    unfrozen, _ = _query_model(reference_model, unfrozen=True)
    assert unfrozen.module.frozen_parameters == {}


def test_query_labels_keep_the_reference_classes(reference_model):
    model, query = _query_model(reference_model)
    assert list(query.obs["cell_type"].unique()) == ["Unknown"]
    assert model.n_labels == reference_model.n_labels
    assert list(model._label_mapping) == list(reference_model._label_mapping)
    # a fully labelled query lacking a class keeps L (scvi-tools would model L + 1 classes)
    _, labelled = _split()
    labelled.obs["cell_type"] = np.where(labelled.obs["truth"] == "label_0", "label_1", labelled.obs["truth"])
    model = SCANVI.load_query_data(labelled, reference_model)
    assert model.n_labels == reference_model.n_labels
    assert torch.equal(model.module.y_prior, reference_model.module.y_prior)
    _, unknown = _split()
    unknown.obs["cell_type"] = np.where(unknown.obs["truth"] == "label_0", "a new type", "Unknown")
    with pytest.raises(ValueError, match="cannot add cell types"):
        SCANVI.load_query_data(unknown, reference_model)


def test_label_transfer_to_a_held_out_batch(reference_model, tmp_path):
    settings.seed = 2
    reference_model.save(tmp_path / "reference")
    model, query = _query_model(tmp_path / "reference")  # from the saved directory
    model.train(max_epochs=20, batch_size=64, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    predicted = model.predict()
    accuracy = float(np.mean(predicted == query.obs["truth"].to_numpy()))
    assert accuracy >= 0.95, accuracy
    soft = model.predict(soft=True)
    assert list(soft.columns) == list(reference_model._label_mapping[:-1])
    assert soft.index.equals(pd.Index(query.obs_names))
    assert "train_classification_loss" not in model.history  # no labelled query cell: ELBO only


def test_partly_labelled_query_trains_the_classification_term(reference_model):
    _, query = _split()
    query.obs["cell_type"] = np.where(np.arange(query.n_obs) % 4 == 0, query.obs["truth"], "Unknown")
    model = SCANVI.load_query_data(query, reference_model, freeze_classifier=False)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    assert np.all(np.isfinite(model.history["train_classification_loss"].to_numpy()))
