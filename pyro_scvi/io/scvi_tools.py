"""scvi-tools 1.x save directories: reading, writing, parameter names and ``init_params_``.

scvi-tools 1.x writes ``<prefix>model.pt`` with ``torch.save`` as::

    {"model_state_dict": {scvi-tools parameter name: tensor, ..., "pyro_param_store": {...}},
     "var_names": ndarray(object),
     "attr_dict": {"registry_": ..., "init_params_": ..., "is_trained_": ..., "history_": {key: DataFrame},
                   "train_indices_": ndarray, ...}}

Its numpy arrays, DataFrames and ``defaultdict`` s are pickled objects; the file is read with the
allow-list of :mod:`pyro_scvi.io.safe_unpickle`, so nothing in it is executed.

Our module (:class:`pyro_scvi.models.module.SCVIModule`) has scvi-tools' layer layout under descriptive
names; :func:`to_scvi_tools_state_dict` / :func:`from_scvi_tools_state_dict` translate::

    log_dispersion                       <-> px_r
    library_log_means / library_log_vars <-> (same)
    z_encoder.{hidden,loc_head,var_head} <-> z_encoder.{encoder,mean_encoder,var_encoder}
    library_encoder.(same three)         <-> l_encoder.(same three)
    decoder.hidden                       <-> decoder.px_decoder
    decoder.scale_head                   <-> decoder.px_scale_decoder
    decoder.dispersion_head              <-> decoder.px_r_decoder
    decoder.zero_inflation_head          <-> decoder.px_dropout_decoder

and for scANVI (:class:`pyro_scvi.models.scanvi_module.SCANVIModule`)::

    y_prior                               <-> y_prior
    classifier.hidden                     <-> classifier.classifier.0
    classifier.logits                     <-> classifier.classifier.1 (linear classifier: .0)
    z2_encoder.{hidden,loc_head,var_head} <-> encoder_z2_z1.{encoder,mean_encoder,var_encoder}
    z1_decoder.{hidden,loc_head,var_head} <-> decoder_z1_z2.{decoder,mean_decoder,var_decoder}

(the ``fc_layers.Layer i.<slot>.<tensor>`` part below them is identical).

scANVI files also hold ``unlabeled_category_``, ``labels_`` and two legacy ``None`` histories in
``attr_dict``, and put the extra arguments under ``init_params_["kwargs"]["model_kwargs"]``.
Files from scvi-tools < 1.1 (registry ``scvi_version``) have a classifier whose outputs were
probabilities: they are read with ``classifier_softmax=True`` (see :func:`scanvi_classifier_softmax`).

``var_activation`` in ``init_params_``: scvi-tools stores the callable itself. On reading,
``torch.nn.functional.softplus`` and ``torch.nn.Softplus()`` are accepted (the latter rebuilt by
the safe loader from its ``beta``/``threshold`` only) and :func:`init_params_from_scvi_tools` turns
them into our name ``"softplus"``; ``torch.exp`` is pickled through ``getattr`` and is therefore
refused. On writing, ``None``/``"exp"`` is dropped (scvi-tools' default is ``torch.exp``) and
``"softplus"`` is written as ``torch.nn.functional.softplus``.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .model_file import atomic_torch_save, model_file_path, prepare_target, read_payload
from .native import from_safe, history_from_safe, is_native

__all__ = [
    "SCVI_TOOLS_VERSION",
    "to_scvi_tools_state_dict",
    "from_scvi_tools_state_dict",
    "read_scvi_tools_model",
    "scvi_tools_model_from_payload",
    "attrs_from_scvi_tools",
    "write_scvi_tools_model",
    "init_params_from_scvi_tools",
    "init_params_to_scvi_tools",
    "scanvi_classifier_softmax",
]

#: Version written into registries that have none (scvi-tools reads the registry as its own).
SCVI_TOOLS_VERSION = "1.4.2"
_PYRO_PARAM_STORE = "pyro_param_store"
_EMPTY_PARAM_STORE = {"params": {}, "constraints": {}}
_SPLITS = ("train_indices_", "validation_indices_", "test_indices_")

# --------------------------------------------------------------------------------------------
# State-dict names
# --------------------------------------------------------------------------------------------

_FC = (r"fc_layers\.Layer \d+\."
       r"(0\.(weight|bias)|1\.(weight|bias|running_mean|running_var|num_batches_tracked))")
_LINEAR = r"(weight|bias)"
_SCALE = r"0\.(weight|bias)"
# (our child name, scvi-tools child name, pattern of the remainder)
_ENCODER_PARTS = [("hidden", "encoder", _FC), ("loc_head", "mean_encoder", _LINEAR),
                  ("var_head", "var_encoder", _LINEAR)]
_DECODER_PARTS = [
    ("hidden", "px_decoder", _FC),
    ("scale_head", "px_scale_decoder", _SCALE),
    ("dispersion_head", "px_r_decoder", _LINEAR),
    ("zero_inflation_head", "px_dropout_decoder", _LINEAR),
]
_Z1_DECODER_PARTS = [("hidden", "decoder", _FC), ("loc_head", "mean_decoder", _LINEAR),
                     ("var_head", "var_decoder", _LINEAR)]
# scANVI's classifier: hidden block then linear layer (``classifier.0``/``.1``), or the linear layer
# alone (``classifier.0``); both logits names are read, the one written depends on the hidden block
_CLASSIFIER_PARTS = [("hidden", "classifier.0", _FC), ("logits", "classifier.1", _LINEAR),
                     ("logits", "classifier.0", _LINEAR)]
_MODULES = [("z_encoder", "z_encoder", _ENCODER_PARTS), ("library_encoder", "l_encoder", _ENCODER_PARTS),
            ("decoder", "decoder", _DECODER_PARTS), ("classifier", "classifier", _CLASSIFIER_PARTS),
            ("z2_encoder", "encoder_z2_z1", _ENCODER_PARTS),
            ("z1_decoder", "decoder_z1_z2", _Z1_DECODER_PARTS)]
_TOP_LEVEL = [("log_dispersion", "px_r"), ("library_log_means", "library_log_means"),
              ("library_log_vars", "library_log_vars"),
              ("batch_embedding.weight", "_embeddings_dict.batch.weight"), ("y_prior", "y_prior")]


def _rename_table(ours_to_theirs: bool, linear_classifier: bool = False
                  ) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Top-level names and ``(source prefix, target prefix, remainder pattern)``, first match wins;
    ``linear_classifier`` picks the scvi-tools name our ``classifier.logits`` is written under."""
    top = {o: t for o, t in _TOP_LEVEL} if ours_to_theirs else {t: o for o, t in _TOP_LEVEL}
    prefixes = []
    for mod_ours, mod_theirs, parts in _MODULES:
        if mod_ours == "classifier" and ours_to_theirs and linear_classifier:
            parts = [parts[0], parts[2]]
        for part_ours, part_theirs, pattern in parts:
            ours, theirs = f"{mod_ours}.{part_ours}.", f"{mod_theirs}.{part_theirs}."
            prefixes.append((ours, theirs, pattern) if ours_to_theirs else (theirs, ours, pattern))
    return top, prefixes


def _rename(state_dict: Mapping[str, Any], ours_to_theirs: bool, drop: tuple[str, ...] = ()) -> OrderedDict:
    linear = not any(str(key).startswith("classifier.hidden.") for key in state_dict)
    top, prefixes = _rename_table(ours_to_theirs, linear_classifier=linear)
    renamed: OrderedDict = OrderedDict()
    unknown = []
    for key, value in state_dict.items():
        if key in drop:
            continue
        new_key = top.get(key)
        if new_key is None:
            for source, target, pattern in prefixes:
                if key.startswith(source) and re.fullmatch(pattern, key[len(source):]):
                    new_key = target + key[len(source):]
                    break
        if new_key is None:
            unknown.append(key)
        elif new_key in renamed:
            raise ValueError(f"State-dict key {key!r} renames to {new_key!r}, which an earlier key already "
                             "gave (e.g. a linear and a non-linear scANVI classifier in one file).")
        else:
            renamed[new_key] = value
    if unknown:
        side = "pyro-scvi" if ours_to_theirs else "scvi-tools"
        raise ValueError(
            f"Unknown {side} state-dict key(s), no counterpart in the other naming: {unknown}. "
            "(Parameters of modules pyro-scvi does not have cannot be converted.)"
        )
    return renamed


def to_scvi_tools_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict:
    """Rename a :class:`~pyro_scvi.models.module.SCVIModule` state dict to scvi-tools' ``VAE`` names.

    Values are passed through unchanged; a key with no scvi-tools counterpart raises ``ValueError``.
    """
    return _rename(state_dict, ours_to_theirs=True)


def from_scvi_tools_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict:
    """Rename an scvi-tools ``VAE`` state dict to our names (dropping ``"pyro_param_store"``).

    Values are passed through unchanged; a key with no pyro-scvi counterpart raises ``ValueError``.
    """
    return _rename(state_dict, ours_to_theirs=False, drop=(_PYRO_PARAM_STORE,))


# --------------------------------------------------------------------------------------------
# init_params_
# --------------------------------------------------------------------------------------------

_DROPPED_INIT_PARAMS = ("use_cuda", "unlabeled_category", "pretrained_model", "datamodule")
#: the ``**kwargs`` group name scvi-tools' model classes save their extra arguments under
_KWARGS_GROUP = {"SCANVI": "model_kwargs"}
#: scvi-tools releases before this (major, minor) saved scANVI classifiers ending in a softmax
_SCANVI_LOGITS_SINCE = (1, 1)


def _activation_name(value):
    if value is None or value == "exp" or value is torch.exp:
        return "exp"
    if value == "softplus" or value is F.softplus or (
        isinstance(value, nn.Softplus) and value.beta == 1 and value.threshold == 20
    ):
        return "softplus"
    return value  # left for the model to refuse with its own message


def init_params_from_scvi_tools(init_params: Mapping) -> dict:
    """scvi-tools' ``init_params_`` (1.x nested or pre-0.15 flat layout) in our layout.

    Returns ``{"non_kwargs": {...}, "kwargs": {"kwargs": {...}}}``: nested ``kwargs`` groups are
    flattened into one, ``use_cuda`` (and scANVI's ``unlabeled_category``/``pretrained_model``) are
    dropped, and ``var_activation`` becomes ``"exp"``/``"softplus"`` when it is one of those.
    """
    init_params = from_safe(dict(init_params))
    if "non_kwargs" in init_params:
        non_kwargs = dict(init_params["non_kwargs"])
        groups = init_params.get("kwargs") or {}
    else:  # legacy flat layout: dict values are **kwargs groups
        non_kwargs = {k: v for k, v in init_params.items() if not isinstance(v, dict)}
        groups = {k: v for k, v in init_params.items() if isinstance(v, dict)}
    kwargs = {k: v for group in groups.values() for k, v in dict(group).items()}
    for name in _DROPPED_INIT_PARAMS:
        non_kwargs.pop(name, None)
    if "var_activation" in kwargs:
        kwargs["var_activation"] = _activation_name(kwargs["var_activation"])
    return {"non_kwargs": non_kwargs, "kwargs": {"kwargs": kwargs}}


def init_params_to_scvi_tools(init_params: Mapping, kwargs_group: str = "kwargs") -> dict:
    """Our ``init_params_`` in the layout scvi-tools 1.x saves (``var_activation`` as a callable).

    ``var_activation`` ``None``/``"exp"`` is dropped (scvi-tools then uses its default
    ``torch.exp``); ``"softplus"`` is written as ``torch.nn.functional.softplus``. The extra
    arguments go under ``kwargs_group`` (scvi-tools' SCVI: ``"kwargs"``, SCANVI: ``"model_kwargs"``).
    """
    normalized = init_params_from_scvi_tools(init_params)
    kwargs = dict(normalized["kwargs"]["kwargs"])
    if "var_activation" in kwargs:
        name = _activation_name(kwargs.pop("var_activation"))
        if name == "softplus":
            kwargs["var_activation"] = F.softplus
        elif name != "exp":
            raise ValueError(f"cannot export var_activation={name!r} to scvi-tools.")
    return {"non_kwargs": dict(normalized["non_kwargs"]), "kwargs": {kwargs_group: kwargs}}


def _version(registry: Mapping) -> tuple[int, int] | None:
    match = re.match(r"\s*(\d+)\.(\d+)", str(registry.get("scvi_version") or ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


def scanvi_classifier_softmax(registry: Mapping) -> bool:
    """Whether scvi-tools' SCANVI reads this file's classifier as ending in a softmax: files from
    scvi-tools < 1.1 (registry ``scvi_version``), whose classifier outputs were probabilities."""
    version = _version(registry)
    return version is not None and version < _SCANVI_LOGITS_SINCE


def _scanvi_init_params_from_scvi_tools(init_params: dict, registry: Mapping) -> dict:
    """scANVI's extra arguments in ours: ``y_prior`` dropped (the state dict holds it), the classifier
    options that differ from what scvi-tools derives kept, ``classifier_softmax=True`` for a < 1.1 file."""
    non_kwargs, kwargs = init_params["non_kwargs"], dict(init_params["kwargs"]["kwargs"])
    kwargs.pop("y_prior", None)
    if kwargs.pop("use_labels_groups", False):
        raise ValueError("This SCANVI was trained with use_labels_groups=True (a grouped classifier), "
                         "which pyro-scvi does not have.")
    kwargs.pop("labels_groups", None)
    linear = bool(non_kwargs.get("linear_classifier", False))
    default = {"n_layers": 0 if linear else non_kwargs.get("n_layers", 1),
               "n_hidden": 0 if linear else non_kwargs.get("n_hidden", 128),
               "dropout_rate": non_kwargs.get("dropout_rate", 0.1), "logits": True}
    custom = {k: v for k, v in dict(kwargs.pop("classifier_parameters", None) or {}).items()
              if default.get(k, object()) != v}
    if custom:
        kwargs["classifier_parameters"] = custom  # the module refuses options it lacks, by name
    if scanvi_classifier_softmax(registry):
        kwargs["classifier_softmax"] = True
    return {"non_kwargs": non_kwargs, "kwargs": {"kwargs": kwargs}}


def _scanvi_init_params_to_scvi_tools(init_params: Mapping, registry: Mapping) -> dict:
    """Our SCANVI's ``init_params_`` for scvi-tools: ``y_prior`` left to the state dict and
    ``classifier_softmax`` to the registry's version (scvi-tools decides from it)."""
    normalized = init_params_from_scvi_tools(init_params)
    kwargs = normalized["kwargs"]["kwargs"]
    kwargs.pop("y_prior", None)
    if kwargs.pop("classifier_softmax", False) and not scanvi_classifier_softmax(registry):
        raise ValueError(
            "This SCANVI's classifier ends in a softmax (an scvi-tools < 1.1 file), but its registry's "
            f"scvi_version {registry.get('scvi_version')!r} would make scvi-tools read the outputs as "
            "logits; save it in pyro-scvi's format instead.")
    return init_params_to_scvi_tools(normalized, kwargs_group=_KWARGS_GROUP["SCANVI"])


# --------------------------------------------------------------------------------------------
# Reading and writing scvi-tools directories
# --------------------------------------------------------------------------------------------


def scvi_tools_model_from_payload(path: Path, payload: dict) -> dict:
    """The parts of a loaded scvi-tools payload, as :func:`read_scvi_tools_model` returns them."""
    if is_native(payload):
        raise ValueError(f"{path} was written by pyro-scvi, not scvi-tools; "
                         "load it with pyro_scvi.SCVI.load.")
    state_dict = from_scvi_tools_state_dict(payload["model_state_dict"])
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state-dict entries that are not tensors: {bad}.")
    var_names = payload.get("var_names")
    if var_names is None:
        raise ValueError(f"{path} has no var_names.")
    var_names = np.asarray([str(v) for v in np.asarray(var_names, dtype=object).ravel()], dtype=object)
    return {"model_state_dict": state_dict, "var_names": var_names, "attr_dict": payload["attr_dict"]}


def read_scvi_tools_model(dir_path, prefix: str | None = None, map_location="cpu") -> dict:
    """Read ``<dir_path>/<prefix>model.pt`` written by scvi-tools 1.x without executing code.

    Returns ``{"model_state_dict": <our names>, "var_names": ndarray of str,
    "attr_dict": <as saved>}``. ``attr_dict`` keeps scvi-tools' objects: ``registry_`` with numpy
    arrays for category mappings, ``init_params_`` (see :func:`init_params_from_scvi_tools`),
    ``history_`` as a dict of DataFrames (or None), index arrays, ...

    Raises ``ValueError`` for a missing file (pointing to ``convert_legacy_save`` for pre-0.15
    directories), an unreadable file, a file that needs a global outside the safe loader's
    allow-list, a pyro-scvi file, or state-dict keys with no pyro-scvi counterpart.
    """
    path, payload = read_payload(dir_path, prefix, map_location)
    return scvi_tools_model_from_payload(path, payload)


def attrs_from_scvi_tools(raw: Mapping) -> dict:
    """scvi-tools' ``attr_dict`` as :class:`pyro_scvi.SCVI` keeps it: ``registry_`` (plain dicts),
    ``init_params_`` in our layout, ``is_trained_``, ``history_`` (float DataFrames or None) and the
    split indices (int arrays or None)."""
    history = raw.get("history_")
    init_params = init_params_from_scvi_tools(raw["init_params_"])
    if raw["registry_"].get("model_name") == "SCANVI":
        init_params = _scanvi_init_params_from_scvi_tools(init_params, raw["registry_"])
    attrs = {
        "registry_": _plain(raw["registry_"]),
        "init_params_": init_params,
        "is_trained_": bool(raw.get("is_trained_", False)),
        "history_": None if history is None else {k: v.astype(float) for k, v in history.items()},
    }
    for key in _SPLITS:
        attrs[key] = _indices(raw.get(key))
    return attrs


def _plain(obj):
    """Deep copy with ``defaultdict``/mappings turned into plain dicts (numpy arrays kept)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return copy.deepcopy(obj)


def _registry_for_scvi_tools(registry) -> dict:
    if hasattr(registry, "to_dict"):  # a typed registry
        registry = registry.to_dict()
    registry = _plain(from_safe(_plain(registry)))
    # an extra "pyro_scvi_version" key is kept: scvi-tools 1.4 ignores unknown registry keys on load
    registry.setdefault("scvi_version", SCVI_TOOLS_VERSION)
    registry.setdefault("model_name", "SCVI")
    registry.setdefault("setup_method_name", "setup_anndata")
    return registry


def _history_for_scvi_tools(history):
    if history is None:
        return None
    out = {}
    for key, value in history.items():
        if isinstance(value, pd.DataFrame):
            out[key] = value.copy()
        elif isinstance(value, Mapping) and "epoch" in value and "value" in value:  # pyro-scvi's safe layout
            out[key] = history_from_safe({key: value})[key]
        else:
            raise ValueError(f"history_[{key!r}] is neither a DataFrame "
                             "nor {'epoch': [...], 'value': [...]}.")
    return out


def _indices(value):
    if value is None:
        return None
    value = from_safe(value)
    return np.asarray(value, dtype=np.int64).ravel()


def write_scvi_tools_model(
    dir_path,
    state_dict: Mapping[str, torch.Tensor],
    var_names,
    attr_dict: Mapping[str, Any],
    prefix: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``<dir_path>/<prefix>model.pt`` in scvi-tools 1.x format (loads with ``scvi.model.SCVI.load``).

    ``state_dict`` uses our names; ``attr_dict`` holds ``registry_`` (scvi-tools layout, numpy or
    pyro-scvi tagged arrays), ``init_params_`` (see :func:`init_params_to_scvi_tools`),
    ``is_trained_``, ``history_`` (dict of DataFrames, or pyro-scvi's column layout, or None),
    ``train_indices_``/``validation_indices_``/``test_indices_``; other entries are copied as they
    are. An existing ``dir_path`` needs ``overwrite=True``; the file is replaced atomically.
    """
    attrs = dict(attr_dict)
    for required in ("registry_", "init_params_"):
        if required not in attrs:
            raise ValueError(f"attr_dict needs {required!r} for scvi-tools to load the model.")
    model_state = to_scvi_tools_state_dict({k: v.detach().cpu() for k, v in state_dict.items()})
    model_state[_PYRO_PARAM_STORE] = copy.deepcopy(_EMPTY_PARAM_STORE)
    attrs["registry_"] = _registry_for_scvi_tools(attrs["registry_"])
    if attrs["registry_"]["model_name"] == "SCANVI":
        labels_state = attrs["registry_"]["field_registries"]["labels"]["state_registry"]
        # scvi-tools reads it there when transferring the setup; the unlabeled category is always last
        labels_state.setdefault("unlabeled_category", labels_state["categorical_mapping"][-1])
        attrs["init_params_"] = _scanvi_init_params_to_scvi_tools(attrs["init_params_"], attrs["registry_"])
        if "unlabeled_category_" not in attrs:
            attrs["unlabeled_category_"] = labels_state["unlabeled_category"]
        attrs.setdefault("unsupervised_history_", None)
        attrs.setdefault("semisupervised_history_", None)
    else:
        attrs["init_params_"] = init_params_to_scvi_tools(attrs["init_params_"])
    attrs["is_trained_"] = bool(attrs.get("is_trained_", False))
    attrs["history_"] = _history_for_scvi_tools(attrs.get("history_"))
    for key in _SPLITS:
        if key in attrs:
            attrs[key] = _indices(attrs[key])
    names = np.asarray([str(v) for v in np.asarray(var_names, dtype=object).ravel()], dtype=object)
    target = prepare_target(dir_path, overwrite)
    atomic_torch_save({"model_state_dict": model_state, "var_names": names, "attr_dict": attrs},
                      model_file_path(target, prefix))

