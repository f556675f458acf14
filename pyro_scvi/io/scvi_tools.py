"""Read and write scvi-tools' save directories without running code from them.

scvi-tools 1.x writes ``<prefix>model.pt`` with ``torch.save`` as::

    {"model_state_dict": {scvi-tools parameter name: tensor, ..., "pyro_param_store": {...}},
     "var_names": ndarray(object),
     "attr_dict": {"registry_": ..., "init_params_": ..., "is_trained_": ..., "history_": {key: DataFrame},
                   "train_indices_": ndarray, ...}}

Its numpy arrays, pandas DataFrames and ``defaultdict`` s are pickled Python objects, so scvi-tools
reads the file with ``weights_only=False``, which would run any code a crafted file carries. Here
the file is read with ``torch.load(weights_only=True)`` and an explicit allow-list of pure-data
reconstructors (:data:`ALLOWED_GLOBALS`); a file that needs any other global is refused with a
``ValueError`` naming it. numpy's reconstructors are wrapped, because as they are they let a
file forge object pointers (``ndarray(..., buffer=...)`` with an object dtype, or a dtype whose
pickled state adds object fields): only plain dtypes and checked array states get through, and
the arrays come back as ordinary ``np.ndarray``. Pre-0.15 saves (``model_params.pt``, ``var_names.csv``, ``attr.pkl``)
are read with a restricted unpickler that enforces the same allow-list, and
:func:`convert_legacy_save` rewrites them in the current layout.

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

(the ``fc_layers.Layer i.<slot>.<tensor>`` part below them is identical).

``var_activation`` in ``init_params_``: scvi-tools stores the callable itself. On reading,
``torch.nn.functional.softplus`` and ``torch.nn.Softplus()`` are accepted (the latter rebuilt by us
from its ``beta``/``threshold`` only) and :func:`init_params_from_scvi_tools` turns them into our
names ``"softplus"``; ``torch.exp`` is pickled through ``getattr`` and is therefore refused. On
writing, ``None``/``"exp"`` is dropped (scvi-tools' default is ``torch.exp``) and ``"softplus"``
is written as ``torch.nn.functional.softplus``.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import copy
import os
import pickle
import pprint
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .native import FORMAT, from_safe, history_from_safe

__all__ = [
    "ALLOWED_GLOBALS",
    "SCVI_TOOLS_VERSION",
    "to_scvi_tools_state_dict",
    "from_scvi_tools_state_dict",
    "read_scvi_tools_model",
    "write_scvi_tools_model",
    "convert_legacy_save",
    "registry_from_legacy_setup_dict",
    "init_params_from_scvi_tools",
    "init_params_to_scvi_tools",
    "load_registry",
    "view_setup_args",
]

#: Version written into registries that have none (scvi-tools reads the registry as its own).
SCVI_TOOLS_VERSION = "1.4.2"
_PYRO_PARAM_STORE = "pyro_param_store"
_EMPTY_PARAM_STORE = {"params": {}, "constraints": {}}

# --------------------------------------------------------------------------------------------
# State-dict names
# --------------------------------------------------------------------------------------------

_FC = r"fc_layers\.Layer \d+\.(0\.(weight|bias)|1\.(weight|bias|running_mean|running_var|num_batches_tracked))"
_LINEAR = r"(weight|bias)"
_SCALE = r"0\.(weight|bias)"
# (our child name, scvi-tools child name, pattern of the remainder)
_ENCODER_PARTS = [("hidden", "encoder", _FC), ("loc_head", "mean_encoder", _LINEAR), ("var_head", "var_encoder", _LINEAR)]
_DECODER_PARTS = [
    ("hidden", "px_decoder", _FC),
    ("scale_head", "px_scale_decoder", _SCALE),
    ("dispersion_head", "px_r_decoder", _LINEAR),
    ("zero_inflation_head", "px_dropout_decoder", _LINEAR),
]
_MODULES = [("z_encoder", "z_encoder", _ENCODER_PARTS), ("library_encoder", "l_encoder", _ENCODER_PARTS),
            ("decoder", "decoder", _DECODER_PARTS)]
_TOP_LEVEL = [("log_dispersion", "px_r"), ("library_log_means", "library_log_means"),
              ("library_log_vars", "library_log_vars"), ("batch_embedding.weight", "_embeddings_dict.batch.weight")]


def _rename_table(ours_to_theirs: bool) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    top = {o: t for o, t in _TOP_LEVEL} if ours_to_theirs else {t: o for o, t in _TOP_LEVEL}
    prefixes = []
    for mod_ours, mod_theirs, parts in _MODULES:
        for part_ours, part_theirs, pattern in parts:
            ours, theirs = f"{mod_ours}.{part_ours}.", f"{mod_theirs}.{part_theirs}."
            prefixes.append((ours, theirs, pattern) if ours_to_theirs else (theirs, ours, pattern))
    return top, prefixes


def _rename(state_dict: Mapping[str, Any], ours_to_theirs: bool, drop: tuple[str, ...] = ()) -> OrderedDict:
    top, prefixes = _rename_table(ours_to_theirs)
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
# The allow-list
#
# Every name a pickle may reference maps to a pure-data reconstructor. numpy's own reconstructors
# are *not* safe as they are: ``numpy.ndarray(shape, dtype("O"), buffer=...)`` turns raw bytes into
# object pointers, and ``dtype.__setstate__`` on a fresh dtype accepts object fields with forged
# flags, after which an array's raw bytes become object pointers too (both crash or worse). So the
# numpy names map to wrappers: ``numpy.dtype`` only builds plain (non-structured) dtypes from their
# type code, ``numpy.ndarray`` is only accepted as the subtype given to ``_reconstruct``, and array
# state is checked before numpy sees it. pandas names are the real reconstructors (their state is
# bounds-checked), with arrays passed on as plain ndarrays.
# --------------------------------------------------------------------------------------------


def _defaultdict_as_dict(default_factory=None, *args):
    """Stand-in for ``collections.defaultdict``: an empty plain ``dict`` (the factory is ignored).

    torch's restricted unpickler only fills plain dicts, and a registry needs no default factory.
    """
    return {}


class _SoftplusRecord:
    """Stand-in for a pickled ``torch.nn.Softplus``: keeps ``beta``/``threshold``, drops the rest.

    After loading it is replaced by a ``torch.nn.Softplus`` we build ourselves, so no module state
    (hooks, submodules) from the file survives.
    """

    def __setstate__(self, state):
        state = state if isinstance(state, dict) else {}
        self.beta = float(state.get("beta", 1.0))
        self.threshold = float(state.get("threshold", 20.0))


def _numpy_modules():
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray, numeric


_MULTIARRAY, _NUMERIC = _numpy_modules()
# type codes numpy writes for plain dtypes: bool, (u)ints, floats, complex, object, str, bytes
_DTYPE_CODE = re.compile(r"b1|[iu](1|2|4|8)|f(2|4|8|16)|c(8|16|32)|O(4|8)|[US]\d{1,9}")


class _DTypeRecord:
    """What ``numpy.dtype(code, align, copy)`` gives while unpickling: a plain type code whose
    ``BUILD`` state is only recorded; :func:`_resolve_dtype` turns it into a real dtype."""

    def __init__(self, code: str) -> None:
        self.code, self.state = code, None

    def __setstate__(self, state):
        self.state = state


def _safe_dtype(code, align=False, copy=False):
    if not isinstance(code, str) or not _DTYPE_CODE.fullmatch(code):
        raise pickle.UnpicklingError(f"global 'numpy.dtype({code!r})' is not allowed (only plain, non-structured dtypes)")
    return _DTypeRecord(code)


def _resolve_dtype(spec) -> np.dtype:
    """The real dtype of a :class:`_DTypeRecord`, after checking its state is a plain dtype's."""
    if not isinstance(spec, _DTypeRecord):
        raise pickle.UnpicklingError(f"global '{type(spec).__qualname__} as numpy dtype' is not allowed")
    dtype = np.dtype(spec.code)
    if spec.state is not None:
        state = spec.state
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) == 8):
            raise ValueError(f"unsupported numpy dtype state {state!r}")
        _, byteorder, subarray, names, fields, elsize, _, _ = state
        if subarray is not None or names is not None or fields is not None:
            raise pickle.UnpicklingError("global 'structured numpy dtype' is not allowed")
        if byteorder not in ("<", ">", "|", "=") or elsize not in (-1, dtype.itemsize):
            raise ValueError(f"inconsistent numpy dtype state {state!r} for {spec.code!r}")
        if byteorder in "<>" and dtype.byteorder != "|":
            dtype = dtype.newbyteorder(byteorder)
    return dtype


class _NDArrayMarker:
    """What the global ``numpy.ndarray`` resolves to: only accepted as ``_reconstruct``'s subtype."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("global 'numpy.ndarray(...)' is not allowed (only via numpy's _reconstruct)")


class _SafeArray(np.ndarray):
    """Array under construction; its ``__setstate__`` checks the state before numpy's runs.

    Turned into a plain ``np.ndarray`` view once loaded (:func:`_finalize`).
    """

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("global '_SafeArray(...)' is not allowed")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("unsupported numpy array state")
        version, (shape, dtype, is_fortran, data) = (state[0], state[1:]) if len(state) == 5 else (None, state)
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError(f"bad numpy array shape {shape!r}")
        dtype = _resolve_dtype(dtype)
        if dtype.hasobject != isinstance(data, list) or not isinstance(data, (list, bytes, bytearray, str)):
            raise ValueError("numpy array data does not match its dtype")
        if not isinstance(is_fortran, bool):
            raise ValueError("bad numpy array order flag")
        checked = (shape, dtype, is_fortran, data) if version is None else (version, shape, dtype, is_fortran, data)
        np.ndarray.__setstate__(self, checked)


def _plain_array(value):
    return value.view(np.ndarray) if isinstance(value, _SafeArray) else value


def _safe_reconstruct(subtype, shape, typecode):
    if subtype is not _NDArrayMarker:
        raise pickle.UnpicklingError(f"global '_reconstruct({getattr(subtype, '__qualname__', subtype)!r})' is not allowed")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"bad numpy array shape {shape!r}")
    return _MULTIARRAY._reconstruct(_SafeArray, shape, typecode)


def _safe_scalar(dtype, data=None):
    dtype = _resolve_dtype(dtype)
    if not dtype.hasobject and not (isinstance(data, (bytes, str)) and len(data) == dtype.itemsize):
        raise ValueError("numpy scalar data does not match its dtype")
    return _MULTIARRAY.scalar(dtype, data)


def _safe_frombuffer(buffer, dtype, shape, order):
    dtype = _resolve_dtype(dtype)
    if dtype.hasobject:
        raise ValueError("cannot create an object array from a buffer")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)) or order not in ("C", "F"):
        raise ValueError("bad numpy array shape or order")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy(order=order)


def _safe_unpickle_block(values, placement, ndim):
    from pandas._libs.internals import _unpickle_block

    return _unpickle_block(_plain_array(values), _plain_array(placement), ndim)


class _IndexMarker:
    """What the global ``pandas...Index`` resolves to: only accepted as ``_new_Index``'s class."""

    pandas_class = pd.Index

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("global 'pandas Index(...)' is not allowed (only via pandas' _new_Index)")


class _RangeIndexMarker(_IndexMarker):
    pandas_class = pd.RangeIndex


def _safe_new_index(cls, data):
    from pandas.core.indexes.base import _new_Index

    if cls is not _IndexMarker and cls is not _RangeIndexMarker:
        raise pickle.UnpicklingError(f"global '_new_Index({getattr(cls, '__qualname__', cls)!r})' is not allowed")
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise ValueError("bad pandas Index state")
    return _new_Index(cls.pandas_class, {key: _plain_array(value) for key, value in data.items()})


def _build_allowed_globals() -> dict[str, Any]:
    """Global name (as written in the pickle) -> the object the unpickler gets for it."""
    from pandas.core.internals.managers import BlockManager

    allowed: dict[str, Any] = {}
    for core in ("numpy._core", "numpy.core"):  # numpy 2.x / 1.x spelling
        allowed[f"{core}.multiarray._reconstruct"] = _safe_reconstruct  # empty array, filled by BUILD
        allowed[f"{core}.multiarray.scalar"] = _safe_scalar  # numpy scalar from (dtype, raw bytes)
        allowed[f"{core}.numeric._frombuffer"] = _safe_frombuffer  # arrays under pickle protocol 5
    allowed["numpy.ndarray"] = _NDArrayMarker
    allowed["numpy.dtype"] = _safe_dtype
    allowed["pandas.core.frame.DataFrame"] = pd.DataFrame  # history tables; __setstate__ takes a BlockManager
    allowed["pandas.core.internals.managers.BlockManager"] = BlockManager  # blocks + axes, bounds-checked
    allowed["pandas._libs.internals._unpickle_block"] = _safe_unpickle_block  # Block(values, placement, ndim)
    allowed["pandas.core.indexes.base._new_Index"] = _safe_new_index  # Index/RangeIndex from their data
    allowed["pandas.core.indexes.base.Index"] = _IndexMarker
    allowed["pandas.core.indexes.range.RangeIndex"] = _RangeIndexMarker
    for old in ("Int64Index", "UInt64Index", "Float64Index", "NumericIndex"):  # pandas < 2 pickles
        allowed[f"pandas.core.indexes.numeric.{old}"] = _IndexMarker
    allowed["_codecs.encode"] = codecs.encode  # bytes under pickle protocol 2 (torch allows it by default too)
    allowed["builtins.slice"] = slice  # block placements
    allowed["builtins.bytes"] = bytes  # empty bytes under pickle protocol 2
    allowed["builtins.dict"] = dict  # the factory argument of defaultdict(dict)
    allowed["collections.defaultdict"] = _defaultdict_as_dict
    allowed["torch._C._nn.softplus"] = F.softplus  # var_activation=torch.nn.functional.softplus
    allowed["torch.nn.modules.activation.Softplus"] = _SoftplusRecord  # var_activation=torch.nn.Softplus()
    return allowed


#: Every global a file may reference, by the name the pickle uses, mapped to what it becomes.
ALLOWED_GLOBALS: dict[str, Any] = _build_allowed_globals()
_ALLOWED_VALUES = list(ALLOWED_GLOBALS.values())
# Types whose instances may receive BUILD (state); the first three are never reachable by name.
_BUILD_ONLY = (_SafeArray, _DTypeRecord, _SoftplusRecord)
_BUILDABLE_TYPES = frozenset((*_BUILD_ONLY, pd.DataFrame, ALLOWED_GLOBALS["pandas.core.internals.managers.BlockManager"]))


def _torch_safe_globals():
    if not hasattr(torch.serialization, "safe_globals"):  # pragma: no cover - old torch
        raise RuntimeError("Reading scvi-tools files safely needs torch >= 2.6 (torch.serialization.safe_globals).")
    entries = [(obj, name) for name, obj in ALLOWED_GLOBALS.items()]
    # torch only BUILDs types it finds among allowed values; a name with a newline can never be
    # written by a GLOBAL opcode, so these stay unreachable as callables.
    entries += [(cls, f"pyro_scvi\n{cls.__qualname__}") for cls in _BUILD_ONLY]
    return torch.serialization.safe_globals(entries)


_REFUSAL_PATTERNS = [
    r"Unsupported global: GLOBAL (\S+) was not an allowed global",
    r"Trying to load unsupported GLOBAL (\S+) whose module",
    r"Trying to call reduce for unrecognized function (.+?)(?: which belongs|$)",
    r"Can only create new object for nn\.Parameter or classes allowlisted via `add_safe_globals` but got (.+)",
    r"Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got (.+)",
    r"(?:Can only SETITEMS?|Can only append|Can only extend) .*?but got (.+)",
    r"global '(.+?)' is not allowed",  # our wrappers and legacy unpickler
]


def _refused_name(message: str) -> str | None:
    for pattern in _REFUSAL_PATTERNS:
        match = re.search(pattern, message, flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
    return None


def _refusal_error(path, name: str) -> ValueError:
    return ValueError(
        f"Refusing to load {path}: it needs the Python global `{name}`, which is not on pyro-scvi's "
        "allow-list of pure-data reconstructors (numpy arrays/dtypes/scalars, pandas DataFrames and "
        "Indexes, dict/defaultdict, slice, bytes, softplus). Unpickling it could run code from the file."
    )


def _safe_torch_load(path: Path, map_location="cpu"):
    """``torch.load(weights_only=True)`` with the allow-list; every failure becomes ``ValueError``."""
    try:
        with _torch_safe_globals():
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        name = _refused_name(str(error))
        if name is not None:
            raise _refusal_error(path, name) from None
        raise ValueError(f"{path} is not a readable model file (truncated or corrupted?): {_first_line(error)}") from None
    except FileNotFoundError:
        raise
    except Exception as error:  # zip/pickle structure errors, allowed reconstructors fed bad arguments
        raise ValueError(f"{path} is not a readable model file (truncated or corrupted?): "
                         f"{type(error).__name__}: {_first_line(error)}") from None
    return _finalize(payload)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return text.splitlines()[0] if text else type(error).__name__


def _finalize(obj):
    """Swap construction-time stand-ins for real objects (through nested dicts/lists/tuples and
    object arrays): checked arrays -> plain ``np.ndarray``, dtype records -> dtypes, softplus
    records -> a ``torch.nn.Softplus`` we build."""
    if isinstance(obj, _SafeArray):
        array = obj.view(np.ndarray)
        if array.dtype.hasobject:
            for index in np.ndindex(array.shape):
                array[index] = _finalize(array[index])
        return array
    if isinstance(obj, _DTypeRecord):
        return _resolve_dtype(obj)
    if isinstance(obj, _SoftplusRecord):
        return nn.Softplus(beta=obj.beta, threshold=obj.threshold)
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _finalize(value)
        return obj
    if isinstance(obj, list):
        return [_finalize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finalize(v) for v in obj)
    return obj


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler that resolves only :data:`ALLOWED_GLOBALS` and, like torch's
    ``weights_only`` unpickler, only calls allowed callables and only ``BUILD`` s allowed types."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # Python 2 names written by protocols 0-2 (as pickle does)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full_name = f"{module}.{name}"
        if full_name not in ALLOWED_GLOBALS or "\n" in full_name:
            raise pickle.UnpicklingError(f"global '{full_name}' is not allowed")
        return ALLOWED_GLOBALS[full_name]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("global 'persistent_load' is not allowed")

    def _check_callable(self, func):
        if not any(func is allowed for allowed in _ALLOWED_VALUES):
            raise pickle.UnpicklingError(f"global '{getattr(func, '__qualname__', type(func).__name__)}' is not allowed")

    def load_reduce(self):
        self._check_callable(self.stack[-2])
        super().load_reduce()

    def load_newobj(self):
        self._check_callable(self.stack[-2])
        super().load_newobj()

    def load_newobj_ex(self):
        self._check_callable(self.stack[-3])
        super().load_newobj_ex()

    def _instantiate(self, klass, args):  # INST / OBJ opcodes
        self._check_callable(klass)
        super()._instantiate(klass, args)

    def load_build(self):
        inst = self.stack[-2]
        if type(inst) not in _BUILDABLE_TYPES:
            raise pickle.UnpicklingError(f"global '{type(inst).__module__}.{type(inst).__qualname__}' is not allowed")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def _safe_unpickle(path: Path):
    """Read a plain pickle file (legacy ``attr.pkl``) with :class:`_RestrictedUnpickler`."""
    try:
        with open(path, "rb") as handle:
            obj = _RestrictedUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as error:
        name = _refused_name(str(error))
        if name is not None:
            raise _refusal_error(path, name) from None
        raise ValueError(f"{path} is not a readable pickle file (truncated or corrupted?): {error}") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable pickle file (truncated or corrupted?): "
                         f"{type(error).__name__}: {error}") from None
    return _finalize(obj)


# --------------------------------------------------------------------------------------------
# init_params_
# --------------------------------------------------------------------------------------------

_DROPPED_INIT_PARAMS = ("use_cuda", "unlabeled_category", "pretrained_model")


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


def init_params_to_scvi_tools(init_params: Mapping) -> dict:
    """Our ``init_params_`` in the layout scvi-tools 1.x saves (``var_activation`` as a callable).

    ``var_activation`` ``None``/``"exp"`` is dropped (scvi-tools then uses its default
    ``torch.exp``); ``"softplus"`` is written as ``torch.nn.functional.softplus``.
    """
    normalized = init_params_from_scvi_tools(init_params)
    kwargs = dict(normalized["kwargs"]["kwargs"])
    if "var_activation" in kwargs:
        name = _activation_name(kwargs.pop("var_activation"))
        if name == "softplus":
            kwargs["var_activation"] = F.softplus
        elif name != "exp":
            raise ValueError(f"cannot export var_activation={name!r} to scvi-tools.")
    return {"non_kwargs": dict(normalized["non_kwargs"]), "kwargs": {"kwargs": kwargs}}


# --------------------------------------------------------------------------------------------
# Reading and writing scvi-tools directories
# --------------------------------------------------------------------------------------------


def _model_path(dir_path, prefix: str | None) -> Path:
    return Path(dir_path) / f"{prefix or ''}model.pt"


def _missing_model_error(dir_path, prefix: str | None) -> ValueError:
    path = _model_path(dir_path, prefix)
    legacy = Path(dir_path) / f"{prefix or ''}model_params.pt"
    if legacy.exists():
        return ValueError(
            f"Failed to load model file at {path}: no such file, but {legacy.name} is there, so this looks like "
            "a save from scvi-tools < 0.15. Convert it first with "
            "`pyro_scvi.io.scvi_tools.convert_legacy_save(dir_path, output_dir_path)`."
        )
    return ValueError(
        f"Failed to load model file at {path}: no such file. If attempting to load a saved model from "
        "scvi-tools < 0.15, use `convert_legacy_save` to convert it first."
    )


def _read_payload(dir_path, prefix: str | None, map_location="cpu") -> tuple[Path, dict]:
    path = _model_path(dir_path, prefix)
    if not path.is_file():
        raise _missing_model_error(dir_path, prefix)
    try:
        payload = _safe_torch_load(path, map_location=map_location)
    except FileNotFoundError:
        raise _missing_model_error(dir_path, prefix) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model_state_dict"), dict) \
            or not isinstance(payload.get("attr_dict"), dict):
        raise ValueError(f"{path} is not a model file (expected a dict with model_state_dict and attr_dict).")
    return path, payload


def read_scvi_tools_model(dir_path, prefix: str | None = None, map_location="cpu") -> dict:
    """Read ``<dir_path>/<prefix>model.pt`` written by scvi-tools 1.x without executing code.

    Returns ``{"model_state_dict": <our names>, "var_names": ndarray of str,
    "attr_dict": <as saved>}``. ``attr_dict`` keeps scvi-tools' objects: ``registry_`` with numpy
    arrays for category mappings, ``init_params_`` (see :func:`init_params_from_scvi_tools`),
    ``history_`` as a dict of DataFrames (or None), index arrays, ...

    Raises ``ValueError`` for a missing file (pointing to :func:`convert_legacy_save` for pre-0.15
    directories), an unreadable file, a file that needs a global outside :data:`ALLOWED_GLOBALS`,
    a pyro-scvi file, or state-dict keys with no pyro-scvi counterpart.
    """
    path, payload = _read_payload(dir_path, prefix, map_location)
    if payload.get("format") == FORMAT:
        raise ValueError(f"{path} was written by pyro-scvi, not scvi-tools; load it with pyro_scvi.SCVI.load.")
    state_dict = from_scvi_tools_state_dict(payload["model_state_dict"])
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state-dict entries that are not tensors: {bad}.")
    var_names = payload.get("var_names")
    if var_names is None:
        raise ValueError(f"{path} has no var_names.")
    var_names = np.asarray([str(v) for v in np.asarray(var_names, dtype=object).ravel()], dtype=object)
    return {"model_state_dict": state_dict, "var_names": var_names, "attr_dict": payload["attr_dict"]}


def _plain(obj):
    """Deep copy with ``defaultdict``/mappings turned into plain dicts (numpy arrays kept)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return copy.deepcopy(obj)


def _registry_for_scvi_tools(registry: Mapping) -> dict:
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
            raise ValueError(f"history_[{key!r}] is neither a DataFrame nor {{'epoch': [...], 'value': [...]}}.")
    return out


def _indices(value):
    if value is None:
        return None
    value = from_safe(value)
    return np.asarray(value, dtype=np.int64).ravel()


def _prepare_target(dir_path, overwrite: bool) -> Path:
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise ValueError(f"{dir_path} already exists. Please provide another directory for saving.")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{dir_path} exists and is not a directory.")
    target.mkdir(parents=True, exist_ok=True)
    return target


def _atomic_torch_save(payload: dict, path: Path) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(payload, staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise


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
    attrs["init_params_"] = init_params_to_scvi_tools(attrs["init_params_"])
    attrs["is_trained_"] = bool(attrs.get("is_trained_", False))
    attrs["history_"] = _history_for_scvi_tools(attrs.get("history_"))
    for key in ("train_indices_", "validation_indices_", "test_indices_"):
        if key in attrs:
            attrs[key] = _indices(attrs[key])
    names = np.asarray([str(v) for v in np.asarray(var_names, dtype=object).ravel()], dtype=object)
    target = _prepare_target(dir_path, overwrite)
    _atomic_torch_save({"model_state_dict": model_state, "var_names": names, "attr_dict": attrs},
                       _model_path(target, prefix))


# --------------------------------------------------------------------------------------------
# Legacy (< 0.15) directories
# --------------------------------------------------------------------------------------------

_LEGACY_FIELDS = {"X": "X", "batch_indices": "batch", "labels": "labels", "cat_covs": "extra_categorical_covs",
                  "cont_covs": "extra_continuous_covs"}


def _empty_field(stats: dict | None = None) -> dict:
    return {"data_registry": {}, "state_registry": {}, "summary_stats": dict(stats or {})}


def registry_from_legacy_setup_dict(setup_dict: Mapping, var_names=None, model_name: str = "SCVI") -> dict:
    """Turn a pre-0.15 ``scvi_setup_dict_`` into a registry in the current layout.

    Legacy keys map as ``X -> X``, ``batch_indices -> batch``, ``labels -> labels``,
    ``cat_covs -> extra_categorical_covs`` (``keys`` becomes ``field_keys``),
    ``cont_covs -> extra_continuous_covs``; others (``local_l_mean``, ...) are dropped. Fields the
    legacy dict lacks are filled in empty, as a current setup would register them, and setup
    arguments are inferred. A batch/labels field whose original key is the generated
    ``_scvi_batch``/``_scvi_labels`` column gets ``batch_key``/``labels_key`` ``None``.
    """
    data_registry = setup_dict.get("data_registry", {})
    mappings = setup_dict.get("categorical_mappings", {})
    stats = setup_dict.get("summary_stats", {})
    setup_args = {"layer": None, "batch_key": None, "labels_key": None, "size_factor_key": None,
                  "categorical_covariate_keys": None, "continuous_covariate_keys": None}
    fields = {"X": None, "batch": None, "labels": None, "size_factor": _empty_field(),
              "extra_categorical_covs": _empty_field({"n_extra_categorical_covs": 0}),
              "extra_continuous_covs": _empty_field({"n_extra_continuous_covs": 0})}

    for legacy_key, entry in data_registry.items():
        field = _LEGACY_FIELDS.get(legacy_key)
        if field is None:
            continue
        attr_name, attr_key = entry.get("attr_name"), entry.get("attr_key")
        if field == "X":
            setup_args["layer"] = attr_key if attr_name == "layers" else None
            state = {"n_obs": int(stats["n_cells"])} if "n_cells" in stats else {}
            state["n_vars"] = int(stats.get("n_vars", len(var_names) if var_names is not None else 0))
            if var_names is not None:
                state["column_names"] = np.asarray(var_names, dtype=object)
            summary = {"n_vars": state["n_vars"]}
            if "n_obs" in state:
                summary["n_cells"] = state["n_obs"]
            fields["X"] = {"data_registry": {"attr_name": attr_name, "attr_key": attr_key if attr_name == "layers" else None},
                           "state_registry": state, "summary_stats": summary}
        elif field in ("batch", "labels"):
            mapping = mappings.get(attr_key, {})
            original_key = mapping.get("original_key", f"_scvi_{field}")
            categories = np.asarray(mapping.get("mapping", np.zeros(1, dtype=np.int64)))
            count_key = "n_batch" if field == "batch" else "n_labels"
            setup_args[f"{field}_key"] = None if original_key == f"_scvi_{field}" else original_key
            fields[field] = {
                "data_registry": {"attr_name": "obs", "attr_key": f"_scvi_{field}"},
                "state_registry": {"categorical_mapping": categories, "original_key": original_key},
                "summary_stats": {count_key: int(stats.get(count_key, len(categories)))},
            }
        elif field == "extra_categorical_covs":
            extra = copy.deepcopy(dict(setup_dict.get("extra_categoricals", {})))
            keys = list(extra.pop("keys", []))
            setup_args["categorical_covariate_keys"] = keys
            fields[field] = {
                "data_registry": {"attr_name": "obsm", "attr_key": "_scvi_extra_categorical_covs"},
                "state_registry": {"mappings": dict(extra.get("mappings", {})), "field_keys": keys,
                                   "n_cats_per_key": [int(n) for n in extra.get("n_cats_per_key", [])]},
                "summary_stats": {"n_extra_categorical_covs": len(keys)},
            }
        else:
            columns = np.asarray(setup_dict.get("extra_continuous_keys", []), dtype=object)
            setup_args["continuous_covariate_keys"] = [str(c) for c in columns]
            fields[field] = {
                "data_registry": {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous_covs"},
                "state_registry": {"columns": columns},
                "summary_stats": {"n_extra_continuous_covs": int(columns.shape[0])},
            }
    if fields["X"] is None:
        raise ValueError("The legacy setup dict has no 'X' entry in its data_registry.")
    for field, count_key in (("batch", "n_batch"), ("labels", "n_labels")):
        if fields[field] is None:
            fields[field] = {"data_registry": {"attr_name": "obs", "attr_key": f"_scvi_{field}"},
                             "state_registry": {"categorical_mapping": np.zeros(1, dtype=np.int64),
                                                "original_key": f"_scvi_{field}"},
                             "summary_stats": {count_key: 1}}
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


def convert_legacy_save(dir_path, output_dir_path, overwrite: bool = False, prefix: str | None = None) -> None:
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
    state_dict = _safe_torch_load(params_path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{params_path} is not a state dict of tensors.")
    var_names = _read_legacy_var_names(source / f"{file_prefix}var_names.csv")
    attr_path = source / f"{file_prefix}attr.pkl"
    if not attr_path.is_file():
        raise ValueError(f"Legacy save is missing {attr_path}.")
    attr_dict = _safe_unpickle(attr_path)
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
    target = _prepare_target(output_dir_path, overwrite)
    _atomic_torch_save({"model_state_dict": OrderedDict(state_dict), "var_names": var_names, "attr_dict": attr_dict},
                       _model_path(target, prefix))


def read_model_dir(dir_path, prefix: str | None = None, map_location="cpu") -> dict:
    """Read a model directory written by pyro-scvi or by scvi-tools 1.x, without executing code.

    Returns ``{"source": "pyro-scvi" | "scvi-tools", "model_state_dict": <our names>,
    "var_names": ndarray of str, "attr_dict": {...}}`` with ``attr_dict`` normalised to what
    :class:`pyro_scvi.SCVI` keeps: ``registry_``, ``init_params_`` in our layout, ``is_trained_``,
    ``history_`` (dict of float DataFrames or None) and the split indices (int arrays or None).
    """
    path, payload = _read_payload(dir_path, prefix, map_location)
    raw = payload["attr_dict"]
    if payload.get("format") == FORMAT:
        attrs = from_safe(raw)
        return {"source": "pyro-scvi", "model_state_dict": payload["model_state_dict"],
                "var_names": np.asarray(payload["var_names"], dtype=object),
                "attr_dict": {**attrs, "history_": history_from_safe(attrs.get("history_"))}}
    if "scvi_setup_dict_" in raw:
        raise ValueError(f"{path} was saved by scvi-tools < 0.15: convert it first with convert_legacy_save.")
    model = read_scvi_tools_model(dir_path, prefix, map_location)
    history = raw.get("history_")
    attrs = {
        "registry_": _plain(raw["registry_"]),
        "init_params_": init_params_from_scvi_tools(raw["init_params_"]),
        "is_trained_": bool(raw.get("is_trained_", False)),
        "history_": None if history is None else {k: v.astype(float) for k, v in history.items()},
    }
    for key in ("train_indices_", "validation_indices_", "test_indices_"):
        attrs[key] = _indices(raw.get(key))
    return {"source": "scvi-tools", "model_state_dict": model["model_state_dict"], "var_names": model["var_names"],
            "attr_dict": attrs}


# --------------------------------------------------------------------------------------------
# Registry helpers (both scvi-tools' and pyro-scvi's directories)
# --------------------------------------------------------------------------------------------


def load_registry(dir_path, prefix: str | None = None) -> dict:
    """The registry saved in ``<dir_path>/<prefix>model.pt`` (pyro-scvi or scvi-tools 1.x file).

    ``ValueError`` for an attr dict still holding a pre-0.15 ``scvi_setup_dict_``.
    """
    _, payload = _read_payload(dir_path, prefix)
    attrs = payload["attr_dict"]
    if payload.get("format") == FORMAT:
        return from_safe(attrs["registry_"])
    if "scvi_setup_dict_" in attrs:
        raise ValueError("This model was saved by scvi-tools < 0.15 and has no registry yet; "
                         "convert the directory with convert_legacy_save first.")
    if "registry_" not in attrs:
        raise ValueError(f"{_model_path(dir_path, prefix)} has no registry_ in its attr_dict.")
    return attrs["registry_"]


def view_setup_args(dir_path, prefix: str | None = None) -> None:
    """Print the setup arguments of the model saved in ``dir_path``."""
    registry = load_registry(dir_path, prefix)
    model_name = registry.get("model_name", "SCVI")
    method = registry.get("setup_method_name", "setup_anndata")
    print(f"Setup via `{model_name}.{method}` with arguments:")
    pprint.pprint(dict(registry.get("setup_args", {})), sort_dicts=False)
