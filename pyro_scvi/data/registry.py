"""Registering an AnnData for scVI: which matrix holds the counts and how covariates are encoded.

:func:`setup_registry` checks an AnnData, writes integer codes for the categorical covariates
into it (``obs["_scvi_batch"]``, ``obs["_scvi_labels"]``, ``obsm["_scvi_extra_categorical_covs"]``)
and returns a *registry*: a plain dict laid out exactly like the one scvi-tools saves with a model
(``attr_dict["registry_"]``), so models can be exchanged in both directions.

Layout of the registry::

    {"scvi_version", "pyro_scvi_version", "model_name", "setup_method_name", "setup_args",
     "field_registries": {field: {"data_registry", "state_registry", "summary_stats"}},
     "_scvi_uuid"}

With ``source_registry`` the category mappings of an earlier registry are imposed on a new
AnnData (scvi-tools' "transfer"), optionally extended by categories the source never saw.
"""

from __future__ import annotations

import importlib.metadata
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import backed as _backed

__all__ = [
    "REGISTRY_KEYS",
    "SCVI_TOOLS_VERSION",
    "__version__",
    "setup_registry",
    "get_from_registry",
    "summary_stats",
    "library_size_prior",
    "format_registry",
    "validate_registered",
]

try:
    __version__ = importlib.metadata.version("pyro-scvi")
except importlib.metadata.PackageNotFoundError:
    __version__ = "0.1.0"

#: The scvi-tools version written into registries, so that scvi-tools reads them as its own.
SCVI_TOOLS_VERSION = "1.4.2"


@dataclass(frozen=True)
class RegistryKeys:
    """Names of the registered fields (scvi-tools' ``REGISTRY_KEYS``)."""

    X: str = "X"
    BATCH: str = "batch"
    LABELS: str = "labels"
    SIZE_FACTOR: str = "size_factor"
    CAT_COVS: str = "extra_categorical_covs"
    CONT_COVS: str = "extra_continuous_covs"


REGISTRY_KEYS = RegistryKeys()

_SETUP_ARG_NAMES = (
    "layer",
    "batch_key",
    "labels_key",
    "size_factor_key",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
)
# Where the codes of each categorical field are written, and the name of its summary statistic.
_CATEGORICAL_FIELDS = {
    REGISTRY_KEYS.BATCH: ("batch_key", "_scvi_batch", "n_batch"),
    REGISTRY_KEYS.LABELS: ("labels_key", "_scvi_labels", "n_labels"),
}
_CAT_COVS_COLUMN = "_scvi_extra_categorical_covs"
_CONT_COVS_COLUMN = "_scvi_extra_continuous_covs"
_UUID_KEY = "_scvi_uuid"
#: where a minified AnnData (``SCVI.minify_adata``) keeps its type, posterior and library
MINIFY_TYPE_KEY = "_scvi_adata_minify_type"
MINIFIED_FIELDS = {
    "latent_qzm": ("obsm", "scvi_latent_qzm"),
    "latent_qzv": ("obsm", "scvi_latent_qzv"),
    "observed_lib_size": ("obs", "observed_lib_size"),
    "minify_type": ("uns", MINIFY_TYPE_KEY),
}
_MANAGER_UUID_KEY = "_scvi_manager_uuid"
# Rows of a dense matrix checked at once, so temporaries stay near 2**24 elements.
_CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def setup_registry(
    adata,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    *,
    model_name: str = "SCVI",
    source_registry: dict | None = None,
    extend_categories: bool = False,
    check_var_names: bool = False,
) -> dict:
    """Check ``adata``, write the covariate codes into it and return its registry.

    With ``source_registry`` the setup arguments and category mappings come from that registry
    (explicit arguments must then be ``None`` or equal to the source's); with
    ``extend_categories=True`` categories unseen by the source are appended to its mappings.
    With ``check_var_names=True`` (what model methods use for a new AnnData) the genes must also be
    the source's, in the source's order (``ValueError`` otherwise); by default only their number is
    checked, as in scvi-tools. Duplicated cell or gene names and cells without counts give a
    warning. Nothing is written into ``adata`` unless every check passes.
    """
    if adata.is_view:
        raise ValueError("Please run `adata = adata.copy()`")
    given = dict(
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys,
    )
    if source_registry is None:
        if extend_categories:
            raise TypeError("`extend_categories` can only be used together with `source_registry`.")
        setup_args = given
        source_fields: dict = {}
    else:
        setup_args = _setup_args_from_source(source_registry, given)
        source_fields = source_registry["field_registries"]

    writes: list[tuple[str, str, Any]] = []
    fields = defaultdict(dict)
    fields[REGISTRY_KEYS.X] = _register_layer(
        adata, setup_args["layer"], source_fields.get(REGISTRY_KEYS.X), writes, check_var_names
    )
    for field_name in (REGISTRY_KEYS.BATCH, REGISTRY_KEYS.LABELS):
        arg_name = _CATEGORICAL_FIELDS[field_name][0]
        fields[field_name] = _register_categorical(
            adata, field_name, setup_args[arg_name], source_fields.get(field_name), extend_categories, writes
        )
    fields[REGISTRY_KEYS.SIZE_FACTOR] = _register_size_factor(adata, setup_args["size_factor_key"])
    fields[REGISTRY_KEYS.CAT_COVS] = _register_categorical_covariates(
        adata,
        _as_key_list(setup_args["categorical_covariate_keys"]),
        source_fields.get(REGISTRY_KEYS.CAT_COVS),
        extend_categories,
        writes,
    )
    fields[REGISTRY_KEYS.CONT_COVS] = _register_continuous_covariates(
        adata, _as_key_list(setup_args["continuous_covariate_keys"]), writes
    )

    if MINIFY_TYPE_KEY in adata.uns:
        for name, (attr_name, key) in MINIFIED_FIELDS.items():
            if key not in getattr(adata, attr_name):
                raise ValueError(f"This AnnData is minified but {_location(attr_name, key)} is missing.")
            fields[name] = _field({"attr_name": attr_name, "attr_key": key}, {}, {})

    for attr_name, key, value in writes:
        _write(adata, attr_name, key, value)
    if _UUID_KEY not in adata.uns:
        adata.uns[_UUID_KEY] = str(uuid.uuid4())
    adata.uns[_MANAGER_UUID_KEY] = str(uuid.uuid4())

    return {
        "scvi_version": SCVI_TOOLS_VERSION,
        "pyro_scvi_version": __version__,
        "model_name": model_name,
        "setup_method_name": "setup_anndata",
        "setup_args": dict(setup_args),
        "field_registries": fields,
        "_scvi_uuid": adata.uns[_UUID_KEY],
    }


def get_from_registry(adata, registry: dict, key: str):
    """The registered data of field ``key`` of ``adata`` (``None`` for an empty optional field).

    ``"X"`` gives the matrix itself (not a copy); ``"batch"``/``"labels"`` int64 codes ``(n, 1)``;
    ``"size_factor"`` float32 ``(n, 1)``; ``"extra_categorical_covs"`` int64 ``(n, m)``;
    ``"extra_continuous_covs"`` float32 ``(n, C)``. Other registered fields come back as stored.
    """
    fields = registry["field_registries"]
    if key not in fields:
        raise KeyError(f"{key!r} is not a registered field; registered fields: {list(fields)}.")
    data_registry = fields[key]["data_registry"]
    if not data_registry:
        return None
    data = _read(adata, data_registry["attr_name"], data_registry["attr_key"])
    if key in (REGISTRY_KEYS.BATCH, REGISTRY_KEYS.LABELS):
        return np.asarray(data, dtype=np.int64).reshape(-1, 1)
    if key == REGISTRY_KEYS.SIZE_FACTOR:
        return np.asarray(data, dtype=np.float32).reshape(-1, 1)
    if key == REGISTRY_KEYS.CAT_COVS:
        return np.asarray(data, dtype=np.int64)
    if key == REGISTRY_KEYS.CONT_COVS:
        return np.asarray(data, dtype=np.float32)
    return data


def summary_stats(registry: dict) -> dict:
    """All fields' summary statistics merged into one dict (``n_vars``, ``n_cells``, ``n_batch``, ...)."""
    merged: dict = {}
    for field in registry["field_registries"].values():
        merged.update(field.get("summary_stats", {}))
    return merged


def library_size_prior(adata, registry: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and (population) variance of the log total counts, each float32 ``(1, n_batch)``.

    Cells without counts enter with log total 0 (with a warning); batches without cells keep mean 0
    and variance 1. All cells are used.
    """
    n_batch = summary_stats(registry)["n_batch"]
    totals = _row_totals(get_from_registry(adata, registry, REGISTRY_KEYS.X))
    empty = totals <= 0
    if empty.any():
        warnings.warn(
            "This dataset has some empty cells, this might fail inference."
            "Data should be filtered with `scanpy.pp.filter_cells()`",
            UserWarning,
            stacklevel=2,
        )
    log_totals = np.log(np.where(empty, 1.0, totals))
    codes = get_from_registry(adata, registry, REGISTRY_KEYS.BATCH).ravel()

    n_cells = np.bincount(codes, minlength=n_batch).astype(np.float64)
    present = n_cells > 0
    means = np.zeros(n_batch)
    means[present] = np.bincount(codes, weights=log_totals, minlength=n_batch)[present] / n_cells[present]
    variances = np.ones(n_batch)
    squared = (log_totals - means[codes]) ** 2
    variances[present] = np.bincount(codes, weights=squared, minlength=n_batch)[present] / n_cells[present]
    return means.astype(np.float32).reshape(1, -1), variances.astype(np.float32).reshape(1, -1)


def format_registry(registry: dict, hide_state_registries: bool = False) -> str:
    """A plain-text summary of a registry: setup arguments, summary statistics, where each field lives
    and (unless hidden) the category → code tables."""
    fields = registry["field_registries"]
    version = f"Anndata setup with scvi-tools version {registry.get('scvi_version')}"
    if "pyro_scvi_version" in registry:
        version += f" (pyro-scvi {registry['pyro_scvi_version']})"
    parts = [version + "."]

    model_name = registry.get("model_name", "SCVI")
    method = registry.get("setup_method_name", "setup_anndata")
    arg_lines = [f"    {name}: {value!r}" for name, value in registry.get("setup_args", {}).items()]
    parts.append("\n".join([f"Setup via `{model_name}.{method}` with arguments:", *arg_lines]))

    stats = summary_stats(registry)
    parts.append(_text_table("Summary Statistics", ["Summary Stat Key", "Value"], list(stats.items())))

    locations = [
        (name, _location(field["data_registry"]["attr_name"], field["data_registry"]["attr_key"]))
        for name, field in fields.items()
        if field["data_registry"]
    ]
    parts.append(_text_table("Data Registry", ["Registry Key", "scvi-tools Location"], locations))

    if not hide_state_registries:
        for name, field in fields.items():
            table = _state_table(name, field["state_registry"])
            if table:
                parts.append(table)
    return "\n\n".join(parts) + "\n"


def validate_registered(adata, registry: dict) -> None:
    """Raise ``ValueError`` when ``adata`` no longer fits ``registry`` (shape, layer or code columns)."""
    fields = registry["field_registries"]
    x_data = fields[REGISTRY_KEYS.X]["data_registry"]
    x_state = fields[REGISTRY_KEYS.X]["state_registry"]
    if x_data["attr_name"] == "layers" and x_data["attr_key"] not in adata.layers:
        raise ValueError(f"{x_data['attr_key']} is not a valid key in adata.layers.")
    if adata.n_vars != x_state["n_vars"]:
        raise ValueError(
            f"The AnnData has {adata.n_vars} genes (n_vars) but was registered with {x_state['n_vars']}. "
            "Subset it to the registered genes or set it up again."
        )
    if adata.n_obs != x_state["n_obs"]:
        raise ValueError(
            f"The AnnData has {adata.n_obs} cells (n_obs) but was registered with {x_state['n_obs']}. "
            "Set up this AnnData again (or transfer the registry to it)."
        )
    for name, field in fields.items():
        data_registry = field["data_registry"]
        if not data_registry or name == REGISTRY_KEYS.X:
            continue
        attr_name, attr_key = data_registry["attr_name"], data_registry["attr_key"]
        container = getattr(adata, attr_name)
        if attr_key not in container:
            raise ValueError(
                f"{_location(attr_name, attr_key)} is missing: the AnnData was not set up with this registry. "
                "Run setup_anndata (or transfer the registry) again."
            )
        _check_codes_in_range(adata, name, field)


# --------------------------------------------------------------------------------------------
# Setup arguments
# --------------------------------------------------------------------------------------------


def _setup_args_from_source(source_registry: dict, given: dict) -> dict:
    """The source registry's setup arguments; explicit arguments may only repeat them."""
    source_args = source_registry["setup_args"]
    for name, value in given.items():
        if value is not None and _as_key_list(value) != _as_key_list(source_args.get(name)):
            raise ValueError(
                f"`{name}={value!r}` conflicts with the source registry's `{name}={source_args.get(name)!r}`. "
                "With `source_registry` the setup arguments come from the source; leave them unset."
            )
    return {name: source_args.get(name) for name in _SETUP_ARG_NAMES}


def _as_key_list(keys) -> list | None:
    """``None``, one key or several keys → ``None`` or a list of keys."""
    if keys is None:
        return None
    if isinstance(keys, str):
        return [keys]
    return list(keys)


# --------------------------------------------------------------------------------------------
# Fields. Each builder checks its inputs, appends (attr_name, key, value) writes for setup_registry
# to apply once every check has passed, and returns the field's registry entry.
# --------------------------------------------------------------------------------------------


def _field(data_registry: dict, state_registry: dict, stats: dict) -> dict:
    return {"data_registry": data_registry, "state_registry": state_registry, "summary_stats": stats}


def _register_layer(adata, layer: str | None, source: dict | None, writes: list, check_var_names: bool = False) -> dict:
    """The count matrix: ``adata.X`` or ``adata.layers[layer]``."""
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"{layer} is not a valid key in adata.layers.")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise ValueError("adata.X is empty (None); pass the layer holding the raw counts via `layer=`.")
    if source is not None:
        expected = source["state_registry"]["n_vars"]
        if adata.n_vars != expected:
            raise ValueError(
                "Number of vars in `adata_target` not the same as source. "
                f"Expected: {expected} Received: {adata.n_vars}"
            )
        if check_var_names:
            _check_same_var_names(adata, source["state_registry"].get("column_names"))
    _check_counts(matrix, layer)
    _warn_if_not_csr(matrix, layer)
    _warn_duplicated_names(adata)
    if MINIFY_TYPE_KEY not in adata.uns:  # a minified AnnData has no counts left
        _warn_empty_cells(matrix, layer)
    if isinstance(matrix, np.ndarray) and not matrix.flags.c_contiguous:
        writes.append(("X" if layer is None else "layers", layer, np.ascontiguousarray(matrix)))
    return _field(
        {"attr_name": "X" if layer is None else "layers", "attr_key": layer},
        {"n_obs": adata.n_obs, "n_vars": adata.n_vars, "column_names": np.asarray(adata.var_names, dtype=object)},
        {"n_vars": adata.n_vars, "n_cells": adata.n_obs},
    )


def _register_categorical(
    adata, field_name: str, key: str | None, source: dict | None, extend: bool, writes: list
) -> dict:
    """``batch`` or ``labels``: codes of ``obs[key]`` (a constant 0 when ``key`` is None)."""
    _, column, stat_name = _CATEGORICAL_FIELDS[field_name]
    if source is not None:
        key = source["state_registry"]["original_key"]
    if key is None or key == column:
        key = column
        values = pd.Series(np.zeros(adata.n_obs, dtype=np.int64), index=adata.obs_names)
    else:
        values = _obs_column(adata, key)

    if source is None:
        mapping = None
    else:
        mapping, unseen = _transfer_mapping(values, source["state_registry"]["categorical_mapping"], extend)
        if len(unseen) and not extend:
            raise ValueError(
                f"Category {unseen[0]} not found in source registry. "
                "Cannot transfer setup without `extend_categories = True`."
            )
    codes, mapping = _encode(values, key, mapping)
    _warn_small_categories(codes, mapping, column)
    writes.append(("obs", column, codes))
    return _field(
        {"attr_name": "obs", "attr_key": column},
        {"categorical_mapping": mapping, "original_key": key},
        {stat_name: len(mapping)},
    )


def _register_size_factor(adata, key: str | None) -> dict:
    """Optional per-cell size factor, read in place from ``obs[key]``."""
    if key is None:
        return _field({}, {}, {})
    values = _obs_column(adata, key)
    if not _is_numeric(values):
        raise ValueError(f"Size factor adata.obs['{key}'] must be numeric; got dtype {values.dtype}.")
    array = values.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        bad = int(np.sum(~(np.isfinite(array) & (array > 0))))
        raise ValueError(
            f"Size factor adata.obs['{key}'] must be finite and strictly positive; {bad} cell(s) are not."
        )
    return _field({"attr_name": "obs", "attr_key": key}, {}, {})


def _register_categorical_covariates(
    adata, keys: list | None, source: dict | None, extend: bool, writes: list
) -> dict:
    """Extra categorical covariates: one code column per key in ``obsm["_scvi_extra_categorical_covs"]``."""
    if not keys:
        return _field({}, {}, {"n_extra_categorical_covs": 0})
    source_mappings = None if source is None else source["state_registry"]["mappings"]
    codes = pd.DataFrame(index=adata.obs_names)
    mappings = {}
    for key in keys:
        values = _obs_column(adata, key)
        mapping = None
        if source_mappings is not None:
            mapping, _ = _transfer_mapping(values, source_mappings[key], extend)  # unseen → _encode raises
        codes[key], mappings[key] = _encode(values, key, mapping)
    writes.append(("obsm", _CAT_COVS_COLUMN, codes))
    return _field(
        {"attr_name": "obsm", "attr_key": _CAT_COVS_COLUMN},
        {"mappings": mappings, "field_keys": list(keys), "n_cats_per_key": [len(m) for m in mappings.values()]},
        {"n_extra_categorical_covs": len(keys)},
    )


def _register_continuous_covariates(adata, keys: list | None, writes: list) -> dict:
    """Extra continuous covariates: a float32 copy of ``obs[keys]`` in ``obsm["_scvi_extra_continuous_covs"]``."""
    if not keys:
        return _field({}, {}, {"n_extra_continuous_covs": 0})
    for key in keys:
        values = _obs_column(adata, key)
        if not _is_numeric(values):
            raise ValueError(f"Continuous covariate adata.obs['{key}'] must be numeric; got dtype {values.dtype}.")
        if not np.all(np.isfinite(values.to_numpy(dtype=np.float64))):
            raise ValueError(f"Continuous covariate adata.obs['{key}'] contains NaN or infinite values.")
    table = adata.obs[list(keys)].astype(np.float32)
    writes.append(("obsm", _CONT_COVS_COLUMN, table))
    return _field(
        {"attr_name": "obsm", "attr_key": _CONT_COVS_COLUMN},
        {"columns": np.asarray(list(keys), dtype=object)},
        {"n_extra_continuous_covs": len(keys)},
    )


# --------------------------------------------------------------------------------------------
# Categorical encoding
# --------------------------------------------------------------------------------------------


def _encode(values: pd.Series, key: str, mapping: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of ``values`` and the category array they index.

    Without ``mapping`` the categories are those of ``astype("category")``: the sorted unique
    values, or an existing categorical's own categories (unused ones included).
    """
    if mapping is None:
        categorical = values.astype("category")
    else:
        categorical = values.astype(pd.CategoricalDtype(categories=mapping, ordered=True))
    codes = categorical.cat.codes.to_numpy()
    categories = categorical.cat.categories
    if np.any(codes < 0):
        received = pd.unique(values[codes < 0].astype(object))
        raise ValueError(
            f'Making .obs["{key}"] categorical failed. Expected categories: {list(categories)}. '
            f"Received categories: {list(received)}."
        )
    return codes, _category_array(categories if mapping is None else mapping)


def _category_array(categories) -> np.ndarray:
    """Categories as a NumPy array: object dtype for strings (as scvi-tools stores them)."""
    array = np.asarray(categories)
    if array.dtype.kind in "OUS" or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        array = np.asarray(list(categories), dtype=object)
    return array.copy()


def _transfer_mapping(values: pd.Series, mapping, extend: bool) -> tuple[np.ndarray, list]:
    """The source ``mapping`` (extended by the unseen values when ``extend``) and the unseen values, sorted."""
    mapping = _category_array(mapping)
    present = pd.Index(np.asarray(values.dropna().unique()))
    unseen = list(present.difference(pd.Index(mapping)))
    if extend and unseen:
        mapping = _category_array(list(mapping) + unseen)
    return mapping, unseen


def _warn_small_categories(codes: np.ndarray, mapping: np.ndarray, column: str) -> None:
    """Warn about every category held by fewer than 3 (but at least 1) cells."""
    counts = np.bincount(codes, minlength=len(mapping))
    for code in np.flatnonzero((counts > 0) & (counts < 3)):
        warnings.warn(
            f"Category {mapping[code]} in adata.obs['{column}'] has fewer than 3 cells. "
            "Models may not train properly.",
            UserWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# Count-matrix checks
# --------------------------------------------------------------------------------------------


def _matrix_name(layer: str | None, quoted: bool = True) -> str:
    if layer is None:
        return "adata.X"
    return f"adata.layers['{layer}']" if quoted else f"adata.layers[{layer}]"


def _value_blocks(matrix) -> Iterator[np.ndarray]:
    """All values that can be non-zero, in blocks of about ``_CHUNK_ELEMENTS`` (so that the checks'
    temporaries stay small): slices of a sparse matrix's stored values, a dense matrix's rows."""
    if sp.issparse(matrix):
        data = np.asarray(matrix.data)
        for start in range(0, max(len(data), 1), _CHUNK_ELEMENTS):
            yield data[start : start + _CHUNK_ELEMENTS]
        return
    n_rows, n_cols = matrix.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        block = matrix[start : start + step]  # also works for h5py datasets and backed sparse matrices
        yield np.asarray(block.data) if sp.issparse(block) else np.asarray(block)


def _check_counts(matrix, layer: str | None) -> None:
    """Raise on NaN, infinite or negative values; warn on non-integer values. Every value is checked."""
    if _backed.is_backed(matrix):  # on disk: one chunked pass (its totals also serve later checks)
        found = _backed.scan(matrix)
        if not (np.issubdtype(found.dtype, np.number) or found.dtype == np.bool_):
            raise ValueError(f"{_matrix_name(layer)} has dtype {found.dtype}; scVI needs numeric counts.")
        summary = (found.n_nan, found.n_inf, found.minimum, found.non_integer)
    else:
        summary = _count_summary(matrix, layer)
    _report_counts(*summary, layer)


def _count_summary(matrix, layer: str | None) -> tuple[int, int, float, bool]:
    """Numbers of NaN and infinite values, smallest finite value, whether some value is not an integer."""
    n_nan = n_inf = 0
    minimum = np.inf
    non_integer = False
    for block in _value_blocks(matrix):
        if block.size == 0:
            continue
        if not (np.issubdtype(block.dtype, np.number) or block.dtype == np.bool_):
            raise ValueError(f"{_matrix_name(layer)} has dtype {block.dtype}; scVI needs numeric counts.")
        if np.issubdtype(block.dtype, np.inexact):
            finite = np.isfinite(block)
            if not finite.all():
                n_nan += int(np.isnan(block).sum())
                n_inf += int(np.isinf(block).sum())
                block = block[finite]
                if block.size == 0:
                    continue
            non_integer = non_integer or bool(np.any(block != np.floor(block)))
        minimum = min(minimum, float(block.min()))
    return n_nan, n_inf, minimum, non_integer


def _report_counts(n_nan: int, n_inf: int, minimum: float, non_integer: bool, layer: str | None) -> None:
    problems = []
    if n_nan:
        problems.append(f"NaN values ({n_nan} entries)")
    if n_inf:
        problems.append(f"infinite values ({n_inf} entries)")
    if minimum < 0:
        problems.append(f"negative values (min {minimum})")
    if problems:
        raise ValueError(
            f"{_matrix_name(layer)} contains {' and '.join(problems)}; scVI needs raw, non-negative counts. "
            "Pass the layer with raw UMI counts via `layer=`."
        )
    if non_integer:
        warnings.warn(
            f"{_matrix_name(layer, quoted=False)} does not contain unnormalized count data. "
            "Are you sure this is what you want?",
            UserWarning,
            stacklevel=5,  # _report_counts < _check_counts < _register_layer < setup_registry
        )


def _check_same_var_names(adata, expected) -> None:
    """Raise unless ``adata.var_names`` are ``expected`` (the source's genes) in the same order."""
    if expected is None:  # a registry without gene names (legacy): only the number can be checked
        return
    expected = pd.Index([str(name) for name in expected])
    received = pd.Index([str(name) for name in adata.var_names])
    if expected.equals(received):
        return
    missing, unseen = expected.difference(received, sort=False), received.difference(expected, sort=False)
    if len(missing) == 0 and len(unseen) == 0:
        first = int(np.flatnonzero(expected.to_numpy() != received.to_numpy())[0])
        raise ValueError(
            f"The AnnData has the model's genes in a different order (first difference at position {first}: "
            f"{received[first]!r} where the model has {expected[first]!r}); the counts would be read against the "
            "wrong genes. Reorder the genes first: `adata = adata[:, model.adata.var_names].copy()` (or "
            "`SCVI.prepare_query_anndata(adata, model)`)."
        )
    raise ValueError(
        f"The AnnData's genes are not the model's: {len(missing)} of the model's genes are missing "
        f"(e.g. {list(missing[:5])}) and {len(unseen)} genes are unknown to the model (e.g. {list(unseen[:5])}). "
        "Subset and order the genes as the model's, e.g. with `SCVI.prepare_query_anndata(adata, model)` "
        "(which fills missing genes with zeros)."
    )


def _warn_duplicated_names(adata) -> None:
    """Duplicated cell or gene names work, but results keyed by name become ambiguous."""
    for axis, names, fix in (("gene", adata.var_names, "var_names_make_unique"), ("cell", adata.obs_names, "obs_names_make_unique")):
        if names.is_unique:
            continue
        duplicated = pd.unique(np.asarray(names[names.duplicated()], dtype=object))
        warnings.warn(
            f"{len(duplicated)} {axis} name(s) are duplicated (e.g. {list(duplicated[:3])}): results indexed by "
            f"{axis} name (DataFrames, gene_list, differential expression) will be ambiguous. "
            f"Call `adata.{fix}()` before setup_anndata.",
            UserWarning,
            stacklevel=5,
        )


def _warn_empty_cells(matrix, layer: str | None) -> None:
    """Cells without counts train (their library counts as 1 count) but their results mean nothing."""
    n_empty = int(np.sum(_row_totals(matrix) <= 0))
    if n_empty:
        warnings.warn(
            f"This dataset has some empty cells, this might fail inference. Data should be filtered with "
            f"`scanpy.pp.filter_cells()`. ({n_empty} cell(s) have zero total counts in {_matrix_name(layer)}: they "
            "are used with a library of 1 count and their latent representation and expression estimates are "
            "meaningless.)",
            UserWarning,
            stacklevel=5,
        )


def _warn_if_not_csr(matrix, layer: str | None) -> None:
    """Sparse matrices in another format than CSR work, but minibatches are cut row-wise."""
    sparse_format = getattr(matrix, "format", None)
    if sparse_format is not None and sparse_format != "csr":
        warnings.warn(
            f"{_matrix_name(layer)} is a {sparse_format.upper()} sparse matrix. Training will be faster when "
            "sparse matrix is formatted as CSR. It is safe to cast before model initialization, e.g. "
            f"`{_matrix_name(layer)} = {_matrix_name(layer)}.tocsr()`.",
            UserWarning,
            stacklevel=4,
        )


def _row_totals(matrix) -> np.ndarray:
    """Total counts of every row as float64, without densifying the whole matrix."""
    if _backed.is_backed(matrix):  # on disk: chunked, remembered from setup's scan
        return _backed.row_totals(matrix)
    if sp.issparse(matrix) or isinstance(matrix, np.ndarray):
        return np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    n_rows, n_cols = matrix.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    totals = [
        np.asarray(matrix[start : start + step].sum(axis=1), dtype=np.float64).ravel()
        for start in range(0, n_rows, step)
    ]
    return np.concatenate(totals) if totals else np.zeros(0)


# --------------------------------------------------------------------------------------------
# AnnData access and formatting helpers
# --------------------------------------------------------------------------------------------


def _obs_column(adata, key: str) -> pd.Series:
    if key not in adata.obs:
        raise KeyError(f"{key} not found in adata.obs. Available columns: {[str(c) for c in adata.obs.columns]}.")
    return adata.obs[key]


def _is_numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values.dtype) and not isinstance(values.dtype, pd.CategoricalDtype)


def _read(adata, attr_name: str, attr_key: str | None):
    container = getattr(adata, attr_name)
    if attr_key is None:
        return container
    if attr_key not in container:
        raise ValueError(
            f"{_location(attr_name, attr_key)} not found: the AnnData was not set up with this registry. "
            "Run setup_anndata (or transfer the registry) first."
        )
    data = container[attr_key]
    return data.to_numpy() if isinstance(data, (pd.Series, pd.DataFrame)) and attr_name != "layers" else data


def _write(adata, attr_name: str, key: str | None, value) -> None:
    if attr_name == "X":
        adata.X = value
    elif attr_name == "obs":
        adata.obs[key] = value
    else:
        getattr(adata, attr_name)[key] = value


def _location(attr_name: str, attr_key: str | None) -> str:
    return f"adata.{attr_name}" if attr_key is None else f"adata.{attr_name}['{attr_key}']"


def _check_codes_in_range(adata, name: str, field: dict) -> None:
    state = field["state_registry"]
    if "categorical_mapping" in state:
        codes = adata.obs[field["data_registry"]["attr_key"]].to_numpy()
        columns = {name: (codes, len(state["categorical_mapping"]))}
    elif "mappings" in state:
        table = adata.obsm[field["data_registry"]["attr_key"]]
        columns = {key: (np.asarray(table[key]), len(mapping)) for key, mapping in state["mappings"].items()}
    else:
        return
    for column, (codes, n_categories) in columns.items():
        if codes.size and (codes.min() < 0 or codes.max() >= n_categories):
            raise ValueError(
                f"The codes of {column!r} in the AnnData do not fit the registry's {n_categories} categories. "
                "Run setup_anndata (or transfer the registry) again."
            )


def _text_table(title: str, header: list[str], rows: list) -> str:
    """A titled plain-text table with ``|``-separated, left-aligned columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return " | ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([title, line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _state_table(name: str, state: dict) -> str | None:
    """The category → code table of a categorical field, or the column list of continuous covariates."""
    header = ["Source Location", "Categories", "scvi-tools Encoding"]
    if "categorical_mapping" in state:
        source = _location("obs", state["original_key"])
        mapping = state["categorical_mapping"]
        rows = [(source if code == 0 else "", category, code) for code, category in enumerate(mapping)]
        return _text_table(f"{name} State Registry", header, rows)
    if "mappings" in state:
        rows = []
        for key, mapping in state["mappings"].items():
            source = _location("obs", key)
            rows += [(source if code == 0 else "", category, code) for code, category in enumerate(mapping)]
        return _text_table(f"{name} State Registry", header, rows)
    if "columns" in state:
        rows = [(_location("obs", column),) for column in state["columns"]]
        return _text_table(f"{name} State Registry", ["Source Location"], rows)
    return None
