"""scANVI files of scvi-tools: reading one saved by scvi-tools 1.4.2, writing ours in that format.

The fixture ``tests/fixtures/scvi_tools_scanvi_1.4.2`` (made by ``benchmarks/make_scanvi_fixture.py``
in a separate scvi-tools venv) holds the model, the counts it was trained on (``data.npz``) and
scvi-tools' own ``predict(soft=True)``, ``predict()`` and ``get_latent_representation()``. Nothing
here needs scvi-tools or ../shared.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from pyro_scvi import SCANVI
from pyro_scvi.data.synthetic import synthetic_iid
from pyro_scvi.io.model_file import read_payload
from pyro_scvi.io.scvi_tools import read_scvi_tools_model, write_scvi_tools_model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "scvi_tools_scanvi_1.4.2"


def fixture_adata() -> anndata.AnnData:
    data = np.load(FIXTURE / "data.npz")
    obs = pd.DataFrame({"batch": data["batch"], "cell_type": data["cell_type"]}, index=data["obs_names"])
    return anndata.AnnData(X=data["counts"].astype(np.float32), obs=obs,
                           var=pd.DataFrame(index=data["var_names"]))


@pytest.fixture(scope="module")
def loaded():
    return SCANVI.load(FIXTURE / "model", fixture_adata())


def old_version_copy(tmp_path: Path, version: str = "1.0.3") -> Path:
    """The fixture rewritten as if scvi-tools ``version`` had saved it (registry ``scvi_version``)."""
    _, payload = read_payload(FIXTURE / "model")
    saved = read_scvi_tools_model(FIXTURE / "model")
    attrs = dict(payload["attr_dict"])
    attrs["registry_"] = dict(attrs["registry_"], scvi_version=version)
    write_scvi_tools_model(tmp_path / "old", saved["model_state_dict"], saved["var_names"], attrs)
    return tmp_path / "old"


def test_fixture_predictions_and_latent_equal_scvi_tools(loaded):
    soft = loaded.predict(soft=True)
    assert list(soft.columns) == list(np.load(FIXTURE / "predict_soft_columns.npy"))
    assert list(soft.columns) == ["delta", "alpha", "beta"]  # scvi-tools' swapped label order
    np.testing.assert_allclose(soft.to_numpy(), np.load(FIXTURE / "predict_soft.npy"), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(loaded.predict().astype(str), np.load(FIXTURE / "predict_hard.npy"))
    np.testing.assert_allclose(loaded.get_latent_representation(), np.load(FIXTURE / "latent.npy"),
                               atol=1e-5, rtol=0)


def test_fixture_attributes(loaded):
    assert loaded.n_labels == loaded.module.n_labels == 3
    assert loaded.unlabeled_category_ == "Unknown" and loaded.is_trained_
    assert not loaded.module.classifier.softmax and not loaded.module.linear_classifier
    labels = loaded.registry_.field("labels")
    assert labels.state["unlabeled_category"] == "Unknown"
    assert loaded.registry_.setup_args["unlabeled_category"] == "Unknown"
    assert "train_classification_loss" in loaded.history


def test_load_without_adata_takes_the_number_of_labels_from_y_prior():
    with pytest.warns(UserWarning, match="without anndata"):
        model = SCANVI.load(FIXTURE / "model")
    assert model.adata is None and model.n_labels == model.module.n_labels == 3
    assert tuple(model.module.y_prior.shape) == (1, 3)
    soft = model.predict(fixture_adata(), soft=True)
    np.testing.assert_allclose(soft.to_numpy(), np.load(FIXTURE / "predict_soft.npy"), atol=1e-5, rtol=0)


def test_saved_number_of_labels_wins_over_the_one_the_data_suggests():
    adata = fixture_adata()
    keep = np.isin(adata.obs["cell_type"], ["alpha", "beta"])
    adata = adata[keep].copy()  # fully labelled, one category unused: the data alone would give L = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SCANVI.load(FIXTURE / "model", adata)
    assert model.n_labels == model.module.n_labels == 3
    expected = np.load(FIXTURE / "predict_soft.npy")[keep]
    np.testing.assert_allclose(model.predict(soft=True).to_numpy(), expected, atol=1e-5, rtol=0)


def test_fixture_state_dict_names():
    _, payload = read_payload(FIXTURE / "model")
    theirs = payload["model_state_dict"]
    saved = read_scvi_tools_model(FIXTURE / "model")
    ours = saved["model_state_dict"]
    assert torch.equal(ours["classifier.logits.weight"], theirs["classifier.classifier.1.weight"])
    assert torch.equal(ours["classifier.hidden.fc_layers.Layer 0.0.weight"],
                       theirs["classifier.classifier.0.fc_layers.Layer 0.0.weight"])
    assert torch.equal(ours["z2_encoder.loc_head.bias"], theirs["encoder_z2_z1.mean_encoder.bias"])
    assert torch.equal(ours["z1_decoder.var_head.weight"], theirs["decoder_z1_z2.var_decoder.weight"])
    assert len(ours) == len(theirs) - 1  # all but "pyro_param_store"


def _trained(linear: bool) -> SCANVI:
    adata = synthetic_iid(batch_size=60, n_genes=40, n_batches=2, n_labels=3, seed=1)
    labels = np.asarray(adata.obs["labels"].astype(str), dtype=object)
    labels[::3] = "Unknown"
    adata.obs["partial"] = labels
    SCANVI.setup_anndata(adata, labels_key="partial", unlabeled_category="Unknown", batch_key="batch")
    model = SCANVI(adata, n_hidden=16, n_latent=4, linear_classifier=linear, y_prior=[0.2, 0.3, 0.5])
    model.train(max_epochs=2, batch_size=64)
    return model


@pytest.mark.parametrize("linear", [False, True])
def test_our_model_through_scvi_tools_format_and_back_is_exact(tmp_path, linear):
    model = _trained(linear)
    model.save(tmp_path / "export", scvi_tools_format=True, save_anndata=True)
    _, payload = read_payload(tmp_path / "export")
    keys = set(payload["model_state_dict"])
    assert ("classifier.classifier.0.weight" in keys) == linear
    assert ("classifier.classifier.1.weight" in keys) == (not linear)
    assert {"y_prior", "encoder_z2_z1.mean_encoder.weight", "decoder_z1_z2.var_decoder.bias"} <= keys
    attrs = payload["attr_dict"]
    assert attrs["registry_"]["model_name"] == "SCANVI"
    labels_state = attrs["registry_"]["field_registries"]["labels"]["state_registry"]
    assert labels_state["unlabeled_category"] == "Unknown"
    assert attrs["unlabeled_category_"] == "Unknown" and len(attrs["labels_"]) == model.adata.n_obs
    assert attrs["unsupervised_history_"] is None and attrs["semisupervised_history_"] is None
    assert set(attrs["init_params_"]["kwargs"]) == {"model_kwargs"}
    assert "y_prior" not in attrs["init_params_"]["kwargs"]["model_kwargs"]

    back = SCANVI.load(tmp_path / "export")
    state, state_back = model.module.state_dict(), back.module.state_dict()
    assert list(state) == list(state_back)
    for name, value in state.items():
        assert torch.equal(value, state_back[name]), name
    pd.testing.assert_frame_equal(model.predict(soft=True), back.predict(soft=True), check_exact=True)
    np.testing.assert_array_equal(model.get_latent_representation(), back.get_latent_representation())


def test_pre_1_1_file_reads_the_classifier_as_ending_in_softmax(tmp_path):
    old = old_version_copy(tmp_path)
    model = SCANVI.load(old, fixture_adata())
    assert model.module.classifier.softmax and model.init_params_["kwargs"]["kwargs"]["classifier_softmax"]
    assert model.registry_.scvi_version == "1.0.3"  # kept: it tells scvi-tools the convention
    # probabilities = softmax of the last layer, as scvi-tools predicts for such a file
    np.testing.assert_allclose(model.predict(soft=True).to_numpy(), np.load(FIXTURE / "predict_soft.npy"),
                               atol=1e-5, rtol=0)
    # exported again, the old version stays so that scvi-tools appends its softmax again
    model.save(tmp_path / "again", scvi_tools_format=True)
    _, payload = read_payload(tmp_path / "again")
    assert payload["attr_dict"]["registry_"]["scvi_version"] == "1.0.3"
    assert "classifier_softmax" not in payload["attr_dict"]["init_params_"]["kwargs"]["model_kwargs"]


def test_softmax_classifier_loss_is_taken_on_probabilities():
    model = _trained(False)
    module = model.module
    batch = next(iter(model.minibatches(None, np.flatnonzero(model.labels_ != "Unknown"), 16)))
    module.eval()
    logits_loss = module.classification_loss(batch)
    module.classifier.softmax = True
    probs_loss = module.classification_loss(batch)
    encoder_input, covariates = module.encoder_input(batch)
    loc, _ = module.z_encoder(encoder_input, *covariates)
    probs = torch.softmax(module.classifier.logits(module.classifier.hidden(loc)), -1)
    expected = torch.nn.functional.cross_entropy(probs, batch.labels.reshape(-1).long())
    torch.testing.assert_close(probs_loss, expected)
    assert not torch.isclose(probs_loss, logits_loss)


def _rewrite_init_params(tmp_path: Path, **model_kwargs) -> Path:
    _, payload = read_payload(FIXTURE / "model")
    saved = read_scvi_tools_model(FIXTURE / "model")
    attrs = dict(payload["attr_dict"])
    init = attrs["init_params_"]
    attrs["init_params_"] = {"non_kwargs": init["non_kwargs"],
                             "kwargs": {"model_kwargs": dict(init["kwargs"]["model_kwargs"], **model_kwargs)}}
    write_scvi_tools_model(tmp_path / "custom", saved["model_state_dict"], saved["var_names"], attrs,
                           overwrite=True)
    return tmp_path / "custom"


def test_scvi_tools_classifier_options(tmp_path):
    ok = _rewrite_init_params(tmp_path, classifier_parameters={"n_hidden": 32, "logits": True},
                              use_labels_groups=False, labels_groups=None)
    assert SCANVI.load(ok, fixture_adata()).n_labels == 3
    bad = _rewrite_init_params(tmp_path, classifier_parameters={"inject_covariates": False})
    with pytest.raises(ValueError, match="classifier_parameters"):
        SCANVI.load(bad, fixture_adata())
    grouped = _rewrite_init_params(tmp_path, use_labels_groups=True)
    with pytest.raises(ValueError, match="use_labels_groups"):
        SCANVI.load(grouped, fixture_adata())


def test_classifier_parameters_shape_the_classifier_and_survive_export(tmp_path):
    adata = fixture_adata()
    SCANVI.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown", batch_key="batch")
    model = SCANVI(adata, n_hidden=16, n_latent=4,
                   classifier_parameters={"n_hidden": 8, "n_layers": 2, "use_batch_norm": False})
    hidden = model.module.classifier.hidden.fc_layers
    assert len(hidden) == 2 and hidden[0][0].out_features == 8 and hidden[0][1] is None
    model.train(max_epochs=1, batch_size=64)
    model.save(tmp_path / "export", scvi_tools_format=True)
    loaded = SCANVI.load(tmp_path / "export", adata)
    pd.testing.assert_frame_equal(model.predict(soft=True), loaded.predict(soft=True))
    with pytest.raises(ValueError, match="not supported"):
        SCANVI(adata, classifier_parameters={"activation_fn": "relu"})
    with pytest.raises(ValueError, match="linear_classifier=True has no hidden layer"):
        SCANVI(adata, linear_classifier=True, classifier_parameters={"n_hidden": 8})
    with pytest.raises(ValueError, match="issue 3804"):
        SCANVI(adata, use_labels_groups=True)
