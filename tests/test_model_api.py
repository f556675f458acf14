"""The SCVI class as a user calls it: registration, queries, files, devices, independence of models."""


import numpy as np
import pandas as pd
import pytest
import torch

from pyro_scvi import SCVI, settings


def test_setup_and_view_anndata_setup(adata, capsys):
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="labels")
    model = SCVI(adata)
    model.view_anndata_setup()
    out = capsys.readouterr().out
    assert "batch" in out and "_scvi_batch" in out and "label_2" in out
    assert model.summary_stats["n_batch"] == 2 and model.summary_stats["n_labels"] == 3
    assert model.registry["setup_args"]["layer"] == "counts"


def test_constructor_and_count_errors(adata):
    with pytest.raises(ValueError, match="setup_anndata"):
        SCVI(adata)
    with pytest.raises(TypeError, match="n_hiden"):
        SCVI.setup_anndata(adata)
        SCVI(adata, n_hiden=3)
    bad = adata.copy()
    bad.X = bad.X.astype(np.float32)
    bad.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        SCVI.setup_anndata(bad)
    normalised = adata.copy()
    normalised.X = normalised.X / 3.0
    with pytest.warns(UserWarning, match="does not contain unnormalized count data"):
        SCVI.setup_anndata(normalised)


def test_untrained_queries_raise(adata):
    SCVI.setup_anndata(adata)
    with pytest.raises(RuntimeError, match="untrained"):
        SCVI(adata).get_latent_representation()


def test_latent_representation_variants(trained):
    n = trained.adata.n_obs
    mean = trained.get_latent_representation()
    loc, var = trained.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(mean, loc)
    assert mean.shape == (n, 10) and (var > 0).all()
    np.testing.assert_allclose(
        trained.get_latent_representation(indices=[5, 2, 7]), mean[[5, 2, 7]], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(trained.get_latent_representation(batch_size=7), mean, rtol=1e-5, atol=1e-6)
    draws = np.stack([trained.get_latent_representation(give_mean=False) for _ in range(200)])
    # one-draw samples scatter around the mean with the posterior variance
    np.testing.assert_allclose(draws.mean(0), mean, atol=5 * np.sqrt(var.max() / 200))
    np.testing.assert_allclose(draws.var(0).mean(), var.mean(), rtol=0.15)


def test_latent_library_size_observed_is_total_counts(trained):
    totals = np.asarray(trained.adata.X.sum(1)).reshape(-1, 1)
    np.testing.assert_allclose(trained.get_latent_library_size(), totals, rtol=1e-5)
    np.testing.assert_allclose(
        trained.get_latent_library_size(give_mean=False, indices=[0, 1]), totals[:2], rtol=1e-5
    )


def test_latent_library_size_with_latent_library(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, use_observed_lib_size=False, n_hidden=32)
    assert model.module.library_log_means.shape == (1, 2)
    # the library encoder starts near log-library 0 and climbs to ~7.6; a larger step gets there sooner
    model.train(max_epochs=40, enable_progress_bar=False, plan_kwargs={"lr": 5e-3})
    mean = model.get_latent_library_size()
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert mean.shape == (adata.n_obs, 1)
    # the encoder tracks the library (0.56 here; it keeps improving with training)
    assert np.corrcoef(np.log(mean.ravel()), np.log(totals))[0, 1] > 0.4
    assert 0.33 < np.median(mean.ravel() / totals) < 3.0
    draws = np.stack([model.get_latent_library_size(give_mean=False) for _ in range(100)])
    np.testing.assert_allclose(draws.mean(0), mean, rtol=0.1)


def test_normalized_expression_shapes_names_and_options(trained):
    data = trained.adata
    frame = trained.get_normalized_expression()
    assert isinstance(frame, pd.DataFrame) and frame.shape == data.shape
    assert list(frame.index) == list(data.obs_names) and list(frame.columns) == list(data.var_names)
    np.testing.assert_allclose(frame.to_numpy().sum(1), 1.0, rtol=1e-5)
    genes = list(data.var_names[[3, 1, 10]])
    subset = trained.get_normalized_expression(indices=[4, 0], gene_list=genes)
    assert list(subset.columns) == [data.var_names[1], data.var_names[3], data.var_names[10]]  # AnnData order
    assert list(subset.index) == [data.obs_names[4], data.obs_names[0]]
    samples = trained.get_normalized_expression(n_samples=6, return_mean=False)
    assert isinstance(samples, np.ndarray) and samples.shape == (6, data.n_obs, data.n_vars)
    averaged = trained.get_normalized_expression(n_samples=6, return_numpy=True)
    assert averaged.shape == data.shape
    overall = trained.get_normalized_expression(n_samples_overall=50)
    assert overall.shape == (50, data.n_vars)
    scaled = trained.get_normalized_expression(library_size=1e4, return_numpy=True)
    np.testing.assert_allclose(scaled.sum(1), 1e4, rtol=1e-4)
    with pytest.raises(ValueError, match='"batch_9" not a valid batch category'):
        trained.get_normalized_expression(transform_batch="batch_9")


def test_latent_library_size_expression_is_library_times_scale(trained):
    settings.seed = 3
    latent = trained.get_normalized_expression(library_size="latent", return_numpy=True)
    settings.seed = 3
    scale = trained.get_normalized_expression(return_numpy=True)
    totals = np.asarray(trained.adata.X.sum(1)).reshape(-1, 1)
    np.testing.assert_allclose(latent, scale * totals, rtol=1e-4)


def test_transform_batch_changes_only_the_decoder(trained):
    settings.seed = 4
    own = trained.get_normalized_expression(return_numpy=True, n_samples=20)
    settings.seed = 4
    as_0 = trained.get_normalized_expression(transform_batch="batch_0", return_numpy=True, n_samples=20)
    settings.seed = 4
    as_1 = trained.get_normalized_expression(transform_batch="batch_1", return_numpy=True, n_samples=20)
    codes = trained.adata.obs["_scvi_batch"].to_numpy()
    np.testing.assert_allclose(own[codes == 0], as_0[codes == 0], rtol=1e-5)
    np.testing.assert_allclose(own[codes == 1], as_1[codes == 1], rtol=1e-5)
    settings.seed = 4
    both = trained.get_normalized_expression(
        transform_batch=["batch_0", "batch_1"], return_numpy=True, n_samples=20
    )
    np.testing.assert_allclose(both, (as_0 + as_1) / 2, rtol=1e-4)


def test_queries_on_a_new_anndata_transfer_the_setup(trained):
    other = trained.adata[:50].copy()
    del other.uns["_scvi_uuid"]
    np.testing.assert_allclose(
        trained.get_latent_representation(other),
        trained.get_latent_representation(indices=np.arange(50)),
        rtol=1e-5,
        atol=1e-6,
    )
    unseen = trained.adata[:20].copy()
    unseen.obs["batch"] = pd.Categorical(["batch_7"] * 20)
    with pytest.raises(ValueError, match="batch_7"):
        trained.get_latent_representation(unseen)


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "m", save_anndata=True)
    with pytest.raises(ValueError, match="already exists"):
        trained.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())
    assert loaded.is_trained and loaded.summary_string == trained.summary_string
    for key, frame in trained.history.items():
        pd.testing.assert_frame_equal(loaded.history[key], frame, check_dtype=False)
    np.testing.assert_array_equal(loaded.train_indices, trained.train_indices)
    np.testing.assert_array_equal(loaded.validation_indices, trained.validation_indices)
    for name, tensor in trained.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[name], tensor, rtol=0, atol=0)
    # with a user AnnData, and with a prefix next to the first model
    loaded2 = SCVI.load(tmp_path / "m", adata=trained.adata.copy())
    np.testing.assert_array_equal(loaded2.get_latent_representation(), trained.get_latent_representation())
    trained.save(tmp_path / "m", prefix="second_", overwrite=True)
    assert (tmp_path / "m" / "model.pt").exists() and (tmp_path / "m" / "second_model.pt").exists()
    with pytest.warns(UserWarning, match="no saved anndata"):
        bare = SCVI.load(tmp_path / "m", prefix="second_")
    assert bare.adata is None
    np.testing.assert_array_equal(
        bare.get_latent_representation(trained.adata), trained.get_latent_representation()
    )


def test_load_latent_library_model_without_anndata(adata, tmp_path):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, use_observed_lib_size=False, dispersion="gene-batch", n_layers=2, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False)
    model.save(tmp_path / "lat")
    with pytest.warns(UserWarning):
        loaded = SCVI.load(tmp_path / "lat")
    torch.testing.assert_close(loaded.module.library_log_means, model.module.library_log_means)
    np.testing.assert_array_equal(loaded.get_latent_library_size(adata), model.get_latent_library_size())


def test_load_refuses_pickled_code_and_garbage(trained, tmp_path):
    trained.save(tmp_path / "ok")
    payload = torch.load(tmp_path / "ok" / "model.pt", weights_only=True)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    payload["attr_dict"]["evil"] = Exploit()
    (tmp_path / "evil").mkdir()
    torch.save(payload, tmp_path / "evil" / "model.pt")
    with pytest.raises(ValueError, match="Refusing to load"):
        SCVI.load(tmp_path / "evil", adata=trained.adata)
    (tmp_path / "trunc").mkdir()
    raw = (tmp_path / "ok" / "model.pt").read_bytes()
    (tmp_path / "trunc" / "model.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable model file"):
        SCVI.load(tmp_path / "trunc", adata=trained.adata)
    with pytest.raises(ValueError, match="Failed to load model file"):
        SCVI.load(tmp_path / "nowhere", adata=trained.adata)


def test_failed_save_keeps_previous_files(trained, tmp_path, monkeypatch):
    trained.save(tmp_path / "keep")
    before = (tmp_path / "keep" / "model.pt").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        trained.save(tmp_path / "keep", overwrite=True)
    assert (tmp_path / "keep" / "model.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_two_models_never_share_weights(adata):
    import pyro

    pyro.clear_param_store()  # other tests may have used the global store directly
    SCVI.setup_anndata(adata, batch_key="batch")
    first, second = SCVI(adata, n_hidden=16), SCVI(adata, n_hidden=16)
    assert (
        first.module.decoder.scale_head[0].weight.data_ptr()
        != second.module.decoder.scale_head[0].weight.data_ptr()
    )
    second_before = {k: v.clone() for k, v in second.module.state_dict().items()}
    first.train(max_epochs=2, enable_progress_bar=False)
    for k, v in second.module.state_dict().items():
        torch.testing.assert_close(v, second_before[k], rtol=0, atol=0)
    second.train(max_epochs=2, enable_progress_bar=False)
    first_after = {k: v.clone() for k, v in first.module.state_dict().items()}
    first.get_latent_representation(), second.get_latent_representation()
    for k, v in first.module.state_dict().items():
        torch.testing.assert_close(v, first_after[k], rtol=0, atol=0)
    # the global param store of the user is untouched
    assert len(pyro.get_param_store()) == 0


def test_device_repr_and_flags(trained, capsys):
    assert trained.device == torch.device("cpu")
    trained.to_device("cpu")
    assert "SCVI model with the following parameters" in repr(trained) and "Trained" in trained.summary_string
    assert trained.is_trained is True


@pytest.mark.cuda
def test_cuda_training_and_queries(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata)
    model.train(max_epochs=2, accelerator="gpu", enable_progress_bar=False)
    assert model.device.type == "cuda"
    assert model.get_latent_representation().shape == (adata.n_obs, 10)
    model.to_device("cpu")
    assert model.device.type == "cpu"


def test_adata_setter_transfers_the_setup(trained):
    import copy

    model = copy.copy(trained)  # shallow: shares the module, not the attribute slots
    subset = trained.adata[:30].copy()
    model.adata = subset
    assert model.adata is subset and model.summary_stats["n_cells"] == 30
    np.testing.assert_allclose(
        model.get_latent_representation(),
        trained.get_latent_representation(indices=np.arange(30)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert trained.summary_stats["n_cells"] == trained.adata.n_obs


def test_manager_api(trained):
    from pyro_scvi.data import AnnDataManager

    own = trained.adata_manager
    assert isinstance(own, AnnDataManager) and own.adata is trained.adata
    np.testing.assert_array_equal(trained.get_from_registry(trained.adata, "batch").ravel(),
                                  trained.adata.obs["_scvi_batch"].to_numpy())
    assert trained.get_from_registry(trained.adata, "X").shape == trained.adata.shape
    other = trained.adata[:40].copy()
    del other.uns["_scvi_uuid"]
    assert trained.get_anndata_manager(other) is None
    with pytest.raises(ValueError, match="not been registered"):
        trained.get_anndata_manager(other, required=True)
    trained.get_latent_representation(other)  # a model method transfers the setup
    manager = trained.get_anndata_manager(other, required=True)
    assert manager.adata is other and manager.summary_stats["n_cells"] == 40
    np.testing.assert_array_equal(
        trained.get_from_registry(other, "labels").ravel(), other.obs["_scvi_labels"].to_numpy()
    )
    copied = other.copy()  # same uuid, another object: the setup is transferred onto it
    assert trained.get_anndata_manager(copied).adata is copied
    trained.deregister_manager(other)
    assert trained.get_anndata_manager(other) is None
    trained.view_anndata_setup(other)  # transfers again and prints
    trained.deregister_manager()
    assert trained.get_anndata_manager(other) is None and trained.adata_manager is not None
    with pytest.raises(ValueError, match="own AnnData"):
        trained.deregister_manager(trained.adata)
    fresh = other.copy()
    del fresh.uns["_scvi_uuid"]
    SCVI.setup_anndata(fresh, batch_key="batch")  # setup registers a manager in the class store
    assert SCVI._setup_managers[fresh.uns["_scvi_uuid"]].adata is fresh
