"""Reading and writing model directories: scvi-tools' formats (pyro_scvi.io.scvi_tools, .legacy), the
safe loader (pyro_scvi.io.safe_unpickle) and reading either format (pyro_scvi.io.model_dir).

The scvi-tools fixture (a default SCVI saved by scvi-tools 1.4.2 and its latent outputs) lives in
``../shared/fixtures``; tests that need it are skipped when it is absent. The others build their
files here (including a pre-0.15 legacy directory written by hand and files carrying a pickle
payload that must never run).
"""

from __future__ import annotations

import copy
import os
import pickle
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Mapping

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pyro_scvi import SCVI
from pyro_scvi.data import synthetic_iid
from pyro_scvi.io import convert_legacy_save, load_registry, read_model_dir, view_setup_args
from pyro_scvi.io.legacy import registry_from_legacy_setup_dict
from pyro_scvi.io.native import from_safe, to_safe
from pyro_scvi.io.safe_unpickle import ALLOWED_GLOBALS, safe_torch_load
from pyro_scvi.io.scvi_tools import (
    SCVI_TOOLS_VERSION,
    from_scvi_tools_state_dict,
    init_params_from_scvi_tools,
    init_params_to_scvi_tools,
    read_scvi_tools_model,
    to_scvi_tools_state_dict,
    write_scvi_tools_model,
)
from pyro_scvi.models.module import SCVIModule

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
CELLBENCH = FIXTURES / "scvi_tools_cellbench5"


# ------------------------------------------------------------------------------------------ helpers


def assert_same(a, b, path="root"):
    """Deep equality of nested dicts/lists/arrays/DataFrames/tensors, with a useful failure path."""
    if isinstance(a, dict):
        assert isinstance(b, dict), path
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b), path
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"


class Payload:
    """Unpickling this runs ``func(*args)``: what a malicious model file would carry."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def small_module(**kwargs) -> SCVIModule:
    torch.manual_seed(0)
    return SCVIModule(n_input=20, n_batch=2, n_labels=3, n_hidden=16, n_latent=4, **kwargs)


def small_attr_dict(registry_extra=None) -> dict:
    registry = {
        "scvi_version": "1.4.2",
        "model_name": "SCVI",
        "setup_method_name": "setup_anndata",
        "setup_args": {"layer": None, "batch_key": "batch", "labels_key": None, "size_factor_key": None,
                       "categorical_covariate_keys": None, "continuous_covariate_keys": None},
        "field_registries": {
            "X": {"data_registry": {"attr_name": "X", "attr_key": None},
                  "state_registry": {"n_obs": 10, "n_vars": 20,
                                     "column_names": np.array([f"g{i}" for i in range(20)], dtype=object)},
                  "summary_stats": {"n_vars": 20, "n_cells": 10}},
            "batch": {"data_registry": {"attr_name": "obs", "attr_key": "_scvi_batch"},
                      "state_registry": {"categorical_mapping": np.array(["a", "b"], dtype=object),
                                         "original_key": "batch"},
                      "summary_stats": {"n_batch": 2}},
        },
        **(registry_extra or {}),
    }
    return {"registry_": registry,
            "init_params_": {"non_kwargs": {"n_hidden": 16, "n_latent": 4}, "kwargs": {"kwargs": {}}},
            "is_trained_": False, "history_": None}


@pytest.fixture(scope="module")
def cellbench():
    if not (CELLBENCH / "model" / "model.pt").exists():
        pytest.skip(f"scvi-tools fixture not found at {CELLBENCH} (shared fixtures are absent)")
    return read_scvi_tools_model(CELLBENCH / "model")


@pytest.fixture(scope="module")
def cellbench_raw():
    """The fixture file as stored (scvi-tools names), read through the same safe loader."""
    if not (CELLBENCH / "model" / "model.pt").exists():
        pytest.skip(f"scvi-tools fixture not found at {CELLBENCH} (shared fixtures are absent)")
    return safe_torch_load(CELLBENCH / "model" / "model.pt")


# ------------------------------------------------------------------------------------------ fixture


def test_fixture_loads_and_encoder_reproduces_scvi_tools_latent(cellbench):
    attrs = cellbench["attr_dict"]
    registry = attrs["registry_"]
    stats = {}
    for field in registry["field_registries"].values():
        stats.update(field["summary_stats"])
    assert (stats["n_vars"], stats["n_batch"], stats["n_labels"]) == (2000, 3, 5)
    assert (
        registry["setup_args"]["batch_key"] == "batch" and registry["setup_args"]["labels_key"] == "cell_line"
    )
    assert cellbench["var_names"].shape == (2000,) and isinstance(cellbench["var_names"][0], str)
    assert isinstance(attrs["history_"]["elbo_train"], pd.DataFrame)
    assert attrs["is_trained_"] is True
    assert init_params_from_scvi_tools(attrs["init_params_"])["non_kwargs"]["n_latent"] == 10

    module = SCVIModule(n_input=stats["n_vars"], n_batch=stats["n_batch"], n_labels=stats["n_labels"])
    module.load_state_dict(cellbench["model_state_dict"], strict=True)
    module.eval()
    adata = anndata.read_h5ad(CELLBENCH / "model" / "adata.h5ad")
    assert list(adata.var_names) == list(cellbench["var_names"])
    x = torch.as_tensor(
        adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X), dtype=torch.float32
    )
    with torch.no_grad():
        loc, scale = module.z_encoder(torch.log1p(x))
    expected_mean = np.load(CELLBENCH / "latent_mean.npy")
    expected_var = np.load(CELLBENCH / "latent_var.npy")
    mean, var = loc.numpy(), (scale**2).numpy()
    print(f"latent mean max abs err {np.abs(mean - expected_mean).max():.3g}, "
          f"latent var max rel err {(np.abs(var - expected_var) / expected_var).max():.3g}")
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected_var, rtol=1e-5, atol=1e-6)


def test_state_dict_names_round_trip_on_fixture(cellbench_raw):
    raw = cellbench_raw["model_state_dict"]
    ours = from_scvi_tools_state_dict(raw)
    assert "pyro_param_store" not in ours and ours["log_dispersion"] is raw["px_r"]
    back = to_scvi_tools_state_dict(ours)
    expected = OrderedDict((k, v) for k, v in raw.items() if k != "pyro_param_store")
    assert list(back) == list(expected)
    assert all(back[k] is expected[k] for k in expected)
    # our module has the same keys and shapes as the scvi-tools VAE
    module = SCVIModule(n_input=2000, n_batch=3, n_labels=5)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }


@pytest.mark.parametrize("options", [
    {},
    {"dispersion": "gene-cell", "n_layers": 2, "use_batch_norm": "none"},
    {"dispersion": "gene-batch", "use_observed_lib_size": False, "library_log_means": [[0.0, 1.0]],
     "library_log_vars": [[1.0, 1.0]], "encode_covariates": True, "n_continuous_cov": 1,
     "n_cats_per_cov": [3]},
])
def test_state_dict_names_round_trip_on_our_module(options):
    state = small_module(**options).state_dict()
    theirs = to_scvi_tools_state_dict(state)
    assert all(not k.startswith(("library_encoder", "decoder.hidden", "z_encoder.hidden")) for k in theirs)
    assert list(from_scvi_tools_state_dict(theirs)) == list(state)


def test_unknown_state_dict_keys_are_named():
    renamed = from_scvi_tools_state_dict(
        {"px_r": torch.zeros(2), "_embeddings_dict.batch.weight": torch.zeros(2, 5)}
    )
    assert list(renamed) == ["log_dispersion", "batch_embedding.weight"]
    with pytest.raises(ValueError, match=r"_embeddings_dict\.labels\.weight"):
        from_scvi_tools_state_dict({"_embeddings_dict.labels.weight": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="decoder.hidden.extra"):
        to_scvi_tools_state_dict({"decoder.hidden.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="pyro_param_store"):
        to_scvi_tools_state_dict({"pyro_param_store": {}})


def test_write_then_read_fixture_is_identical(cellbench, tmp_path):
    out = tmp_path / "exported"
    write_scvi_tools_model(out, cellbench["model_state_dict"], cellbench["var_names"], cellbench["attr_dict"])
    again = read_scvi_tools_model(out)
    assert_same(cellbench["model_state_dict"], again["model_state_dict"])
    assert_same(cellbench["var_names"], again["var_names"])
    for key in ("registry_", "init_params_", "is_trained_", "history_", "train_indices_",
                "validation_indices_", "test_indices_", "run_name_"):
        assert_same(cellbench["attr_dict"][key], again["attr_dict"][key], key)
    assert set(again["attr_dict"]) == set(cellbench["attr_dict"])
    with pytest.raises(ValueError, match="already exists"):
        write_scvi_tools_model(
            out, cellbench["model_state_dict"], cellbench["var_names"], cellbench["attr_dict"]
        )
    write_scvi_tools_model(out, cellbench["model_state_dict"], cellbench["var_names"], cellbench["attr_dict"],
                           prefix="p_", overwrite=True)
    assert (out / "p_model.pt").exists() and (out / "model.pt").exists()
    assert_same(load_registry(out, prefix="p_"), cellbench["attr_dict"]["registry_"])


def test_init_params_export_and_import():
    ours = {
        "non_kwargs": {"n_latent": 4},
        "kwargs": {"kwargs": {"var_activation": "softplus", "use_layer_norm": "both"}},
    }
    exported = init_params_to_scvi_tools(ours)
    assert exported["kwargs"]["kwargs"]["var_activation"] is F.softplus
    assert init_params_from_scvi_tools(exported) == ours
    exp = init_params_to_scvi_tools({"non_kwargs": {}, "kwargs": {"kwargs": {"var_activation": "exp"}}})
    assert exp == {"non_kwargs": {}, "kwargs": {"kwargs": {}}}
    with pytest.raises(ValueError, match="cannot export var_activation"):
        init_params_to_scvi_tools({"non_kwargs": {}, "kwargs": {"kwargs": {"var_activation": "relu"}}})
    legacy = {"n_hidden": 64, "use_cuda": True, "model_kwargs": {"var_activation": torch.nn.Softplus()}}
    assert init_params_from_scvi_tools(legacy) == {"non_kwargs": {"n_hidden": 64},
                                                   "kwargs": {"kwargs": {"var_activation": "softplus"}}}


def test_softplus_var_activation_survives_the_file(tmp_path):
    module = small_module(var_activation="softplus")
    attrs = small_attr_dict()
    attrs["init_params_"]["kwargs"]["kwargs"]["var_activation"] = "softplus"
    write_scvi_tools_model(tmp_path / "m", module.state_dict(), [f"g{i}" for i in range(20)], attrs)
    read = read_scvi_tools_model(tmp_path / "m")
    assert read["attr_dict"]["init_params_"]["kwargs"]["kwargs"]["var_activation"] is F.softplus
    # an nn.Softplus() saved by scvi-tools comes back as a module we build ourselves
    raw = torch.load(tmp_path / "m" / "model.pt", weights_only=False)
    raw["attr_dict"]["init_params_"]["kwargs"]["kwargs"]["var_activation"] = torch.nn.Softplus(beta=2.0)
    raw["attr_dict"]["registry_"]["field_registries"] = defaultdict(
        dict, raw["attr_dict"]["registry_"]["field_registries"]
    )
    torch.save(raw, tmp_path / "m" / "model.pt")
    activation = read_scvi_tools_model(tmp_path / "m")["attr_dict"]["init_params_"]["kwargs"]["kwargs"][
        "var_activation"
    ]
    assert isinstance(activation, torch.nn.Softplus) and activation.beta == 2.0


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("where", ["attr_dict", "registry", "state_dict"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    attrs = small_attr_dict()
    state = to_scvi_tools_state_dict(small_module().state_dict())
    payload = Payload(os.system, f"echo pwned > {marker}")
    if where == "attr_dict":
        attrs["evil_"] = payload
    elif where == "registry":
        attrs["registry_"]["setup_args"]["layer"] = payload
    else:
        state["pyro_param_store"] = {"params": {}, "constraints": {"x": payload}}
    (tmp_path / "m").mkdir()
    torch.save(
        {"model_state_dict": state, "var_names": np.array(["g"] * 20, dtype=object), "attr_dict": attrs},
        tmp_path / "m" / "model.pt",
    )
    with pytest.raises(ValueError, match=r"Refusing to load .*(posix|os)\.system"):
        read_scvi_tools_model(tmp_path / "m")
    with pytest.raises(ValueError, match="Refusing"):
        load_registry(tmp_path / "m")
    assert not marker.exists()


def test_eval_and_getattr_payloads_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    for name, payload in [
        ("eval", Payload(eval, f"open({str(marker)!r}, 'w').write('x')")),
        ("getattr", Payload(getattr, Payload(__import__, "os"), "system")),
        ("subprocess", Payload(__import__("subprocess").call, ["touch", str(marker)])),
    ]:
        target = tmp_path / name
        target.mkdir()
        attrs = small_attr_dict()
        attrs["x_"] = payload
        torch.save(
            {"model_state_dict": {}, "var_names": np.array([], dtype=object), "attr_dict": attrs},
            target / "model.pt",
        )
        with pytest.raises(ValueError, match="Refusing to load") as error:
            read_scvi_tools_model(target)
        assert {"eval": "eval", "getattr": "getattr", "subprocess": "subprocess"}[name] in str(error.value)
    assert not marker.exists()


class ForgedDType:
    """Pickles as a dtype whose state claims an object field with no object flags."""

    def __reduce__(self):
        return np.dtype, ("i8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)


class ArrayWithState:
    def __init__(self, dtype, data):
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), self.dtype, False, self.data)


@pytest.mark.parametrize("name, payload, refused", [
    # numpy.ndarray(shape, dtype('O'), buffer) would turn these bytes into object pointers
    ("ndarray_buffer", Payload(np.ndarray, (1,), np.dtype("O"), b"A" * 8), "numpy.ndarray"),
    # a structured dtype carrying an object field
    ("structured", np.zeros(1, dtype=[("a", "O")]), "numpy.dtype"),
    # a plain dtype whose BUILD state smuggles in an object field with forged flags
    ("forged_state", ArrayWithState(ForgedDType(), b"A" * 8), "structured numpy dtype"),
    # raw bytes for an object array
    ("object_bytes", ArrayWithState(np.dtype("O"), b"A" * 8), None),
])
def test_numpy_memory_corruption_vectors_are_refused(tmp_path, name, payload, refused):
    attrs = small_attr_dict()
    attrs["x_"] = payload
    (tmp_path / name).mkdir()
    torch.save({"model_state_dict": {}, "var_names": np.array([], dtype=object), "attr_dict": attrs},
               tmp_path / name / "model.pt")
    with pytest.raises(
        ValueError, match=f"Refusing to load .*{re.escape(refused)}" if refused else "not a readable"
    ):
        read_scvi_tools_model(tmp_path / name)


def test_arrays_come_back_as_plain_numpy(cellbench):
    attrs = cellbench["attr_dict"]
    assert type(attrs["train_indices_"]) is np.ndarray and attrs["train_indices_"].dtype == np.int64
    mapping = attrs["registry_"]["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    assert type(mapping) is np.ndarray and mapping.dtype == object
    frame = attrs["history_"]["elbo_train"]
    assert type(frame.index) is pd.Index and frame.index.name == "epoch"
    assert type(frame["elbo_train"].to_numpy()) is np.ndarray
    assert type(cellbench["var_names"]) is np.ndarray


def test_truncated_corrupt_and_missing_files(tmp_path):
    module = small_module()
    write_scvi_tools_model(
        tmp_path / "ok", module.state_dict(), [f"g{i}" for i in range(20)], small_attr_dict()
    )
    data = (tmp_path / "ok" / "model.pt").read_bytes()
    for name, content in [
        ("truncated", data[: len(data) // 2]),
        ("garbage", b"\x80\x02not a model" * 10),
        ("empty", b""),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pt").write_bytes(content)
        with pytest.raises(ValueError, match="not a readable model file"):
            read_scvi_tools_model(tmp_path / name)
    # a readable file that is not a model
    (tmp_path / "list").mkdir()
    torch.save([1, 2], tmp_path / "list" / "model.pt")
    with pytest.raises(ValueError, match="not a model file"):
        read_scvi_tools_model(tmp_path / "list")
    # missing file; missing file next to a legacy save
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="Failed to load model file"):
        read_scvi_tools_model(tmp_path / "none")
    torch.save(module.state_dict(), tmp_path / "none" / "model_params.pt")
    with pytest.raises(ValueError, match="convert_legacy_save"):
        read_scvi_tools_model(tmp_path / "none")
    with pytest.raises(ValueError, match="convert_legacy_save"):
        load_registry(tmp_path / "none")


# ------------------------------------------------------------------------------------------ legacy


def legacy_setup_dict(var_names) -> dict:
    """What scvi-tools 0.14's ``setup_anndata(batch_key="batch", categorical_covariate_keys=["donor"],
    continuous_covariate_keys=["pct_mito"])`` stored as ``scvi_setup_dict_`` (no labels key)."""
    return {
        "scvi_version": "0.14.6",
        "categorical_mappings": {
            "_scvi_batch": {"original_key": "batch", "mapping": np.array(["b1", "b2"], dtype=object)},
            "_scvi_labels": {"original_key": "_scvi_labels", "mapping": np.array([0])},
        },
        "data_registry": {
            "X": {"attr_name": "X", "attr_key": None},
            "batch_indices": {"attr_name": "obs", "attr_key": "_scvi_batch"},
            "local_l_mean": {"attr_name": "obs", "attr_key": "_scvi_local_l_mean"},
            "local_l_var": {"attr_name": "obs", "attr_key": "_scvi_local_l_var"},
            "labels": {"attr_name": "obs", "attr_key": "_scvi_labels"},
            "cat_covs": {"attr_name": "obsm", "attr_key": "_scvi_extra_categoricals"},
            "cont_covs": {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous"},
        },
        "summary_stats": {"n_batch": 2, "n_cells": 10, "n_vars": len(var_names), "n_labels": 1,
                          "n_proteins": 0, "n_continuous_covs": 1},
        "extra_categoricals": {"mappings": {"donor": np.array(["d1", "d2", "d3"], dtype=object)},
                               "keys": ["donor"], "n_cats_per_key": [3]},
        "extra_continuous_keys": np.array(["pct_mito"], dtype=object),
    }


def write_legacy_dir(
    path: Path, module: SCVIModule, var_names, attr_dict: dict, protocol: int = 4, prefix: str = ""
):
    path.mkdir(parents=True)
    torch.save(to_scvi_tools_state_dict(module.state_dict()), path / f"{prefix}model_params.pt")
    np.savetxt(path / f"{prefix}var_names.csv", np.asarray(var_names), fmt="%s")
    with open(path / f"{prefix}attr.pkl", "wb") as handle:
        pickle.dump(attr_dict, handle, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_convert_legacy_save(tmp_path, protocol):
    var_names = [f"gene_{i}" for i in range(20)]
    module = small_module(n_continuous_cov=1, n_cats_per_cov=[3])
    history = {"elbo_train": pd.DataFrame({"elbo_train": [10.0, 9.0]}, index=pd.Index([0, 1], name="epoch"))}
    attr = {
        "scvi_setup_dict_": legacy_setup_dict(var_names),
        "init_params_": {"n_hidden": 16, "n_latent": 4, "n_layers": 1, "dropout_rate": 0.1,
                         "dispersion": "gene", "gene_likelihood": "zinb", "latent_distribution": "normal",
                         "use_cuda": False,
                         "model_kwargs": {"use_layer_norm": "none"}},
        "is_trained_": True,
        "history_": history,
        "train_indices_": np.arange(8),
        "validation_indices_": np.array([8, 9]),
        "test_indices_": np.array([], dtype=np.int64),
    }
    write_legacy_dir(tmp_path / "legacy", module, var_names, attr, protocol=protocol, prefix="old_")
    with pytest.raises(ValueError, match="convert_legacy_save"):
        read_scvi_tools_model(tmp_path / "legacy", prefix="old_")

    convert_legacy_save(tmp_path / "legacy", tmp_path / "new", prefix="old_")
    with pytest.raises(ValueError, match="already exists"):
        convert_legacy_save(tmp_path / "legacy", tmp_path / "new", prefix="old_")
    convert_legacy_save(tmp_path / "legacy", tmp_path / "new", prefix="old_", overwrite=True)

    read = read_scvi_tools_model(tmp_path / "new", prefix="old_")
    assert list(read["var_names"]) == var_names
    assert_same(dict(read["model_state_dict"]), dict(module.state_dict()))
    attrs = read["attr_dict"]
    assert "scvi_setup_dict_" not in attrs
    registry = attrs["registry_"]
    assert registry["setup_args"] == {"layer": None, "batch_key": "batch", "labels_key": None,
                                      "size_factor_key": None, "categorical_covariate_keys": ["donor"],
                                      "continuous_covariate_keys": ["pct_mito"]}
    fields = registry["field_registries"]
    assert list(fields) == [
        "X", "batch", "labels", "size_factor", "extra_categorical_covs", "extra_continuous_covs"
    ]
    assert fields["X"]["summary_stats"] == {"n_vars": 20, "n_cells": 10}
    assert list(fields["X"]["state_registry"]["column_names"]) == var_names
    assert list(fields["batch"]["state_registry"]["categorical_mapping"]) == ["b1", "b2"]
    assert fields["batch"]["summary_stats"] == {"n_batch": 2}
    assert fields["labels"]["state_registry"]["original_key"] == "_scvi_labels"
    assert fields["extra_categorical_covs"]["data_registry"]["attr_key"] == "_scvi_extra_categorical_covs"
    assert fields["extra_categorical_covs"]["state_registry"]["field_keys"] == ["donor"]
    assert fields["extra_categorical_covs"]["state_registry"]["n_cats_per_key"] == [3]
    assert fields["extra_categorical_covs"]["summary_stats"] == {"n_extra_categorical_covs": 1}
    assert list(fields["extra_continuous_covs"]["state_registry"]["columns"]) == ["pct_mito"]
    assert fields["extra_continuous_covs"]["summary_stats"] == {"n_extra_continuous_covs": 1}
    assert fields["size_factor"] == {"data_registry": {}, "state_registry": {}, "summary_stats": {}}
    assert attrs["init_params_"] == {
        "non_kwargs": {"n_hidden": 16, "n_latent": 4, "n_layers": 1, "dropout_rate": 0.1,
                       "dispersion": "gene", "gene_likelihood": "zinb", "latent_distribution": "normal"},
        "kwargs": {"kwargs": {"use_layer_norm": "none"}},
    }
    pd.testing.assert_frame_equal(attrs["history_"]["elbo_train"], history["elbo_train"])
    assert_same(attrs["train_indices_"], np.arange(8))
    # the weights load strictly into a module built from the converted registry
    stats = {}
    for field in fields.values():
        stats.update(field["summary_stats"])
    rebuilt = SCVIModule(n_input=stats["n_vars"], n_batch=stats["n_batch"], n_labels=stats["n_labels"],
                         n_hidden=16, n_latent=4, n_continuous_cov=stats["n_extra_continuous_covs"],
                         n_cats_per_cov=fields["extra_categorical_covs"]["state_registry"]["n_cats_per_key"])
    rebuilt.load_state_dict(read["model_state_dict"], strict=True)
    assert load_registry(tmp_path / "new", prefix="old_")["setup_args"]["batch_key"] == "batch"


def test_legacy_attr_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    var_names = [f"g{i}" for i in range(20)]
    attr = {"scvi_setup_dict_": legacy_setup_dict(var_names), "evil_": Payload(os.system, f"touch {marker}")}
    write_legacy_dir(tmp_path / "legacy", small_module(), var_names, attr)
    with pytest.raises(ValueError, match=r"Refusing to load .*attr\.pkl.*(posix|os)\.system"):
        convert_legacy_save(tmp_path / "legacy", tmp_path / "out")
    # a BUILD on an allowed function object (would mutate it for the whole process) is refused too
    sneaky = b"\x80\x04cpandas.core.indexes.base\n_new_Index\nN}\x8c\x0c__defaults__K\x01\x85s\x86b."
    (tmp_path / "legacy" / "attr.pkl").write_bytes(sneaky)
    from pandas.core.indexes.base import _new_Index
    with pytest.raises(ValueError, match="Refusing"):
        convert_legacy_save(tmp_path / "legacy", tmp_path / "out2")
    assert _new_Index.__defaults__ is None
    (tmp_path / "legacy" / "attr.pkl").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(ValueError, match="not a readable pickle"):
        convert_legacy_save(tmp_path / "legacy", tmp_path / "out3")
    assert not marker.exists()


def test_registry_from_legacy_setup_dict_without_batch_key():
    setup = legacy_setup_dict(["a", "b"])
    setup["categorical_mappings"]["_scvi_batch"] = {"original_key": "_scvi_batch", "mapping": np.array([0])}
    for key in ("cat_covs", "cont_covs"):
        del setup["data_registry"][key]
    registry = registry_from_legacy_setup_dict(setup, var_names=["a", "b"])
    assert registry["setup_args"]["batch_key"] is None
    assert registry["setup_args"]["categorical_covariate_keys"] is None
    assert registry["field_registries"]["extra_categorical_covs"]["summary_stats"] == {
        "n_extra_categorical_covs": 0
    }


# ------------------------------------------------------------------------------------------ registries


def test_load_registry_and_view_setup_args_on_fixture(cellbench, capsys):
    registry = load_registry(CELLBENCH / "model")
    assert_same(registry, cellbench["attr_dict"]["registry_"])
    view_setup_args(CELLBENCH / "model")
    out = capsys.readouterr().out
    assert out.startswith("Setup via `SCVI.setup_anndata` with arguments:\n")
    assert "'labels_key': 'cell_line'" in out


def test_load_registry_view_setup_args_and_export_of_our_save(tmp_path, capsys):
    adata = synthetic_iid(batch_size=40, n_genes=30, n_batches=2, n_labels=2, seed=3)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=3, var_activation="softplus")
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(tmp_path / "ours")

    registry = load_registry(tmp_path / "ours")
    assert registry["setup_args"]["batch_key"] == "batch"
    assert isinstance(
        registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"], np.ndarray
    )
    view_setup_args(tmp_path / "ours")
    out = capsys.readouterr().out
    assert (
        out.startswith("Setup via `SCVI.setup_anndata` with arguments:\n") and "'batch_key': 'batch'" in out
    )
    with pytest.raises(ValueError, match="written by pyro-scvi"):
        read_scvi_tools_model(tmp_path / "ours")

    # our save -> scvi-tools layout -> back: same weights, registry and history
    payload = read_model_dir(tmp_path / "ours")
    assert payload["source"] == "pyro-scvi"
    attrs = payload["attr_dict"]
    write_scvi_tools_model(tmp_path / "exported", payload["model_state_dict"], payload["var_names"], attrs)
    back = read_scvi_tools_model(tmp_path / "exported")
    assert_same(dict(back["model_state_dict"]), dict(payload["model_state_dict"]))
    assert_same(back["attr_dict"]["registry_"], attrs["registry_"])
    assert back["attr_dict"]["init_params_"]["kwargs"]["kwargs"]["var_activation"] is F.softplus
    assert init_params_from_scvi_tools(back["attr_dict"]["init_params_"]) == attrs["init_params_"]
    pd.testing.assert_frame_equal(back["attr_dict"]["history_"]["elbo_train"], model.history["elbo_train"],
                                  check_dtype=False)
    assert_same(back["attr_dict"]["train_indices_"], np.asarray(model.train_indices, dtype=np.int64))
    assert_same(load_registry(tmp_path / "exported"), attrs["registry_"])


def test_load_registry_refuses_pre_015_attr_dict(tmp_path):
    (tmp_path / "m").mkdir()
    attrs = {"scvi_setup_dict_": legacy_setup_dict(["a"]), "init_params_": {}}
    torch.save({"model_state_dict": {}, "var_names": np.array(["a"], dtype=object), "attr_dict": attrs},
               tmp_path / "m" / "model.pt")
    with pytest.raises(ValueError, match="convert_legacy_save"):
        load_registry(tmp_path / "m")


def test_allow_list_is_explicit_and_has_no_code_runners():
    forbidden = {"builtins.eval", "builtins.exec", "builtins.getattr", "builtins.setattr",
                 "builtins.__import__", "builtins.compile", "builtins.open", "os.system", "posix.system",
                 "subprocess.Popen",
                 "copyreg._reconstructor", "pickle.loads", "torch.load", "numpy.load", "pandas.read_pickle",
                 "functools.partial", "operator.attrgetter", "operator.methodcaller"}
    assert not forbidden & set(ALLOWED_GLOBALS)
    assert all(name.split(".")[0] in {"numpy", "pandas", "builtins", "collections", "torch", "_codecs"}
               for name in ALLOWED_GLOBALS)
    assert ALLOWED_GLOBALS["collections.defaultdict"](dict) == {}


class _TypedRegistry(Mapping):
    """Stand-in for a typed registry: a read-only Mapping whose ``to_dict()`` is the form to save.

    Its values are objects no file format stores, so only ``to_dict()`` gives a savable registry.
    """

    def __init__(self, registry):
        self._registry = registry

    def to_dict(self):
        return copy.deepcopy(self._registry)

    def __getitem__(self, key):
        return object()

    def __iter__(self):
        return iter(self._registry)

    def __len__(self):
        return len(self._registry)


def _small_registry():
    batch = {"categorical_mapping": np.array(["a", "b"], dtype=object), "original_key": "batch"}
    return {"model_name": "SCVI", "setup_args": {"batch_key": "batch"},
            "field_registries": {"batch": {"state_registry": batch}}}


def test_to_safe_stores_a_typed_registry_as_its_dict():
    registry = _small_registry()
    assert_same(from_safe(to_safe(_TypedRegistry(registry))), registry)
    assert_same(from_safe(to_safe({"registry_": _TypedRegistry(registry)})), {"registry_": registry})
    with pytest.raises(TypeError, match="DataFrame"):  # DataFrames have to_dict() but are not stored that way
        to_safe(pd.DataFrame({"a": [1]}))


def test_scvi_tools_writer_accepts_a_typed_registry(tmp_path):
    registry = _small_registry()
    init_params = {"non_kwargs": {}, "kwargs": {"kwargs": {}}}
    attrs = {"registry_": _TypedRegistry(registry), "init_params_": init_params}
    write_scvi_tools_model(tmp_path / "m", {}, ["g0"], attrs)
    written = load_registry(tmp_path / "m")
    expected = {**registry, "scvi_version": SCVI_TOOLS_VERSION, "setup_method_name": "setup_anndata"}
    assert_same(written, expected)
