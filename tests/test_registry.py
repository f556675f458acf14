"""Tests of the AnnData registry (scvi-tools' setup_anndata fields, transfer and library prior)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_scvi.data.registry import (
    REGISTRY_KEYS,
    format_registry,
    get_from_registry,
    library_size_prior,
    setup_registry,
    summary_stats,
    validate_registered,
)

N_CELLS, N_GENES = 60, 30
CELLBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "cellbench_5cl.h5ad"
FULL_SETUP = dict(
    batch_key="batch",
    labels_key="cell_type",
    size_factor_key="sf",
    categorical_covariate_keys=["donor"],
    continuous_covariate_keys=["pct_mito"],
)


def make_adata(
    seed: int = 0, n_cells: int = N_CELLS, n_genes: int = N_GENES, x_format: str = "dense"
) -> ad.AnnData:
    """Poisson counts: 3 batches, 4 labels, a donor covariate, a continuous covariate and a size factor."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    x = {"dense": counts, "csr": sp.csr_matrix(counts), "csc": sp.csc_matrix(counts)}[x_format]
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["b2", "b0", "b1"], n_cells)),
            "cell_type": rng.choice(["T", "B", "NK", "Mono"], n_cells),  # plain strings
            "donor": rng.integers(10, 13, n_cells),  # integers
            "pct_mito": rng.uniform(0, 0.2, n_cells),
            "sf": rng.uniform(0.5, 2.0, n_cells),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]))
    adata.layers["counts"] = counts.copy()
    return adata


@pytest.fixture
def adata() -> ad.AnnData:
    return make_adata()


def setup_quietly(adata, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return setup_registry(adata, **kwargs)


# ------------------------------------------------------------------------------------------
# Registry layout and values
# ------------------------------------------------------------------------------------------


def test_registry_layout_and_values(adata):
    registry = setup_quietly(adata, **FULL_SETUP)

    assert registry["scvi_version"] == "1.4.2"
    assert isinstance(registry["pyro_scvi_version"], str)
    assert registry["model_name"] == "SCVI"
    assert registry["setup_method_name"] == "setup_anndata"
    assert registry["setup_args"] == dict(layer=None, **FULL_SETUP)
    assert registry["_scvi_uuid"] == adata.uns["_scvi_uuid"]
    assert "_scvi_manager_uuid" in adata.uns
    fields = registry["field_registries"]
    assert list(fields) == [
        "X", "batch", "labels", "size_factor", "extra_categorical_covs", "extra_continuous_covs"
    ]
    for field in fields.values():
        assert set(field) == {"data_registry", "state_registry", "summary_stats"}

    x = fields["X"]
    assert x["data_registry"] == {"attr_name": "X", "attr_key": None}
    assert x["state_registry"]["n_obs"] == N_CELLS and x["state_registry"]["n_vars"] == N_GENES
    assert x["state_registry"]["column_names"].dtype == object
    assert list(x["state_registry"]["column_names"]) == list(adata.var_names)

    batch = fields["batch"]
    assert batch["data_registry"] == {"attr_name": "obs", "attr_key": "_scvi_batch"}
    assert batch["state_registry"]["original_key"] == "batch"
    assert list(batch["state_registry"]["categorical_mapping"]) == ["b0", "b1", "b2"]
    assert batch["state_registry"]["categorical_mapping"].dtype == object
    labels_mapping = fields["labels"]["state_registry"]["categorical_mapping"]
    assert list(labels_mapping) == ["B", "Mono", "NK", "T"]  # sorted

    assert fields["size_factor"]["data_registry"] == {"attr_name": "obs", "attr_key": "sf"}
    assert fields["size_factor"]["summary_stats"] == {}

    cat = fields["extra_categorical_covs"]
    assert cat["data_registry"] == {"attr_name": "obsm", "attr_key": "_scvi_extra_categorical_covs"}
    assert cat["state_registry"]["field_keys"] == ["donor"]
    assert cat["state_registry"]["n_cats_per_key"] == [3]
    assert list(cat["state_registry"]["mappings"]["donor"]) == [10, 11, 12]

    cont = fields["extra_continuous_covs"]
    assert cont["data_registry"] == {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous_covs"}
    assert list(cont["state_registry"]["columns"]) == ["pct_mito"]

    assert summary_stats(registry) == {
        "n_vars": N_GENES,
        "n_cells": N_CELLS,
        "n_batch": 3,
        "n_labels": 4,
        "n_extra_categorical_covs": 1,
        "n_extra_continuous_covs": 1,
    }


def test_codes_written_into_adata(adata):
    registry = setup_quietly(adata, **FULL_SETUP)
    fields = registry["field_registries"]
    pairs = [("batch", "_scvi_batch", "batch"), ("cell_type", "_scvi_labels", "labels")]
    for obs_key, column, field in pairs:
        mapping = fields[field]["state_registry"]["categorical_mapping"]
        codes = adata.obs[column].to_numpy()
        assert np.issubdtype(codes.dtype, np.integer)
        np.testing.assert_array_equal(mapping[codes], adata.obs[obs_key].astype(str).to_numpy())

    cat_table = adata.obsm["_scvi_extra_categorical_covs"]
    assert isinstance(cat_table, pd.DataFrame) and list(cat_table.columns) == ["donor"]
    np.testing.assert_array_equal(cat_table["donor"].to_numpy(), adata.obs["donor"].to_numpy() - 10)
    cont_table = adata.obsm["_scvi_extra_continuous_covs"]
    assert isinstance(cont_table, pd.DataFrame) and list(cont_table.columns) == ["pct_mito"]
    assert (cont_table.dtypes == np.float32).all()


def test_missing_keys_give_constant_columns(adata):
    registry = setup_quietly(adata)
    fields = registry["field_registries"]
    for field, column, stat in [("batch", "_scvi_batch", "n_batch"), ("labels", "_scvi_labels", "n_labels")]:
        assert fields[field]["state_registry"]["original_key"] == column
        assert list(fields[field]["state_registry"]["categorical_mapping"]) == [0]
        assert fields[field]["summary_stats"] == {stat: 1}
        assert (adata.obs[column] == 0).all()
    assert fields["size_factor"] == {"data_registry": {}, "state_registry": {}, "summary_stats": {}}
    assert fields["extra_categorical_covs"]["summary_stats"] == {"n_extra_categorical_covs": 0}
    assert fields["extra_continuous_covs"]["summary_stats"] == {"n_extra_continuous_covs": 0}
    assert get_from_registry(adata, registry, REGISTRY_KEYS.SIZE_FACTOR) is None
    assert get_from_registry(adata, registry, REGISTRY_KEYS.CAT_COVS) is None
    assert get_from_registry(adata, registry, REGISTRY_KEYS.CONT_COVS) is None


def test_uuid_assigned_once_manager_uuid_each_time(adata):
    first = setup_quietly(adata, batch_key="batch")
    manager = adata.uns["_scvi_manager_uuid"]
    second = setup_quietly(adata, batch_key="batch")
    assert first["_scvi_uuid"] == second["_scvi_uuid"]
    assert adata.uns["_scvi_manager_uuid"] != manager


def test_unused_categories_are_kept(adata):
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories(["zz"])
    registry = setup_quietly(adata, batch_key="batch")
    mapping = registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    assert list(mapping) == ["b0", "b1", "b2", "zz"]
    assert summary_stats(registry)["n_batch"] == 4


# ------------------------------------------------------------------------------------------
# Warnings and errors
# ------------------------------------------------------------------------------------------


def test_small_category_warning(adata):
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.obs.iloc[:2, adata.obs.columns.get_loc("batch")] = "tiny"
    with pytest.warns(
        UserWarning,
        match=r"Category tiny in adata.obs\['_scvi_batch'\] has fewer than 3 cells. "
        r"Models may not train properly.",
    ):
        setup_registry(adata, batch_key="batch")


def test_non_integer_warning_for_x_and_layer(adata):
    adata.X = adata.X + 0.5
    with pytest.warns(UserWarning, match=r"^adata\.X does not contain unnormalized count data\. "
                      r"Are you sure this is what you want\?$"):
        setup_registry(adata)
    adata.layers["norm"] = np.log1p(adata.layers["counts"])
    with pytest.warns(
        UserWarning, match=r"^adata\.layers\[norm\] does not contain unnormalized count data\."
    ):
        setup_registry(adata, layer="norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_registry(adata, layer="counts")  # integer counts: no warning


@pytest.mark.parametrize(
    "bad, match", [(-1.0, "negative values"), (np.nan, "NaN values"), (np.inf, "infinite values")]
)
@pytest.mark.parametrize("x_format", ["dense", "csr"])
def test_invalid_values_raise_naming_the_layer(bad, match, x_format):
    adata = make_adata(x_format=x_format)
    counts = adata.layers["counts"].copy()
    counts[5, 7] = bad
    adata.layers["counts"] = sp.csr_matrix(counts) if x_format == "csr" else counts
    with pytest.raises(ValueError, match=rf"adata\.layers\['counts'\] contains {match}.*`layer=`"):
        setup_registry(adata, layer="counts")
    assert "_scvi_batch" not in adata.obs  # nothing written on failure


def test_negative_message_reports_minimum(adata):
    adata.X[0, 0] = -2.0
    with pytest.raises(ValueError, match=r"adata\.X contains negative values \(min -2\.0\)"):
        setup_registry(adata)


def test_view_is_rejected(adata):
    with pytest.raises(ValueError, match=r"Please run `adata = adata.copy\(\)`"):
        setup_registry(adata[:10])


def test_unknown_layer_and_obs_key(adata):
    with pytest.raises(ValueError, match=r"^nope is not a valid key in adata\.layers\.$"):
        setup_registry(adata, layer="nope")
    for kwargs in [dict(batch_key="nope"), dict(labels_key="nope"), dict(size_factor_key="nope"),
                   dict(categorical_covariate_keys=["nope"]), dict(continuous_covariate_keys=["nope"])]:
        with pytest.raises(KeyError, match="nope not found in adata.obs."):
            setup_quietly(adata, **kwargs)


def test_csc_warns_but_works():
    adata = make_adata(x_format="csc")
    with pytest.warns(UserWarning, match="formatted as CSR"):
        registry = setup_registry(adata, batch_key="batch")
    assert summary_stats(registry)["n_batch"] == 3


def test_nan_in_batch_column_raises(adata):
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(ValueError, match=r'Making \.obs\["batch"\] categorical failed'):
        setup_registry(adata, batch_key="batch")


@pytest.mark.parametrize("value", [0.0, -1.0, np.nan, np.inf])
def test_bad_size_factor(adata, value):
    adata.obs.iloc[4, adata.obs.columns.get_loc("sf")] = value
    with pytest.raises(ValueError, match=r"Size factor adata\.obs\['sf'\]"):
        setup_registry(adata, size_factor_key="sf")


def test_size_factor_must_be_numeric(adata):
    adata.obs["sf"] = "x"
    with pytest.raises(ValueError, match="must be numeric"):
        setup_registry(adata, size_factor_key="sf")


def test_bad_continuous_covariate(adata):
    adata.obs.iloc[4, adata.obs.columns.get_loc("pct_mito")] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        setup_registry(adata, continuous_covariate_keys=["pct_mito"])
    with pytest.raises(ValueError, match="must be numeric"):
        setup_registry(adata, continuous_covariate_keys=["batch"])


def test_extend_categories_needs_source(adata):
    with pytest.raises(TypeError):
        setup_registry(adata, extend_categories=True)


# ------------------------------------------------------------------------------------------
# Transfer
# ------------------------------------------------------------------------------------------


def test_transfer_same_categories_uses_source_codes(adata):
    source = setup_quietly(adata, **FULL_SETUP)
    target = make_adata(seed=1)
    # A different category order in the target must not change the codes.
    target.obs["batch"] = target.obs["batch"].cat.reorder_categories(["b2", "b1", "b0"])
    target.obs["donor"] = target.obs["donor"].where(target.obs["donor"] != 10, 12)  # donor 10 absent
    registry = setup_quietly(target, source_registry=source)

    assert registry["setup_args"] == source["setup_args"]
    assert registry["_scvi_uuid"] == target.uns["_scvi_uuid"] != source["_scvi_uuid"]
    src_fields, fields = source["field_registries"], registry["field_registries"]
    for field in ["batch", "labels"]:
        np.testing.assert_array_equal(
            fields[field]["state_registry"]["categorical_mapping"],
            src_fields[field]["state_registry"]["categorical_mapping"],
        )
    batch_codes = get_from_registry(target, registry, REGISTRY_KEYS.BATCH).ravel()
    expected = pd.Index(["b0", "b1", "b2"]).get_indexer(target.obs["batch"].astype(str))
    np.testing.assert_array_equal(batch_codes, expected)
    assert list(fields["extra_categorical_covs"]["state_registry"]["mappings"]["donor"]) == [10, 11, 12]
    np.testing.assert_array_equal(
        get_from_registry(target, registry, REGISTRY_KEYS.CAT_COVS).ravel(),
        target.obs["donor"].to_numpy() - 10,
    )
    assert summary_stats(registry) == summary_stats(source)


def test_transfer_with_default_batch(adata):
    source = setup_quietly(adata, labels_key="cell_type")
    target = make_adata(seed=2)
    registry = setup_quietly(target, source_registry=source)
    assert (target.obs["_scvi_batch"] == 0).all()
    assert summary_stats(registry)["n_batch"] == 1


def test_transfer_unseen_category(adata):
    source = setup_quietly(adata, **FULL_SETUP)
    target = make_adata(seed=3)
    target.obs["batch"] = target.obs["batch"].cat.rename_categories({"b2": "new"})
    with pytest.raises(ValueError, match=r"^Category new not found in source registry\. "
                       r"Cannot transfer setup without `extend_categories = True`\.$"):
        setup_quietly(target, source_registry=source)

    registry = setup_quietly(target, source_registry=source, extend_categories=True)
    mapping = registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    assert list(mapping) == ["b0", "b1", "b2", "new"]
    assert summary_stats(registry)["n_batch"] == 4
    codes = get_from_registry(target, registry, REGISTRY_KEYS.BATCH).ravel()
    np.testing.assert_array_equal(mapping[codes], target.obs["batch"].astype(str).to_numpy())


def test_transfer_unseen_covariate_category(adata):
    source = setup_quietly(adata, **FULL_SETUP)
    target = make_adata(seed=4)
    target.obs.iloc[0, target.obs.columns.get_loc("donor")] = 99
    with pytest.raises(ValueError, match=r'Making \.obs\["donor"\] categorical failed'):
        setup_quietly(target, source_registry=source)
    registry = setup_quietly(target, source_registry=source, extend_categories=True)
    state = registry["field_registries"]["extra_categorical_covs"]["state_registry"]
    assert list(state["mappings"]["donor"]) == [10, 11, 12, 99]
    assert state["n_cats_per_key"] == [4]
    assert get_from_registry(target, registry, REGISTRY_KEYS.CAT_COVS)[0, 0] == 3


def test_transfer_n_vars_mismatch(adata):
    source = setup_quietly(adata, batch_key="batch")
    target = make_adata(n_genes=N_GENES - 1)
    with pytest.raises(ValueError, match=rf"^Number of vars in `adata_target` not the same as source\. "
                       rf"Expected: {N_GENES} Received: {N_GENES - 1}$"):
        setup_quietly(target, source_registry=source)


def test_transfer_conflicting_explicit_args(adata):
    source = setup_quietly(adata, batch_key="batch")
    target = make_adata(seed=5)
    setup_quietly(target, source_registry=source, batch_key="batch")  # repeating the source is fine
    with pytest.raises(ValueError, match="conflicts with the source registry"):
        setup_quietly(target, source_registry=source, batch_key="cell_type")


# ------------------------------------------------------------------------------------------
# Reading back, validation, library prior, formatting
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_format", ["dense", "csr"])
def test_get_from_registry_shapes_and_dtypes(x_format):
    adata = make_adata(x_format=x_format)
    registry = setup_quietly(adata, **FULL_SETUP)
    assert get_from_registry(adata, registry, "X") is adata.X
    for key in ["batch", "labels"]:
        value = get_from_registry(adata, registry, key)
        assert value.shape == (N_CELLS, 1) and value.dtype == np.int64
    sf = get_from_registry(adata, registry, "size_factor")
    assert sf.shape == (N_CELLS, 1) and sf.dtype == np.float32
    np.testing.assert_allclose(sf.ravel(), adata.obs["sf"].to_numpy(), rtol=1e-6)
    cat = get_from_registry(adata, registry, "extra_categorical_covs")
    assert cat.shape == (N_CELLS, 1) and cat.dtype == np.int64
    cont = get_from_registry(adata, registry, "extra_continuous_covs")
    assert cont.shape == (N_CELLS, 1) and cont.dtype == np.float32
    with pytest.raises(KeyError):
        get_from_registry(adata, registry, "nope")

    layer_registry = setup_quietly(adata, layer="counts")
    assert get_from_registry(adata, layer_registry, "X") is adata.layers["counts"]


def test_validate_registered(adata):
    registry = setup_quietly(adata, **FULL_SETUP)
    validate_registered(adata, registry)
    with pytest.raises(ValueError, match="n_vars"):
        validate_registered(adata[:, :10].copy(), registry)
    fresh = make_adata(seed=6)
    with pytest.raises(ValueError, match="_scvi_batch"):
        validate_registered(fresh, registry)


def test_library_size_prior_matches_numpy():
    adata = make_adata(x_format="csr")
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories(["unused"])
    registry = setup_quietly(adata, batch_key="batch")
    means, variances = library_size_prior(adata, registry)
    assert means.shape == variances.shape == (1, 4)
    assert means.dtype == variances.dtype == np.float32

    log_totals = np.log(adata.X.toarray().sum(axis=1))
    codes = adata.obs["_scvi_batch"].to_numpy()
    for b in range(3):
        np.testing.assert_allclose(means[0, b], log_totals[codes == b].mean(), rtol=1e-6)
        np.testing.assert_allclose(variances[0, b], log_totals[codes == b].var(), rtol=1e-5)
    assert means[0, 3] == 0 and variances[0, 3] == 1


def test_library_size_prior_empty_cells(adata):
    adata.X[0] = 0
    registry = setup_quietly(adata, batch_key="batch")
    with pytest.warns(UserWarning, match="This dataset has some empty cells, this might fail inference."):
        means, _ = library_size_prior(adata, registry)
    log_totals = np.log(np.maximum(adata.X.sum(axis=1), 1))  # the empty cell counts as log 0
    b = adata.obs["_scvi_batch"].iloc[0]
    in_batch = adata.obs["_scvi_batch"].to_numpy() == b
    np.testing.assert_allclose(means[0, b], log_totals[in_batch].mean(), rtol=1e-6)


def test_format_registry(adata):
    adata.layers["counts"] = adata.X.copy()
    registry = setup_quietly(adata, layer="counts", **FULL_SETUP)
    text = format_registry(registry)
    lines = [line.rstrip() for line in text.splitlines()]
    assert "Setup via `SCVI.setup_anndata` with arguments:" in lines
    assert "    batch_key: 'batch'" in lines
    assert any(line.startswith("n_batch") and line.endswith("| 3") for line in lines)
    assert any(line.startswith("X ") and "| adata.layers['counts']" in line for line in lines)
    assert any(line.startswith("batch ") and line.endswith("| adata.obs['_scvi_batch']") for line in lines)
    assert any("adata.obsm['_scvi_extra_categorical_covs']" in line for line in lines)
    assert "batch State Registry" in lines
    assert any("adata.obs['batch']" in line and "| b0" in line and line.endswith("| 0") for line in lines)
    assert any("adata.obs['donor']" in line and "| 10" in line for line in lines)

    hidden = format_registry(registry, hide_state_registries=True)
    assert "State Registry" not in hidden and "Data Registry" in hidden


# ------------------------------------------------------------------------------------------
# Property test and real data
# ------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_cells=st.integers(1, 40),
    n_genes=st.integers(1, 8),
    sparse=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64]),
    n_batch=st.integers(1, 5),
    as_strings=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_codes_round_trip(n_cells, n_genes, sparse, dtype, n_batch, as_strings, seed):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, size=(n_cells, n_genes)).astype(dtype)
    values = rng.integers(0, n_batch, n_cells)
    batch = np.array([f"batch_{v}" for v in values], dtype=object) if as_strings else values
    obs = pd.DataFrame({"b": batch}, index=[str(i) for i in range(n_cells)])
    adata = ad.AnnData(sp.csr_matrix(counts) if sparse else counts, obs=obs)
    registry = setup_quietly(adata, batch_key="b", labels_key="b")

    mapping = registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    codes = get_from_registry(adata, registry, REGISTRY_KEYS.BATCH).ravel()
    assert list(mapping) == sorted(set(batch.tolist()))
    np.testing.assert_array_equal(mapping[codes], batch)
    assert summary_stats(registry)["n_batch"] == len(np.unique(values))
    assert summary_stats(registry)["n_cells"] == n_cells and summary_stats(registry)["n_vars"] == n_genes
    np.testing.assert_array_equal(get_from_registry(adata, registry, REGISTRY_KEYS.LABELS).ravel(), codes)


def test_cellbench_5cl():
    if not CELLBENCH.exists():
        pytest.skip(f"real data absent: {CELLBENCH}")
    print(f"using real data {CELLBENCH}")
    adata = ad.read_h5ad(CELLBENCH)
    registry = setup_quietly(adata, batch_key="batch", labels_key="cell_line")
    stats = summary_stats(registry)
    assert stats["n_batch"] == 3 and stats["n_labels"] == 5
    assert stats["n_cells"] == adata.n_obs and stats["n_vars"] == adata.n_vars
    means, variances = library_size_prior(adata, registry)
    assert means.shape == (1, 3) and np.all(variances > 0)
