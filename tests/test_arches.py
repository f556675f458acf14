"""scArches reference mapping: prepare_query_anndata / load_query_data (weight surgery, freezing)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from pyro_scvi import SCVI, settings
from pyro_scvi.api.reference_mapping import prepare_query_anndata, prepare_query_mudata, query_freeze_masks
from pyro_scvi.data import synthetic_iid
from pyro_scvi.metrics import silhouette_score
from pyro_scvi.models.networks import FCLayers

torch.set_num_threads(2)


def _split(seed: int = 3, n_genes: int = 80):
    """Generated data, 3 batches: the reference holds batch_0/1, the query batch_2 (+ a new donor)."""
    data = synthetic_iid(batch_size=120, n_genes=n_genes, n_batches=3, n_labels=3, seed=seed)
    rng = np.random.default_rng(seed)
    donors = np.where(
        data.obs["batch"] == "batch_2", "d2", np.where(rng.random(data.n_obs) < 0.5, "d0", "d1")
    )
    data.obs["donor"] = pd.Categorical(donors)
    data.obs["percent_mito"] = rng.random(data.n_obs).astype(np.float32)
    reference = data[data.obs["batch"] != "batch_2"].copy()
    query = data[data.obs["batch"] == "batch_2"].copy()
    return reference, query


@pytest.fixture(scope="module")
def reference_model():
    """A small reference (encode_covariates, latent library, gene-batch dispersion, extra covariates)."""
    settings.seed = 0
    reference, _ = _split()
    SCVI.setup_anndata(reference, batch_key="batch", categorical_covariate_keys=["donor"],
                       continuous_covariate_keys=["percent_mito"])
    model = SCVI(reference, n_hidden=32, n_layers=2, encode_covariates=True, use_observed_lib_size=False,
                 dispersion="gene-batch")
    model.train(max_epochs=10, enable_progress_bar=False)
    return model


def _query():
    return _split()[1]


# ------------------------------------------------------------------ prepare_query_anndata


def _gene_query(reference_model, fmt: str, keep: float = 0.9, seed: int = 0):
    """A query with a shuffled subset of the reference genes plus 5 unknown genes."""
    rng = np.random.default_rng(seed)
    names = np.asarray(reference_model.registry_["field_registries"]["X"]["state_registry"]["column_names"])
    chosen = rng.permutation(names)[: int(round(keep * len(names)))]
    data = synthetic_iid(batch_size=30, n_genes=len(chosen) + 5, n_batches=1, seed=seed,
                         sparse_format="csr_matrix" if fmt == "csr" else None)
    data.var_names = list(chosen) + [f"extra_{i}" for i in range(5)]
    data.var["gene_id"] = np.arange(data.n_vars)
    data.layers["counts"] = data.X.copy() * 2
    return data, names, chosen


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_prepare_query_pads_orders_and_drops(reference_model, fmt, capsys):
    query, names, chosen = _gene_query(reference_model, fmt)
    original = query.copy()
    assert prepare_query_anndata(query, reference_model) is None
    out = capsys.readouterr().out
    assert f"Found {len(chosen)} of {len(names)} reference vars in query data" in out
    assert list(query.var_names) == list(names)
    assert query.n_obs == original.n_obs
    for matrix, source in ((query.X, original.X), (query.layers["counts"], original.layers["counts"])):
        if fmt == "csr":
            assert sparse.isspmatrix_csr(matrix) or isinstance(matrix, sparse.csr_array)
        else:
            assert isinstance(matrix, np.ndarray)
        dense = matrix.toarray() if sparse.issparse(matrix) else matrix
        src = source.toarray() if sparse.issparse(source) else source
        for j, gene in enumerate(names):
            if gene in set(chosen):
                np.testing.assert_array_equal(dense[:, j], src[:, list(original.var_names).index(gene)])
            else:
                assert not dense[:, j].any()
    missing = ~np.isin(names, chosen)
    assert query.var["gene_id"].isna().to_numpy()[missing].all()
    assert not any(v.startswith("extra_") for v in query.var_names)


def test_prepare_query_options_and_errors(reference_model, tmp_path):
    names = reference_model.registry_["field_registries"]["X"]["state_registry"]["column_names"]
    query, _, _ = _gene_query(reference_model, "csr")
    returned = prepare_query_anndata(query, reference_model, return_reference_var_names=True)
    assert isinstance(returned, pd.Index) and list(returned) == list(names)
    assert query.n_vars == len(names) - 8 + 5  # untouched
    new = prepare_query_anndata(query, reference_model, inplace=False)
    assert new is not query and list(new.var_names) == list(names)
    assert query.n_vars == len(names) - 8 + 5  # still untouched
    # < 80% overlap warns
    few, _, _ = _gene_query(reference_model, "dense", keep=0.5)
    with pytest.warns(UserWarning, match="less than 80% of reference var names"):
        prepare_query_anndata(few, reference_model)
    # no overlap refuses
    none = synthetic_iid(batch_size=10, n_genes=20, n_batches=1)
    none.var_names = [f"other_{i}" for i in range(20)]
    with pytest.raises(ValueError, match="No reference var names found in query data"):
        prepare_query_anndata(none, reference_model)
    # reference given as a saved directory (ours and scvi-tools' layout)
    reference_model.save(tmp_path / "ours")
    reference_model.save(tmp_path / "theirs", scvi_tools_format=True)
    for directory in (tmp_path / "ours", tmp_path / "theirs"):
        copy = query.copy()
        prepare_query_anndata(copy, str(directory))
        assert list(copy.var_names) == list(names)


def test_prepare_query_mudata(reference_model):
    mudata = pytest.importorskip("mudata")
    query, names, _ = _gene_query(reference_model, "csr")
    mdata = mudata.MuData({"rna": query})
    out = prepare_query_mudata(mdata, reference_model, inplace=False)
    assert list(out.mod["rna"].var_names) == list(names)
    assert mdata.mod["rna"].n_vars != len(names)
    assert prepare_query_mudata(mdata, reference_model) is None
    assert list(mdata.mod["rna"].var_names) == list(names)


# ------------------------------------------------------------------ load_query_data


def test_load_query_data_surgery(reference_model):
    query = _query()
    model = SCVI.load_query_data(query, reference_model)
    assert model.is_trained_ is False
    with pytest.raises(RuntimeError, match="untrained"):
        model.get_latent_representation()
    batch_map = model.registry_["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    assert list(batch_map) == ["batch_0", "batch_1", "batch_2"]
    donor_map = model.registry_["field_registries"]["extra_categorical_covs"]["state_registry"]["mappings"][
        "donor"
    ]
    assert list(donor_map) == ["d0", "d1", "d2"]
    assert model.registry_["_scvi_uuid"] in SCVI._setup_registries

    ref = reference_model.module.state_dict()
    new = model.module.state_dict()
    n_base_decoder = 10 + 1  # z + continuous covariate
    for name, value in new.items():
        old = ref[name]
        if old.shape == value.shape:
            assert torch.equal(old, value), name
            continue
        if ".fc_layers." in name and name.endswith(".0.weight"):
            # [inputs | batch (2 → 3) | donor (2 → 3)]: reference blocks at their new positions
            base = old.shape[1] - 4
            assert torch.equal(value[:, :base], old[:, :base]), name
            assert torch.equal(value[:, base:base + 2], old[:, base:base + 2]), name
            assert torch.equal(value[:, base + 3:base + 5], old[:, base + 2:base + 4]), name
        else:
            assert torch.equal(value[tuple(slice(0, s) for s in old.shape)], old), name
    assert new["decoder.hidden.fc_layers.Layer 0.0.weight"].shape[1] == n_base_decoder + 6
    assert new["log_dispersion"].shape == (80, 3)
    # the new batch's library prior comes from the query cells
    totals = np.log(np.asarray(query.X.sum(1)).ravel())
    np.testing.assert_allclose(new["library_log_means"][0, 2].item(), totals.mean(), rtol=1e-5)
    np.testing.assert_allclose(new["library_log_vars"][0, 2].item(), totals.var(), rtol=1e-4)
    # masks follow the rules: covariate columns of covariate-receiving layers only
    masks = model.module.frozen_parameters
    first = masks["z_encoder.hidden.fc_layers.Layer 0.0.weight"]
    assert first[:, -6:].logical_not().all() and first[:, :-6].all()
    assert masks["z_encoder.hidden.fc_layers.Layer 0.0.bias"].all()
    assert masks["z_encoder.hidden.fc_layers.Layer 0.1.weight"].all()  # encoder BN frozen
    assert "decoder.hidden.fc_layers.Layer 0.1.weight" not in masks  # decoder BN trainable
    assert masks["log_dispersion"].all() and masks["decoder.scale_head.0.weight"].all()
    assert masks["z_encoder.loc_head.weight"].all()
    assert not any(k.startswith("library_encoder.") for k in masks)


def test_load_query_data_training_respects_frozen_entries(reference_model):
    query = _query()
    model = SCVI.load_query_data(query, reference_model)
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    model.train(max_epochs=5, plan_kwargs={"weight_decay": 1e-3}, enable_progress_bar=False)
    after = model.module.state_dict()
    masks = model.module.frozen_parameters
    parameters = dict(model.module.named_parameters())
    for name in parameters:
        changed = after[name] != before[name]
        if name in masks:
            assert not changed[masks[name]].any(), f"frozen entries of {name} moved"
    # the new batch's one-hot columns (position base+2) did change, in encoder and decoder
    for name in ("z_encoder.hidden.fc_layers.Layer 0.0.weight", "decoder.hidden.fc_layers.Layer 0.0.weight",
                 "z_encoder.hidden.fc_layers.Layer 1.0.weight"):
        base = after[name].shape[1] - 6
        assert (after[name][:, base + 2] != before[name][:, base + 2]).all(), name
        assert (after[name][:, base + 5] != before[name][:, base + 5]).all(), name  # new donor
    # encoder BN running statistics frozen (momentum 0), decoder BN ones still move
    for name in before:
        if "running_" in name and name.startswith(("z_encoder.", "library_encoder.")):
            assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["decoder.hidden.fc_layers.Layer 0.1.running_mean"],
                           before["decoder.hidden.fc_layers.Layer 0.1.running_mean"])
    assert model.get_latent_representation().shape == (query.n_obs, 10)


def test_load_query_data_unfrozen_trains_everything(reference_model):
    model = SCVI.load_query_data(_query(), reference_model, unfrozen=True)
    assert model.module.frozen_parameters == {}
    before = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    model.train(max_epochs=3, plan_kwargs={"weight_decay": 1e-3}, enable_progress_bar=False)
    for name, value in model.module.named_parameters():
        if name.startswith("decoder.dispersion_head."):  # only used by dispersion="gene-cell"
            continue
        assert not torch.equal(value, before[name]), name


def test_load_query_data_options(reference_model):
    model = SCVI.load_query_data(
        _query(),
        reference_model,
        freeze_expression=False,
        freeze_decoder_first_layer=False,
        freeze_batchnorm_encoder=False,
        freeze_batchnorm_decoder=True,
        freeze_dropout=True,
    )
    masks = model.module.frozen_parameters
    assert "z_encoder.hidden.fc_layers.Layer 0.0.weight" not in masks
    assert "z_encoder.hidden.fc_layers.Layer 0.0.bias" not in masks
    assert "decoder.hidden.fc_layers.Layer 0.0.weight" not in masks
    assert masks["decoder.hidden.fc_layers.Layer 1.0.bias"].all()
    assert "z_encoder.hidden.fc_layers.Layer 0.1.weight" not in masks
    assert masks["decoder.hidden.fc_layers.Layer 0.1.weight"].all()
    for prefix, sub in model.module.named_modules():
        if isinstance(sub, torch.nn.BatchNorm1d):
            assert sub.momentum == (0.0 if prefix.startswith("decoder.") else 0.01), prefix
        if isinstance(sub, torch.nn.Dropout):
            assert sub.p == 0.0
    with pytest.raises(ValueError, match="batch categories unknown to the reference"):
        SCVI.load_query_data(_query(), reference_model, transfer_batch=False)


def test_load_query_data_from_directories(reference_model, tmp_path):
    reference_model.save(tmp_path / "ours")
    reference_model.save(tmp_path / "theirs", scvi_tools_format=True)
    expected = SCVI.load_query_data(_query(), reference_model).module.state_dict()
    for directory in ("ours", "theirs"):
        settings.seed = 0
        model = SCVI.load_query_data(_query(), tmp_path / directory)
        state = model.module.state_dict()
        for name, value in reference_model.module.state_dict().items():
            if value.shape == state[name].shape:
                assert torch.equal(value, state[name]), (directory, name)
        assert set(state) == set(expected)
        assert (
            model.module.frozen_parameters.keys()
            == SCVI.load_query_data(_query(), reference_model).module.frozen_parameters.keys()
        )


def test_load_query_data_subset_vars_and_warning():
    settings.seed = 0
    reference, query = _split(n_genes=40)
    SCVI.setup_anndata(reference, batch_key="batch")
    untrained = SCVI(reference, n_hidden=16)  # encode_covariates=False (default)
    query = query[:, ::-1].copy()
    query.obs["ignored"] = 1
    with pytest.warns(UserWarning, match="encoder cannot adapt"):
        model = SCVI.load_query_data(query, untrained, inplace_subset_query_vars=True)
    assert list(query.var_names) == list(reference.var_names)
    masks = model.module.frozen_parameters
    for name, _ in model.module.named_parameters():
        if name.startswith("z_encoder."):
            assert masks[name].all(), name


def test_freeze_masks_follow_fclayers_layout():
    """A layer without injected covariates is frozen whole; only the last sum(n_cat_list) columns train."""
    module = torch.nn.Module()
    module.z_encoder = torch.nn.Module()
    module.z_encoder.hidden = FCLayers(7, 5, [3, 1, 2], n_layers=2, n_hidden=5, inject_covariates=False)
    masks = query_freeze_masks(module)
    first = masks["z_encoder.hidden.fc_layers.Layer 0.0.weight"]
    assert first.shape == (5, 12) and first[:, :7].all() and not first[:, 7:].any()
    assert masks["z_encoder.hidden.fc_layers.Layer 1.0.weight"].all()


# ------------------------------------------------------------------ acceptance on real data


def test_query_mapping_cellbench(cellbench):
    """Reference on plates 1–2, query plate 3: the mapped query separates the cell lines and
    lands next to the reference cells of the same line."""
    from sklearn.neighbors import KNeighborsClassifier

    adata, kind = cellbench
    print(f"[data] {kind}")
    settings.seed = 0
    batches = sorted(adata.obs["batch"].astype(str).unique())
    reference = adata[adata.obs["batch"].astype(str) != batches[-1]].copy()
    query = adata[adata.obs["batch"].astype(str) == batches[-1]].copy()
    SCVI.setup_anndata(reference, batch_key="batch")
    start = time.time()
    ref_model = SCVI(reference, encode_covariates=True)
    ref_model.train(max_epochs=100, enable_progress_bar=False)
    ref_seconds = time.time() - start
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # encode_covariates=True: no warning expected
        start = time.time()
        query_model = SCVI.load_query_data(query, ref_model)
    query_model.train(max_epochs=100, plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=False)
    query_seconds = time.time() - start

    z_query = query_model.get_latent_representation()
    z_ref_shared = query_model.get_latent_representation(reference)  # the shared space: query model on both
    z_ref_own = ref_model.get_latent_representation()
    lines_ref = reference.obs["cell_line"].astype(str).to_numpy()
    lines_query = query.obs["cell_line"].astype(str).to_numpy()
    silhouette = silhouette_score(z_query, lines_query)
    accuracy = {}
    for name, z_ref in (("query model", z_ref_shared), ("reference model", z_ref_own)):
        knn = KNeighborsClassifier(n_neighbors=15).fit(z_ref, lines_ref)
        accuracy[name] = float((knn.predict(z_query) == lines_query).mean())
    print(f"[arches] ref {ref_seconds:.1f}s, query {query_seconds:.1f}s, query silhouette {silhouette:.3f}, "
          f"kNN accuracy {accuracy}, max |Δz_ref| {np.abs(z_ref_shared - z_ref_own).max():.2e}")
    assert silhouette >= 0.3
    assert accuracy["query model"] >= 0.9
    assert accuracy["reference model"] >= 0.9


def test_unlabeled_query_gets_a_new_label_category():
    from pyro_scvi import SCVI
    from pyro_scvi.data import synthetic_iid

    reference_data = synthetic_iid(batch_size=60, n_genes=40, n_batches=2, n_labels=2, seed=0)
    SCVI.setup_anndata(reference_data, batch_key="batch", labels_key="labels")
    reference = SCVI(reference_data, n_hidden=16, dispersion="gene-label", encode_covariates=True)
    reference.train(max_epochs=1, enable_progress_bar=False)
    query_data = synthetic_iid(batch_size=30, n_genes=40, n_batches=1, n_labels=2, seed=1)
    query_data.obs["batch"] = "batch_q"
    del query_data.obs["labels"]
    with pytest.warns(UserWarning, match="unlabeled"):
        query = SCVI.load_query_data(query_data, reference)
    assert query.summary_stats["n_labels"] == 3 and query.module.log_dispersion.shape == (40, 3)
    query.train(max_epochs=1, enable_progress_bar=False)
    assert query.get_latent_representation().shape == (30, 10)


def test_query_freezing_survives_save_and_load(tmp_path):
    from pyro_scvi import SCVI
    from pyro_scvi.data import synthetic_iid

    reference_data = synthetic_iid(batch_size=60, n_genes=40, n_batches=2, n_labels=2, seed=0)
    SCVI.setup_anndata(reference_data, batch_key="batch")
    reference = SCVI(reference_data, n_hidden=16, encode_covariates=True)
    reference.train(max_epochs=1, enable_progress_bar=False)
    query_data = synthetic_iid(batch_size=30, n_genes=40, n_batches=1, n_labels=2, seed=1)
    query_data.obs["batch"] = "batch_q"
    query = SCVI.load_query_data(query_data, reference, freeze_dropout=True)
    query.save(tmp_path / "q", save_anndata=True)
    loaded = SCVI.load(tmp_path / "q")
    assert set(loaded.module.frozen_parameters) == set(query.module.frozen_parameters)
    for name, mask in query.module.frozen_parameters.items():
        assert torch.equal(
            torch.as_tensor(loaded.module.frozen_parameters[name]), torch.as_tensor(mask).cpu()
        )
    modules = dict(loaded.module.named_modules())
    for name, module in query.module.named_modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            assert modules[name].momentum == module.momentum
        if isinstance(module, torch.nn.Dropout):
            assert modules[name].p == module.p == 0.0
    frozen_before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    loaded.train(max_epochs=2, enable_progress_bar=False, plan_kwargs={"weight_decay": 1e-3})
    params = dict(loaded.module.named_parameters())
    for name, mask in loaded.module.frozen_parameters.items():
        mask = torch.as_tensor(mask, dtype=torch.bool).expand_as(params[name])
        assert torch.equal(params[name][mask], frozen_before[name][mask])
