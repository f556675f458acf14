"""The typed registry: Registry/Field round trips, accessors, and the read-only dict view."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from test_io_scvi_tools import legacy_setup_dict
from test_registry import FULL_SETUP, make_adata

from pyro_scvi.data import AnnDataManager, Field, Registry
from pyro_scvi.data.registry import (
    REGISTRY_KEYS,
    format_registry,
    get_from_registry,
    library_size_prior,
    setup_registry,
    summary_stats,
    validate_registered,
)
from pyro_scvi.io import load_registry
from pyro_scvi.io.legacy import registry_from_legacy_setup_dict
from pyro_scvi.io.native import to_safe

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SCVI_TOOLS_MODEL = SHARED_FIXTURES / "scvi_tools_cellbench5" / "model"
SAVED_BY_0_1_0 = Path(__file__).parent / "fixtures" / "saved_by_0.1.0"


def assert_identical(a, b, path="registry"):
    """Same keys in the same order, same value types, equal values (arrays: same dtype and elements)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture
def full():
    adata = make_adata()
    return adata, setup_registry(adata, **FULL_SETUP)


def legacy_registry() -> dict:
    """The converter's registry for the scvi-tools 0.14 setup of ``test_io_scvi_tools`` (a batch, one
    categorical and one continuous covariate)."""
    var_names = [f"g{i}" for i in range(20)]
    return registry_from_legacy_setup_dict(legacy_setup_dict(var_names), var_names)


# ------------------------------------------------------------------------------------ round trips


def test_setup_registry_returns_the_dict_layout_saved_before(full):
    _, registry = full
    assert isinstance(registry, Registry)
    saved = registry.to_dict()
    assert type(saved) is dict
    assert list(saved) == ["scvi_version", "pyro_scvi_version", "model_name", "setup_method_name",
                           "setup_args", "field_registries", "_scvi_uuid"]
    assert list(saved["field_registries"]) == ["X", "batch", "labels", "size_factor",
                                               "extra_categorical_covs", "extra_continuous_covs"]
    for entry in saved["field_registries"].values():
        assert list(entry) == ["data_registry", "state_registry", "summary_stats"]
    assert saved["field_registries"]["size_factor"]["data_registry"] == {"attr_name": "obs", "attr_key": "sf"}
    batch = saved["field_registries"]["batch"]
    assert batch["data_registry"] == {"attr_name": "obs", "attr_key": "_scvi_batch"}
    assert isinstance(batch["state_registry"]["categorical_mapping"], np.ndarray)
    assert saved["setup_args"]["categorical_covariate_keys"] == ["donor"]


def test_round_trip_of_our_registry_is_exact(full):
    _, registry = full
    saved = registry.to_dict()
    back = Registry.from_dict(saved)
    assert_identical(back.to_dict(), saved)
    assert back == registry and not back != registry


@pytest.mark.skipif(not SCVI_TOOLS_MODEL.exists(), reason="scvi-tools fixture absent")
def test_round_trip_of_an_scvi_tools_registry_is_exact():
    saved = load_registry(SCVI_TOOLS_MODEL)
    registry = Registry.from_dict(saved)
    assert_identical(registry.to_dict(), saved)  # key order too (scvi-tools writes setup_method_name late)
    assert registry.pyro_scvi_version is None and "pyro_scvi_version" not in registry
    assert registry.uuid == saved["_scvi_uuid"]


def test_round_trip_of_a_legacy_converted_registry_is_exact():
    saved = legacy_registry()
    registry = Registry.from_dict(saved)
    assert_identical(registry.to_dict(), saved)
    assert registry.uuid is None and "_scvi_uuid" not in registry
    assert registry.categorical_covariate_keys == ["donor"] and registry.n_cats_per_covariate == [3]
    assert registry.continuous_covariate_keys == ["pct_mito"]
    assert registry.batch_categories.tolist() == ["b1", "b2"]


def test_round_trip_of_the_registry_of_a_file_saved_before_the_change():
    saved = load_registry(SAVED_BY_0_1_0)
    assert_identical(Registry.from_dict(saved).to_dict(), saved)


def test_unknown_keys_survive_a_round_trip(full):
    _, registry = full
    saved = registry.to_dict()
    saved["from_the_future"] = {"a": [1, 2]}
    saved["field_registries"]["batch"]["extra_part"] = 3
    saved["field_registries"]["batch"]["data_registry"]["attr_extra"] = "x"
    saved["field_registries"]["new"] = {"data_registry": {}, "state_registry": {"k": 1}, "summary_stats": {}}
    saved["_scvi_uuid"] = None  # present with a None value stays present
    assert_identical(Registry.from_dict(saved).to_dict(), saved)


def test_to_dict_gives_a_fresh_copy(full):
    _, registry = full
    saved = registry.to_dict()
    saved["setup_args"]["batch_key"] = "changed"
    saved["field_registries"]["extra_categorical_covs"]["state_registry"]["field_keys"].append("x")
    assert registry.setup_args["batch_key"] == "batch"
    assert registry.categorical_covariate_keys == ["donor"]


def test_saved_form_is_unchanged(full):
    """What the model file stores (to_safe of the registry) is the same for the Registry and its dict."""
    _, registry = full
    assert_identical(to_safe(registry), to_safe(registry.to_dict()))


def test_malformed_registries_are_refused():
    with pytest.raises(ValueError, match="field_registries"):
        Registry.from_dict({"setup_args": {}})
    with pytest.raises(ValueError, match="attr_name"):
        Registry.from_dict({"field_registries": {"X": {"data_registry": {"attr_key": None}}}})
    with pytest.raises(TypeError, match="Registry or a registry dict"):
        Registry.coerce(["not", "a", "registry"])


# ------------------------------------------------------------------------------------- accessors


def test_accessors_read_what_the_dict_paths_hold(full):
    adata, registry = full
    fields = registry["field_registries"]
    np.testing.assert_array_equal(registry.var_names, fields["X"]["state_registry"]["column_names"])
    np.testing.assert_array_equal(registry.var_names, np.asarray(adata.var_names))
    assert registry.n_vars == fields["X"]["state_registry"]["n_vars"] == adata.n_vars
    assert registry.n_cells == fields["X"]["state_registry"]["n_obs"] == adata.n_obs
    assert registry.layer is None and setup_registry(make_adata(), layer="counts").layer == "counts"
    batch, labels = fields["batch"]["state_registry"], fields["labels"]["state_registry"]
    np.testing.assert_array_equal(registry.batch_categories, batch["categorical_mapping"])
    np.testing.assert_array_equal(registry.label_categories, labels["categorical_mapping"])
    assert registry.n_batch == 3 and registry.n_labels == 4
    assert registry.field("batch").original_key == batch["original_key"] == "batch"
    assert registry.field("batch").location == "adata.obs['_scvi_batch']"
    mappings = fields["extra_categorical_covs"]["state_registry"]["mappings"]
    assert list(registry.categorical_covariate_mappings) == list(mappings) == ["donor"]
    np.testing.assert_array_equal(registry.categorical_covariate_mappings["donor"], mappings["donor"])
    assert registry.categorical_covariate_keys == ["donor"]
    cat_state = fields["extra_categorical_covs"]["state_registry"]
    assert registry.n_cats_per_covariate == cat_state["n_cats_per_key"] == [3]
    assert registry.continuous_covariate_keys == ["pct_mito"]
    assert registry.has_size_factor and not setup_registry(make_adata()).has_size_factor
    assert registry.summary_stats == summary_stats(registry.to_dict())
    assert registry.uuid == registry["_scvi_uuid"] == adata.uns["_scvi_uuid"]
    assert registry.setup_args == registry["setup_args"]
    assert not registry.is_minified
    with pytest.raises(KeyError, match="registered fields"):
        registry.field("protein_expression")


def test_accessors_of_a_registry_without_covariates():
    registry = setup_registry(make_adata())
    assert registry.batch_categories.tolist() == [0] and registry.n_batch == 1
    assert registry.categorical_covariate_mappings == {} and registry.categorical_covariate_keys == []
    assert registry.n_cats_per_covariate == [] and registry.continuous_covariate_keys == []
    assert not registry.field(REGISTRY_KEYS.CAT_COVS).is_registered


# ------------------------------------------------------------------------------ the dict view


def test_the_registry_reads_as_the_dict_it_saves(full):
    _, registry = full
    saved = registry.to_dict()
    assert isinstance(registry, Mapping) and isinstance(registry, dict)
    assert list(registry) == list(saved) and len(registry) == len(saved)
    batch_state = registry["field_registries"]["batch"]["state_registry"]
    np.testing.assert_array_equal(batch_state["categorical_mapping"], registry.batch_categories)
    assert registry.get("model_name") == "SCVI" and registry.get("missing", 7) == 7
    assert "_scvi_uuid" in registry and "missing" not in registry
    assert_identical(dict(registry), saved)
    assert registry == saved and registry == Registry.from_dict(saved)


def test_the_dict_view_is_read_only(full):
    _, registry = full
    for mutate in (lambda r: r.__setitem__("model_name", "X"), lambda r: r.__delitem__("model_name"),
                   lambda r: r.update({}), lambda r: r.pop("model_name"), lambda r: r.setdefault("a", 1),
                   lambda r: r.clear(), lambda r: r.popitem()):
        with pytest.raises(TypeError, match="read-only"):
            mutate(registry)
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry.model_name = "X"
    registry["setup_args"]["batch_key"] = "changed"  # a copy: the registry does not change
    assert registry.setup_args["batch_key"] == "batch"


def test_replace_pickle_and_copy(full):
    _, registry = full
    renamed = dataclasses.replace(registry, model_name="MyModel")
    assert renamed.model_name == renamed["model_name"] == "MyModel"
    assert renamed != registry
    for other in (pickle.loads(pickle.dumps(registry)), copy.deepcopy(registry), copy.copy(registry)):
        assert type(other) is Registry and other == registry
        assert_identical(other.to_dict(), registry.to_dict())


def test_fields_from_dicts_are_converted():
    x = {"data_registry": {"attr_name": "X", "attr_key": None}, "state_registry": {"n_vars": 2, "n_obs": 1},
         "summary_stats": {"n_vars": 2}}
    registry = Registry(fields={"X": x})
    assert isinstance(registry.field("X"), Field) and registry.n_vars == 2
    assert list(registry) == ["scvi_version", "model_name", "setup_method_name", "setup_args",
                              "field_registries"]


# ----------------------------------------------------------------------- functions take both forms


def test_data_functions_take_a_registry_or_its_dict(full):
    adata, registry = full
    saved = registry.to_dict()
    for key in ("X", "batch", "labels", "size_factor", "extra_categorical_covs", "extra_continuous_covs"):
        np.testing.assert_array_equal(np.asarray(get_from_registry(adata, saved, key)),
                                      np.asarray(get_from_registry(adata, registry, key)))
    assert summary_stats(saved) == summary_stats(registry)
    assert format_registry(saved) == format_registry(registry)
    validate_registered(adata, saved)
    for a, b in zip(library_size_prior(adata, saved), library_size_prior(adata, registry)):
        np.testing.assert_array_equal(a, b)
    other = make_adata(seed=1)
    from_dict = setup_registry(other.copy(), source_registry=saved)
    from_registry = setup_registry(other.copy(), source_registry=registry)
    assert dataclasses.replace(from_dict, uuid=None) == dataclasses.replace(from_registry, uuid=None)


def test_manager_holds_a_registry(full):
    adata, registry = full
    manager = AnnDataManager(adata, registry.to_dict())
    assert type(manager.registry) is Registry and manager.registry == registry
    assert manager.adata_uuid == registry.uuid
    assert manager.summary_stats["n_cells"] == adata.n_obs
    assert AnnDataManager(adata, registry).registry is registry
