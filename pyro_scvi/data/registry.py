"""Registering an AnnData for scVI: which matrix holds the counts and how covariates are encoded.

:func:`setup_registry` checks an AnnData, writes integer codes for the categorical covariates
into it (``obs["_scvi_batch"]``, ``obs["_scvi_labels"]``, ``obsm["_scvi_extra_categorical_covs"]``)
and returns a :class:`Registry`: a frozen dataclass of :class:`Field` s with typed accessors
(``registry.n_vars``, ``registry.batch_categories``, ...). :meth:`Registry.to_dict` gives the layout
scvi-tools saves with a model (``attr_dict["registry_"]``), so that models can be exchanged in both
directions, and :meth:`Registry.from_dict` reads it back::

    {"scvi_version", "pyro_scvi_version", "model_name", "setup_method_name", "setup_args",
     "field_registries": {field: {"data_registry", "state_registry", "summary_stats"}},
     "_scvi_uuid"}

A ``Registry`` is also a read-only dict of that layout (see :class:`Registry`), and every function
here takes a registry in either form.

With ``source_registry`` the category mappings of an earlier registry are imposed on a new
AnnData (scvi-tools' "transfer"), optionally extended by categories the source never saw.
"""

from __future__ import annotations

import importlib.metadata
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import backed as _backed

__all__ = [
    "Field",
    "REGISTRY_KEYS",
    "Registry",
    "SCVI_TOOLS_VERSION",
    "__version__",
    "setup_registry",
    "get_from_registry",
    "summary_stats",
    "library_size_prior",
    "format_registry",
    "validate_registered",
    "minified_fields",
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
#: the keys scANVI writes instead (scvi-tools ≥ 1.2.2)
_SCANVI_MINIFIED_KEYS = {"latent_qzm": "scanvi_latent_qzm", "latent_qzv": "scanvi_latent_qzv"}
#: older names read from saved minified AnnData: scvi-tools ≤ 1.2.1 prefixed them with the model
#: name, and 1.2.1's scANVI wrote the base class's unprefixed names
_OLDER_MINIFIED_KEYS = {
    "SCVI": {"latent_qzm": ("_scvi_latent_qzm", "latent_qzm"),
             "latent_qzv": ("_scvi_latent_qzv", "latent_qzv"),
             "observed_lib_size": ("_scvi_observed_lib_size",)},
    "SCANVI": {"latent_qzm": ("_scanvi_latent_qzm", "latent_qzm"),
               "latent_qzv": ("_scanvi_latent_qzv", "latent_qzv"),
               "observed_lib_size": ("_scanvi_observed_lib_size",)},
}


def minified_fields(model_name: str | None = "SCVI") -> dict[str, tuple[str, str]]:
    """``{field: (attr_name, key)}`` where ``minify_adata`` of model ``model_name`` writes the stored
    posterior, library and type (scvi-tools' names: ``scanvi_latent_qzm`` etc. for SCANVI)."""
    fields = dict(MINIFIED_FIELDS)
    if model_name == "SCANVI":
        fields.update({name: ("obsm", key) for name, key in _SCANVI_MINIFIED_KEYS.items()})
    return fields


def _minified_field(adata, model_name: str | None, name: str) -> Field:
    """The field ``name`` of a minified AnnData: the current key, else an older release's."""
    attr_name, key = minified_fields(model_name)[name]
    older = _OLDER_MINIFIED_KEYS.get(model_name if model_name == "SCANVI" else "SCVI", {})
    for candidate in (key, *older.get(name, ())):
        if candidate in getattr(adata, attr_name):
            return Field(attr_name, candidate)
    raise ValueError(f"This AnnData is minified but {_location(attr_name, key)} is missing.")
_MANAGER_UUID_KEY = "_scvi_manager_uuid"
# Rows of a dense matrix checked at once, so temporaries stay near 2**24 elements.
_CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------
# The registry as typed objects
# --------------------------------------------------------------------------------------------

#: the top-level keys of the saved dict form, in the order :func:`setup_registry` writes them
_REGISTRY_KEY_ORDER = (
    "scvi_version",
    "pyro_scvi_version",
    "model_name",
    "setup_method_name",
    "setup_args",
    "field_registries",
    _UUID_KEY,
)
_FIELD_PARTS = ("data_registry", "state_registry", "summary_stats")


def _copied(value):
    """A copy of the dicts and lists in ``value``; arrays and scalars are shared."""
    if isinstance(value, Mapping):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return value


def _same(a, b) -> bool:
    """Deep equality of registry contents: arrays by shape and elements, other values by type and ``==``."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (
            isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
            and all(_same(a[key], b[key]) for key in a)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and bool(a == b)


@dataclass(frozen=True, eq=False)
class Field:
    """One registered field (``"X"``, ``"batch"``, ...): where its data is and what describes it.

    Attributes
    ----------
    attr_name
        The AnnData attribute that holds the data (``"X"``, ``"layers"``, ``"obs"``, ``"obsm"``,
        ``"uns"``), or ``None`` for an optional field left unregistered (saved as an empty
        ``data_registry``).
    attr_key
        The key inside that attribute; ``None`` for ``adata.X``.
    state
        The saved ``state_registry``. Its keys depend on the field: ``n_obs``, ``n_vars`` and
        ``column_names`` (object array of gene names) for ``"X"``; ``categorical_mapping`` (array of
        categories, code ``i`` ↔ element ``i``) and ``original_key`` (the ``obs`` column) for
        ``"batch"``/``"labels"``; ``mappings`` (covariate → categories), ``field_keys`` and
        ``n_cats_per_key`` for the categorical covariates; ``columns`` for the continuous ones.
    summary_stats
        Counts this field contributes, e.g. ``{"n_batch": 3}``.
    data_extra, extra
        Keys of the saved ``data_registry`` and of the field's entry that this class does not
        model, kept so that :meth:`to_dict` gives back exactly what :meth:`from_dict` read.
    """

    attr_name: str | None = None
    attr_key: str | None = None
    state: dict = dc_field(default_factory=dict)
    summary_stats: dict = dc_field(default_factory=dict)
    data_extra: dict = dc_field(default_factory=dict, repr=False)
    extra: dict = dc_field(default_factory=dict, repr=False)

    @property
    def is_registered(self) -> bool:
        """Whether the field points at data (an optional field without data is not)."""
        return self.attr_name is not None

    @property
    def location(self) -> str | None:
        """Where the data lives, as code: ``"adata.obs['_scvi_batch']"``; ``None`` when unregistered."""
        return None if self.attr_name is None else _location(self.attr_name, self.attr_key)

    @property
    def categories(self) -> np.ndarray | None:
        """The categories of a ``batch``/``labels`` field (code ``i`` is element ``i``), else ``None``."""
        return self.state.get("categorical_mapping")

    @property
    def original_key(self) -> str | None:
        """The ``obs`` column a ``batch``/``labels`` field was encoded from, else ``None``."""
        return self.state.get("original_key")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Field):
            return NotImplemented
        return _same(self.to_dict(), other.to_dict())

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict:
        """The saved form ``{"data_registry", "state_registry", "summary_stats"}`` (a fresh copy)."""
        data = {} if self.attr_name is None else {"attr_name": self.attr_name, "attr_key": self.attr_key}
        data.update(_copied(self.data_extra))
        entry = {"data_registry": data, "state_registry": _copied(self.state),
                 "summary_stats": _copied(self.summary_stats)}
        entry.update(_copied(self.extra))
        return entry

    @classmethod
    def from_dict(cls, entry: Mapping, name: str = "?") -> "Field":
        """The field saved as ``entry`` (the inverse of :meth:`to_dict`); ``name`` is for errors."""
        data = dict(entry.get("data_registry") or {})
        if data and not {"attr_name", "attr_key"} <= data.keys():
            raise ValueError(
                f"The data_registry of field {name!r} needs 'attr_name' and 'attr_key'; got {data}."
            )
        return cls(
            attr_name=data.pop("attr_name", None),
            attr_key=data.pop("attr_key", None),
            state=_copied(entry.get("state_registry") or {}),
            summary_stats=_copied(entry.get("summary_stats") or {}),
            data_extra=_copied(data),
            extra={key: _copied(value) for key, value in entry.items() if key not in _FIELD_PARTS},
        )


def _read_only(self, *args, **kwargs):
    raise TypeError(
        "A Registry is read-only. Make a changed one with dataclasses.replace(registry, ...) or "
        "Registry.from_dict(...), or take a mutable copy with registry.to_dict()."
    )


@dataclass(frozen=True, eq=False, repr=False)
class Registry(dict):
    """How an AnnData was registered for a model: setup arguments, fields, versions, identity.

    The dataclass attributes are the source of truth; :meth:`to_dict` gives the layout saved in
    model files (scvi-tools' ``registry_``), and :meth:`from_dict` reads registries written by
    pyro-scvi, by scvi-tools 1.x and by the legacy converter, exactly (unknown keys are kept).

    *Compatibility view.* A ``Registry`` is also a read-only ``dict`` whose items are those of
    :meth:`to_dict`, so code written for scvi-tools' plain-dict ``model.registry_`` keeps working:
    ``registry["setup_args"]["batch_key"]``, ``registry.get("model_name")``, ``"_scvi_uuid" in
    registry``, ``dict(registry)``. Setting or deleting items raises ``TypeError``; the nested dicts
    of the view are copies, so changing them does not change the registry. New code should use
    the typed attributes and accessors below.

    Attributes
    ----------
    fields
        The registered fields by name (:class:`Field`), in registration order.
    setup_args
        The arguments of the setup method (``layer``, ``batch_key``, ``labels_key``,
        ``size_factor_key``, ``categorical_covariate_keys``, ``continuous_covariate_keys``).
    model_name, setup_method_name
        The class and class method that registered the AnnData (``"SCVI"``, ``"setup_anndata"``).
    scvi_version, pyro_scvi_version
        Versions written into the registry (``None``: absent, e.g. ``pyro_scvi_version`` in a
        registry written by scvi-tools).
    uuid
        ``adata.uns["_scvi_uuid"]`` of the registered AnnData (saved as ``"_scvi_uuid"``).
    extra
        Top-level keys this class does not model, kept for an exact round trip.
    key_order
        The order of the top-level keys in the dict form (``from_dict`` keeps the input's order);
        a key listed here is written even when its value is ``None``.
    """

    fields: dict[str, Field]
    setup_args: dict = dc_field(default_factory=dict)
    model_name: str | None = "SCVI"
    setup_method_name: str | None = "setup_anndata"
    scvi_version: str | None = SCVI_TOOLS_VERSION
    pyro_scvi_version: str | None = None
    uuid: str | None = None
    extra: dict = dc_field(default_factory=dict)
    key_order: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fields = {
            name: f if isinstance(f, Field) else Field.from_dict(f, name) for name, f in self.fields.items()
        }
        object.__setattr__(self, "fields", fields)
        dict.update(self, self.to_dict())  # the compatibility view, filled once (the registry is frozen)

    # ------------------------------------------------------------------ dict form
    def _top_level(self) -> dict:
        return {
            "scvi_version": self.scvi_version,
            "pyro_scvi_version": self.pyro_scvi_version,
            "model_name": self.model_name,
            "setup_method_name": self.setup_method_name,
            "setup_args": self.setup_args,
            "field_registries": self.fields,
            _UUID_KEY: self.uuid,
        }

    def to_dict(self) -> dict:
        """The registry as saved in model files: plain dicts, NumPy arrays kept (a fresh copy)."""
        known = self._top_level()
        order = list(self.key_order)
        order += [key for key in _REGISTRY_KEY_ORDER if key not in order and known[key] is not None]
        order += [key for key in self.extra if key not in order]
        out = {}
        for key in order:
            if key == "field_registries":
                out[key] = {name: f.to_dict() for name, f in self.fields.items()}
            elif key in known:
                out[key] = _copied(known[key])
            elif key in self.extra:
                out[key] = _copied(self.extra[key])
        return out

    @classmethod
    def from_dict(cls, registry: Mapping) -> "Registry":
        """Read a registry in the saved layout (the inverse of :meth:`to_dict`)."""
        if "field_registries" not in registry:
            raise ValueError(f"A registry needs 'field_registries'; got keys {list(registry)}.")
        return cls(
            fields={name: Field.from_dict(f, name) for name, f in registry["field_registries"].items()},
            setup_args=_copied(registry.get("setup_args") or {}),
            model_name=registry.get("model_name"),
            setup_method_name=registry.get("setup_method_name"),
            scvi_version=registry.get("scvi_version"),
            pyro_scvi_version=registry.get("pyro_scvi_version"),
            uuid=registry.get(_UUID_KEY),
            extra={key: _copied(value) for key, value in registry.items() if key not in _REGISTRY_KEY_ORDER},
            key_order=tuple(registry),
        )

    @classmethod
    def coerce(cls, registry: "Registry | Mapping") -> "Registry":
        """``registry`` itself when it is a :class:`Registry`, else :meth:`from_dict` of it."""
        if isinstance(registry, Registry):
            return registry
        if isinstance(registry, Mapping):
            return cls.from_dict(registry)
        raise TypeError(f"Expected a Registry or a registry dict, got {type(registry).__name__}.")

    # ------------------------------------------------------------------ fields
    def field(self, name: str) -> Field:
        """The field ``name`` (``KeyError`` naming the registered fields when there is none)."""
        if name not in self.fields:
            raise KeyError(f"{name!r} is not a registered field; registered fields: {list(self.fields)}.")
        return self.fields[name]

    @property
    def summary_stats(self) -> dict[str, int]:
        """All fields' summary statistics in one new dict: ``n_vars``, ``n_cells``, ``n_batch``, ..."""
        merged: dict = {}
        for f in self.fields.values():
            merged.update(f.summary_stats)
        return merged

    @property
    def n_vars(self) -> int:
        """Number of genes registered."""
        return int(self.field(REGISTRY_KEYS.X).state["n_vars"])

    @property
    def n_cells(self) -> int:
        """Number of cells of the registered AnnData."""
        state = self.field(REGISTRY_KEYS.X).state
        return int(state["n_obs"] if "n_obs" in state else self.summary_stats["n_cells"])

    @property
    def var_names(self) -> np.ndarray | None:
        """Registered gene names, object array ``(n_vars,)``; ``None`` for a legacy registry without them."""
        return self.field(REGISTRY_KEYS.X).state.get("column_names")

    @property
    def layer(self) -> str | None:
        """The layer holding the counts, or ``None`` for ``adata.X``."""
        x = self.field(REGISTRY_KEYS.X)
        return x.attr_key if x.attr_name == "layers" else None

    @property
    def n_batch(self) -> int:
        """Number of batch categories (1 when no ``batch_key`` was given)."""
        return int(self.summary_stats["n_batch"])

    @property
    def n_labels(self) -> int:
        """Number of label categories (1 when no ``labels_key`` was given)."""
        return int(self.summary_stats["n_labels"])

    @property
    def batch_categories(self) -> np.ndarray:
        """Batch categories, array ``(n_batch,)``: batch code ``i`` is element ``i``."""
        return self.field(REGISTRY_KEYS.BATCH).categories

    @property
    def label_categories(self) -> np.ndarray:
        """Label categories, array ``(n_labels,)``: label code ``i`` is element ``i``."""
        return self.field(REGISTRY_KEYS.LABELS).categories

    @property
    def has_size_factor(self) -> bool:
        """Whether a per-cell size factor (``size_factor_key``) is registered."""
        size_factor = self.fields.get(REGISTRY_KEYS.SIZE_FACTOR)
        return size_factor is not None and size_factor.is_registered

    @property
    def categorical_covariate_mappings(self) -> dict[str, np.ndarray]:
        """Extra categorical covariates: ``obs`` column → array of its categories (``{}`` when none)."""
        f = self.fields.get(REGISTRY_KEYS.CAT_COVS)
        return {} if f is None else dict(f.state.get("mappings", {}))

    @property
    def categorical_covariate_keys(self) -> list[str]:
        """The ``obs`` columns of the extra categorical covariates, in code order (``[]`` when none)."""
        f = self.fields.get(REGISTRY_KEYS.CAT_COVS)
        keys = None if f is None else f.state.get("field_keys")
        return list(self.categorical_covariate_mappings if keys is None else keys)

    @property
    def n_cats_per_covariate(self) -> list[int]:
        """Number of categories of each extra categorical covariate (``[]`` when none)."""
        f = self.fields.get(REGISTRY_KEYS.CAT_COVS)
        counts = None if f is None else f.state.get("n_cats_per_key")
        if counts is None:
            return [len(mapping) for mapping in self.categorical_covariate_mappings.values()]
        return [int(n) for n in counts]

    @property
    def continuous_covariate_keys(self) -> list[str]:
        """The ``obs`` columns of the extra continuous covariates, in column order (``[]`` when none)."""
        f = self.fields.get(REGISTRY_KEYS.CONT_COVS)
        return [] if f is None else [str(c) for c in f.state.get("columns", [])]

    @property
    def is_minified(self) -> bool:
        """Whether the registered AnnData was minified (it keeps posteriors instead of counts)."""
        return "latent_qzm" in self.fields

    # ------------------------------------------------------------------ Python protocols
    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return _same(self.to_dict(), other.to_dict() if isinstance(other, Registry) else dict(other))

    def __ne__(self, other) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):  # pickle and copy rebuild from the dict form
        return (Registry.from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        return (
            f"Registry(model_name={self.model_name!r}, fields={list(self.fields)}, "
            f"summary_stats={self.summary_stats}, uuid={self.uuid!r})"
        )

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only


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
    source_registry: Registry | Mapping | None = None,
    extend_categories: bool = False,
    check_var_names: bool = False,
) -> Registry:
    """Check ``adata``, write the covariate codes into it and return its :class:`Registry`.

    With ``source_registry`` (a :class:`Registry` or its dict form) the setup arguments and
    category mappings come from that registry (explicit arguments must then be ``None`` or equal
    to the source's); with ``extend_categories=True`` categories unseen by the source are appended
    to its mappings. With ``check_var_names=True`` (what model methods use for a new AnnData) the
    genes must also be the source's, in the source's order (``ValueError`` otherwise); by default
    only their number is checked, as in scvi-tools. Duplicated cell or gene names and cells
    without counts give a warning. Nothing is written into ``adata`` unless every check passes.
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
        setup_args, source_fields = given, {}
    else:
        source = Registry.coerce(source_registry)
        setup_args, source_fields = _setup_args_from_source(source, given), source.fields

    writes: list[tuple[str, str | None, Any]] = []
    fields = _register_fields(adata, setup_args, source_fields, extend_categories, check_var_names, writes,
                              model_name)
    for attr_name, key, value in writes:
        _write(adata, attr_name, key, value)
    if _UUID_KEY not in adata.uns:
        adata.uns[_UUID_KEY] = str(uuid.uuid4())
    adata.uns[_MANAGER_UUID_KEY] = str(uuid.uuid4())

    return Registry(
        fields=fields,
        setup_args=dict(setup_args),
        model_name=model_name,
        setup_method_name="setup_anndata",
        scvi_version=SCVI_TOOLS_VERSION,
        pyro_scvi_version=__version__,
        uuid=adata.uns[_UUID_KEY],
    )


def get_from_registry(adata, registry: Registry | Mapping, key: str):
    """The registered data of field ``key`` of ``adata`` (``None`` for an empty optional field).

    ``"X"`` gives the matrix itself (not a copy); ``"batch"``/``"labels"`` int64 codes ``(n, 1)``;
    ``"size_factor"`` float32 ``(n, 1)``; ``"extra_categorical_covs"`` int64 ``(n, m)``;
    ``"extra_continuous_covs"`` float32 ``(n, C)``. Other registered fields come back as stored.
    """
    field = Registry.coerce(registry).field(key)
    if not field.is_registered:
        return None
    data = _read(adata, field.attr_name, field.attr_key)
    if key in (REGISTRY_KEYS.BATCH, REGISTRY_KEYS.LABELS):
        return np.asarray(data, dtype=np.int64).reshape(-1, 1)
    if key == REGISTRY_KEYS.SIZE_FACTOR:
        return np.asarray(data, dtype=np.float32).reshape(-1, 1)
    if key == REGISTRY_KEYS.CAT_COVS:
        return np.asarray(data, dtype=np.int64)
    if key == REGISTRY_KEYS.CONT_COVS:
        return np.asarray(data, dtype=np.float32)
    return data


def summary_stats(registry: Registry | Mapping) -> dict:
    """All fields' summary statistics merged into one dict (``n_vars``, ``n_cells``, ``n_batch``, ...).

    The same as :attr:`Registry.summary_stats`, for a registry in either form."""
    return Registry.coerce(registry).summary_stats


def library_size_prior(adata, registry: Registry | Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and (population) variance of the log total counts, each float32 ``(1, n_batch)``.

    Cells without counts enter with log total 0 (with a warning); batches without cells keep mean 0
    and variance 1. All cells are used.
    """
    registry = Registry.coerce(registry)
    n_batch = registry.n_batch
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


def format_registry(registry: Registry | Mapping, hide_state_registries: bool = False) -> str:
    """A plain-text summary of a registry: setup arguments, summary statistics, where each field lives
    and (unless hidden) the category → code tables."""
    registry = Registry.coerce(registry)
    version = f"Anndata setup with scvi-tools version {registry.scvi_version}"
    if registry.pyro_scvi_version is not None:
        version += f" (pyro-scvi {registry.pyro_scvi_version})"
    parts = [version + "."]

    model_name = registry.model_name or "SCVI"
    method = registry.setup_method_name or "setup_anndata"
    arg_lines = [f"    {name}: {value!r}" for name, value in registry.setup_args.items()]
    parts.append("\n".join([f"Setup via `{model_name}.{method}` with arguments:", *arg_lines]))

    stats = registry.summary_stats
    parts.append(_text_table("Summary Statistics", ["Summary Stat Key", "Value"], list(stats.items())))

    locations = [(name, field.location) for name, field in registry.fields.items() if field.is_registered]
    parts.append(_text_table("Data Registry", ["Registry Key", "scvi-tools Location"], locations))

    if not hide_state_registries:
        for name, field in registry.fields.items():
            table = _state_table(name, field.state)
            if table:
                parts.append(table)
    return "\n\n".join(parts) + "\n"


def validate_registered(adata, registry: Registry | Mapping) -> None:
    """Raise ``ValueError`` when ``adata`` no longer fits ``registry`` (shape, layer or code columns)."""
    registry = Registry.coerce(registry)
    x = registry.field(REGISTRY_KEYS.X)
    if x.attr_name == "layers" and x.attr_key not in adata.layers:
        raise ValueError(f"{x.attr_key} is not a valid key in adata.layers.")
    if adata.n_vars != x.state["n_vars"]:
        raise ValueError(
            f"The AnnData has {adata.n_vars} genes (n_vars) but was registered with {x.state['n_vars']}. "
            "Subset it to the registered genes or set it up again."
        )
    if adata.n_obs != x.state["n_obs"]:
        raise ValueError(
            f"The AnnData has {adata.n_obs} cells (n_obs) but was registered with {x.state['n_obs']}. "
            "Set up this AnnData again (or transfer the registry to it)."
        )
    for name, field in registry.fields.items():
        if not field.is_registered or name == REGISTRY_KEYS.X:
            continue
        if field.attr_key not in getattr(adata, field.attr_name):
            raise ValueError(
                f"{field.location} is missing: the AnnData was not set up with this registry. "
                "Run setup_anndata (or transfer the registry) again."
            )
        _check_codes_in_range(adata, name, field)


# --------------------------------------------------------------------------------------------
# Setup arguments
# --------------------------------------------------------------------------------------------


def _setup_args_from_source(source: Registry, given: dict) -> dict:
    """The source registry's setup arguments; explicit arguments may only repeat them."""
    source_args = source.setup_args
    for name, value in given.items():
        if value is not None and _as_key_list(value) != _as_key_list(source_args.get(name)):
            raise ValueError(
                f"`{name}={value!r}` conflicts with the source registry's "
                f"`{name}={source_args.get(name)!r}`. "
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
# to apply once every check has passed, and returns the field.
# --------------------------------------------------------------------------------------------


def _register_fields(
    adata, setup_args: dict, source: dict[str, Field], extend: bool, check_var_names: bool, writes: list,
    model_name: str | None = "SCVI",
) -> dict[str, Field]:
    """Every field of ``setup_args`` (in scvi-tools' order), plus those of a minified AnnData."""
    fields = {
        REGISTRY_KEYS.X: _register_layer(
            adata, setup_args["layer"], source.get(REGISTRY_KEYS.X), writes, check_var_names
        )
    }
    for name in (REGISTRY_KEYS.BATCH, REGISTRY_KEYS.LABELS):
        key = setup_args[_CATEGORICAL_FIELDS[name][0]]
        fields[name] = _register_categorical(adata, name, key, source.get(name), extend, writes)
    fields[REGISTRY_KEYS.SIZE_FACTOR] = _register_size_factor(adata, setup_args["size_factor_key"])
    fields[REGISTRY_KEYS.CAT_COVS] = _register_categorical_covariates(
        adata, _as_key_list(setup_args["categorical_covariate_keys"]), source.get(REGISTRY_KEYS.CAT_COVS),
        extend, writes,
    )
    fields[REGISTRY_KEYS.CONT_COVS] = _register_continuous_covariates(
        adata, _as_key_list(setup_args["continuous_covariate_keys"]), writes
    )
    if MINIFY_TYPE_KEY in adata.uns:
        for name in MINIFIED_FIELDS:
            fields[name] = _minified_field(adata, model_name, name)
    return fields


def _register_layer(
    adata, layer: str | None, source: Field | None, writes: list, check_var_names: bool = False
) -> Field:
    """The count matrix: ``adata.X`` or ``adata.layers[layer]``."""
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"{layer} is not a valid key in adata.layers.")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise ValueError("adata.X is empty (None); pass the layer holding the raw counts via `layer=`.")
    if source is not None:
        expected = source.state["n_vars"]
        if adata.n_vars != expected:
            raise ValueError(
                "Number of vars in `adata_target` not the same as source. "
                f"Expected: {expected} Received: {adata.n_vars}"
            )
        if check_var_names:
            _check_same_var_names(adata, source.state.get("column_names"))
    _check_counts(matrix, layer)
    _warn_if_not_csr(matrix, layer)
    _warn_duplicated_names(adata)
    if MINIFY_TYPE_KEY not in adata.uns:  # a minified AnnData has no counts left
        _warn_empty_cells(matrix, layer)
    if isinstance(matrix, np.ndarray) and not matrix.flags.c_contiguous:
        writes.append(("X" if layer is None else "layers", layer, np.ascontiguousarray(matrix)))
    return Field(
        "X" if layer is None else "layers",
        layer,
        {
            "n_obs": adata.n_obs,
            "n_vars": adata.n_vars,
            "column_names": np.asarray(adata.var_names, dtype=object),
        },
        {"n_vars": adata.n_vars, "n_cells": adata.n_obs},
    )


def _register_categorical(
    adata, field_name: str, key: str | None, source: Field | None, extend: bool, writes: list
) -> Field:
    """``batch`` or ``labels``: codes of ``obs[key]`` (a constant 0 when ``key`` is None)."""
    _, column, stat_name = _CATEGORICAL_FIELDS[field_name]
    if source is not None:
        key = source.original_key
    if key is None or key == column:
        key = column
        values = pd.Series(np.zeros(adata.n_obs, dtype=np.int64), index=adata.obs_names)
    else:
        values = _obs_column(adata, key)

    if source is None:
        mapping = None
    else:
        mapping, unseen = _transfer_mapping(values, source.categories, extend)
        if len(unseen) and not extend:
            raise ValueError(
                f"Category {unseen[0]} not found in source registry. "
                "Cannot transfer setup without `extend_categories = True`."
            )
    codes, mapping = _encode(values, key, mapping)
    _warn_small_categories(codes, mapping, column)
    writes.append(("obs", column, codes))
    state = {"categorical_mapping": mapping, "original_key": key}
    return Field("obs", column, state, {stat_name: len(mapping)})


def _register_size_factor(adata, key: str | None) -> Field:
    """Optional per-cell size factor, read in place from ``obs[key]``."""
    if key is None:
        return Field()
    values = _obs_column(adata, key)
    if not _is_numeric(values):
        raise ValueError(f"Size factor adata.obs['{key}'] must be numeric; got dtype {values.dtype}.")
    array = values.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        bad = int(np.sum(~(np.isfinite(array) & (array > 0))))
        raise ValueError(
            f"Size factor adata.obs['{key}'] must be finite and strictly positive; {bad} cell(s) are not."
        )
    return Field("obs", key)


def _register_categorical_covariates(
    adata, keys: list | None, source: Field | None, extend: bool, writes: list
) -> Field:
    """Extra categorical covariates: one code column per key in ``obsm["_scvi_extra_categorical_covs"]``."""
    if not keys:
        return Field(summary_stats={"n_extra_categorical_covs": 0})
    source_mappings = None if source is None else source.state["mappings"]
    codes = pd.DataFrame(index=adata.obs_names)
    mappings = {}
    for key in keys:
        values = _obs_column(adata, key)
        mapping = None
        if source_mappings is not None:
            mapping, _ = _transfer_mapping(values, source_mappings[key], extend)  # unseen → _encode raises
        codes[key], mappings[key] = _encode(values, key, mapping)
    writes.append(("obsm", _CAT_COVS_COLUMN, codes))
    return Field(
        "obsm",
        _CAT_COVS_COLUMN,
        {
            "mappings": mappings,
            "field_keys": list(keys),
            "n_cats_per_key": [len(m) for m in mappings.values()],
        },
        {"n_extra_categorical_covs": len(keys)},
    )


def _register_continuous_covariates(adata, keys: list | None, writes: list) -> Field:
    """Extra continuous covariates: ``obs[keys]`` as float32 in ``obsm["_scvi_extra_continuous_covs"]``."""
    if not keys:
        return Field(summary_stats={"n_extra_continuous_covs": 0})
    for key in keys:
        values = _obs_column(adata, key)
        if not _is_numeric(values):
            raise ValueError(
                f"Continuous covariate adata.obs['{key}'] must be numeric; got dtype {values.dtype}."
            )
        if not np.all(np.isfinite(values.to_numpy(dtype=np.float64))):
            raise ValueError(f"Continuous covariate adata.obs['{key}'] contains NaN or infinite values.")
    table = adata.obs[list(keys)].astype(np.float32)
    writes.append(("obsm", _CONT_COVS_COLUMN, table))
    return Field(
        "obsm",
        _CONT_COVS_COLUMN,
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
    """The source ``mapping`` (extended by the unseen values when ``extend``) and the sorted unseen values."""
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
            stacklevel=5,
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
    else:
        found = _backed.ScanResult(totals=np.zeros(0), dtype=np.dtype(matrix.dtype))
        if _backed.is_numeric(found.dtype):
            for block in _value_blocks(matrix):
                _backed.check_values(block, found)
    if not _backed.is_numeric(found.dtype):
        raise ValueError(f"{_matrix_name(layer)} has dtype {found.dtype}; scVI needs numeric counts.")
    _report_counts(found, layer)


def _report_counts(found: _backed.ScanResult, layer: str | None) -> None:
    problems = []
    if found.n_nan:
        problems.append(f"NaN values ({found.n_nan} entries)")
    if found.n_inf:
        problems.append(f"infinite values ({found.n_inf} entries)")
    if found.minimum < 0:
        problems.append(f"negative values (min {found.minimum})")
    if problems:
        raise ValueError(
            f"{_matrix_name(layer)} contains {' and '.join(problems)}; scVI needs raw, non-negative counts. "
            "Pass the layer with raw UMI counts via `layer=`."
        )
    if found.non_integer:
        warnings.warn(
            f"{_matrix_name(layer, quoted=False)} does not contain unnormalized count data. "
            "Are you sure this is what you want?",
            UserWarning,
            # _report_counts < _check_counts < _register_layer < _register_fields < setup_registry < caller
            stacklevel=6,
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
            f"{received[first]!r} where the model has {expected[first]!r}); the counts would be read against "
            "the wrong genes. Reorder the genes first: `adata = adata[:, model.adata.var_names].copy()` (or "
            "`SCVI.prepare_query_anndata(adata, model)`)."
        )
    raise ValueError(
        f"The AnnData's genes are not the model's: {len(missing)} of the model's genes are missing "
        f"(e.g. {list(missing[:5])}) and {len(unseen)} genes are unknown to the model "
        f"(e.g. {list(unseen[:5])}). "
        "Subset and order the genes as the model's, e.g. with `SCVI.prepare_query_anndata(adata, model)` "
        "(which fills missing genes with zeros)."
    )


def _warn_duplicated_names(adata) -> None:
    """Duplicated cell or gene names work, but results keyed by name become ambiguous."""
    for axis, names, fix in (
        ("gene", adata.var_names, "var_names_make_unique"),
        ("cell", adata.obs_names, "obs_names_make_unique"),
    ):
        if names.is_unique:
            continue
        duplicated = pd.unique(np.asarray(names[names.duplicated()], dtype=object))
        warnings.warn(
            f"{len(duplicated)} {axis} name(s) are duplicated (e.g. {list(duplicated[:3])}): results indexed "
            f"by {axis} name (DataFrames, gene_list, differential expression) will be ambiguous. "
            f"Call `adata.{fix}()` before setup_anndata.",
            UserWarning,
            stacklevel=6,
        )


def _warn_empty_cells(matrix, layer: str | None) -> None:
    """Cells without counts train (their library counts as 1 count) but their results mean nothing."""
    n_empty = int(np.sum(_row_totals(matrix) <= 0))
    if n_empty:
        warnings.warn(
            "This dataset has some empty cells, this might fail inference. Data should be filtered with "
            f"`scanpy.pp.filter_cells()`. ({n_empty} cell(s) have zero total counts in "
            f"{_matrix_name(layer)}: they are used with a library of 1 count and their latent representation "
            "and expression estimates are meaningless.)",
            UserWarning,
            stacklevel=6,
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
            stacklevel=5,
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
        available = [str(c) for c in adata.obs.columns]
        raise KeyError(f"{key} not found in adata.obs. Available columns: {available}.")
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


def _check_codes_in_range(adata, name: str, field: Field) -> None:
    if field.categories is not None:
        columns = {name: (adata.obs[field.attr_key].to_numpy(), len(field.categories))}
    elif "mappings" in field.state:
        table = adata.obsm[field.attr_key]
        mappings = field.state["mappings"]
        columns = {key: (np.asarray(table[key]), len(mapping)) for key, mapping in mappings.items()}
    else:
        return
    for column, (codes, n_categories) in columns.items():
        if codes.size and (codes.min() < 0 or codes.max() >= n_categories):
            raise ValueError(
                f"The codes of {column!r} in the AnnData do not fit the registry's {n_categories} "
                "categories. Run setup_anndata (or transfer the registry) again."
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
