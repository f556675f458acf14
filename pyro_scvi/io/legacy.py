"""scvi-tools saves from before 0.15: ``model_params.pt``, ``var_names.csv`` and ``attr.pkl``.

:func:`convert_legacy_save` reads them with the safe loaders of :mod:`pyro_scvi.io.safe_unpickle`
and rewrites them as an scvi-tools 1.x ``model.pt``; :func:`registry_from_legacy_setup_dict`
turns the old ``scvi_setup_dict_`` into a registry.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .model_file import atomic_torch_save, model_file_path, prepare_target
from .safe_unpickle import safe_torch_load, safe_unpickle
from .scvi_tools import init_params_from_scvi_tools

__all__ = ["convert_legacy_save", "registry_from_legacy_setup_dict"]

_LEGACY_FIELDS = {"X": "X", "batch_indices": "batch", "labels": "labels",
                  "cat_covs": "extra_categorical_covs", "cont_covs": "extra_continuous_covs"}


def _empty_field(stats: dict | None = None) -> dict:
    return {"data_registry": {}, "state_registry": {}, "summary_stats": dict(stats or {})}


def _x_field(attr_name, attr_key, stats: Mapping, var_names) -> tuple[dict, dict]:
    layer = attr_key if attr_name == "layers" else None
    state = {"n_obs": int(stats["n_cells"])} if "n_cells" in stats else {}
    state["n_vars"] = int(stats.get("n_vars", len(var_names) if var_names is not None else 0))
    if var_names is not None:
        state["column_names"] = np.asarray(var_names, dtype=object)
    summary = {"n_vars": state["n_vars"]}
    if "n_obs" in state:
        summary["n_cells"] = state["n_obs"]
    field = {"data_registry": {"attr_name": attr_name, "attr_key": layer}, "state_registry": state,
             "summary_stats": summary}
    return {"layer": layer}, field


def _categorical_field(field: str, mapping: Mapping, stats: Mapping) -> tuple[dict, dict]:
    """The ``batch`` or ``labels`` field; without a legacy mapping, the one-category default."""
    original_key = mapping.get("original_key", f"_scvi_{field}")
    categories = np.asarray(mapping.get("mapping", np.zeros(1, dtype=np.int64)))
    count_key = "n_batch" if field == "batch" else "n_labels"
    entry = {
        "data_registry": {"attr_name": "obs", "attr_key": f"_scvi_{field}"},
        "state_registry": {"categorical_mapping": categories, "original_key": original_key},
        "summary_stats": {count_key: int(stats.get(count_key, len(categories)))},
    }
    return {f"{field}_key": None if original_key == f"_scvi_{field}" else original_key}, entry


def _extra_categorical_field(setup_dict: Mapping) -> tuple[dict, dict]:
    extra = copy.deepcopy(dict(setup_dict.get("extra_categoricals", {})))
    keys = list(extra.pop("keys", []))
    entry = {
        "data_registry": {"attr_name": "obsm", "attr_key": "_scvi_extra_categorical_covs"},
        "state_registry": {"mappings": dict(extra.get("mappings", {})), "field_keys": keys,
                           "n_cats_per_key": [int(n) for n in extra.get("n_cats_per_key", [])]},
        "summary_stats": {"n_extra_categorical_covs": len(keys)},
    }
    return {"categorical_covariate_keys": keys}, entry


def _extra_continuous_field(setup_dict: Mapping) -> tuple[dict, dict]:
    columns = np.asarray(setup_dict.get("extra_continuous_keys", []), dtype=object)
    entry = {
        "data_registry": {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous_covs"},
        "state_registry": {"columns": columns},
        "summary_stats": {"n_extra_continuous_covs": int(columns.shape[0])},
    }
    return {"continuous_covariate_keys": [str(c) for c in columns]}, entry


def registry_from_legacy_setup_dict(setup_dict: Mapping, var_names=None, model_name: str = "SCVI") -> dict:
    """Turn a pre-0.15 ``scvi_setup_dict_`` into a registry in the current layout.

    Legacy keys map as ``X -> X``, ``batch_indices -> batch``, ``labels -> labels``,
    ``cat_covs -> extra_categorical_covs`` (``keys`` becomes ``field_keys``),
    ``cont_covs -> extra_continuous_covs``; others (``local_l_mean``, ...) are dropped. Fields the
    legacy dict lacks are filled in empty, as a current setup would register them, and setup
    arguments are inferred. A batch/labels field whose original key is the generated
    ``_scvi_batch``/``_scvi_labels`` column gets ``batch_key``/``labels_key`` ``None``.
    """
    mappings = setup_dict.get("categorical_mappings", {})
    stats = setup_dict.get("summary_stats", {})
    setup_args = {"layer": None, "batch_key": None, "labels_key": None, "size_factor_key": None,
                  "categorical_covariate_keys": None, "continuous_covariate_keys": None}
    fields = {"X": None, "batch": None, "labels": None, "size_factor": _empty_field(),
              "extra_categorical_covs": _empty_field({"n_extra_categorical_covs": 0}),
              "extra_continuous_covs": _empty_field({"n_extra_continuous_covs": 0})}
    for legacy_key, entry in setup_dict.get("data_registry", {}).items():
        field = _LEGACY_FIELDS.get(legacy_key)
        if field is None:
            continue
        attr_name, attr_key = entry.get("attr_name"), entry.get("attr_key")
        if field == "X":
            args, fields[field] = _x_field(attr_name, attr_key, stats, var_names)
        elif field in ("batch", "labels"):
            args, fields[field] = _categorical_field(field, mappings.get(attr_key, {}), stats)
        elif field == "extra_categorical_covs":
            args, fields[field] = _extra_categorical_field(setup_dict)
        else:
            args, fields[field] = _extra_continuous_field(setup_dict)
        setup_args.update(args)
    if fields["X"] is None:
        raise ValueError("The legacy setup dict has no 'X' entry in its data_registry.")
    for field in ("batch", "labels"):
        if fields[field] is None:
            fields[field] = _categorical_field(field, {}, {})[1]
    return {
        "scvi_version": str(setup_dict.get("scvi_version", "0.14")),
        "model_name": model_name,
        "setup_method_name": "setup_anndata",
        "setup_args": setup_args,
        "field_registries": fields,
    }


def _read_legacy_var_names(path: Path) -> np.ndarray:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"Legacy save is missing {path}.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read {path}: {error}") from None
    return np.asarray([line.strip() for line in lines if line.strip()], dtype=object)


def convert_legacy_save(dir_path, output_dir_path, overwrite: bool = False,
                        prefix: str | None = None) -> None:
    """Convert a pre-0.15 scvi-tools save to the current scvi-tools layout.

    Reads ``<prefix>model_params.pt`` (bare state dict, ``weights_only=True``),
    ``<prefix>var_names.csv`` (one name per line) and ``<prefix>attr.pkl`` (restricted unpickler,
    same allow-list), replaces ``scvi_setup_dict_`` by ``registry_``
    (:func:`registry_from_legacy_setup_dict`), rewrites ``init_params_`` in the 1.x layout and
    writes ``<output_dir_path>/<prefix>model.pt`` (state dict unchanged, scvi-tools names).
    ``output_dir_path`` must not exist unless ``overwrite=True``.
    """
    source = Path(dir_path)
    file_prefix = prefix or ""
    params_path = source / f"{file_prefix}model_params.pt"
    if not params_path.is_file():
        raise ValueError(f"{params_path} not found: {dir_path} is not a legacy (< 0.15) scvi-tools save.")
    state_dict = safe_torch_load(params_path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{params_path} is not a state dict of tensors.")
    var_names = _read_legacy_var_names(source / f"{file_prefix}var_names.csv")
    attr_path = source / f"{file_prefix}attr.pkl"
    if not attr_path.is_file():
        raise ValueError(f"Legacy save is missing {attr_path}.")
    attr_dict = safe_unpickle(attr_path)
    if not isinstance(attr_dict, dict):
        raise ValueError(f"{attr_path} does not hold an attribute dict.")
    if "scvi_setup_dict_" in attr_dict:
        attr_dict["registry_"] = registry_from_legacy_setup_dict(attr_dict.pop("scvi_setup_dict_"), var_names)
    if "init_params_" in attr_dict:
        init = init_params_from_scvi_tools(attr_dict["init_params_"])
        kwargs = init["kwargs"]["kwargs"]
        if kwargs.get("var_activation") == "exp":
            kwargs.pop("var_activation")
        elif kwargs.get("var_activation") == "softplus":
            kwargs["var_activation"] = F.softplus
        attr_dict["init_params_"] = init
    target = prepare_target(output_dir_path, overwrite)
    payload = {"model_state_dict": OrderedDict(state_dict), "var_names": var_names, "attr_dict": attr_dict}
    atomic_torch_save(payload, model_file_path(target, prefix))

