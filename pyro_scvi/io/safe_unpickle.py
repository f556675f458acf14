"""The hardened loader for pickled model files: an allow-list of pure-data reconstructors.

scvi-tools saves numpy arrays, pandas DataFrames and ``defaultdict`` s as pickled Python objects,
and unpickling them as-is could run any code a crafted file carries. :func:`safe_torch_load`
reads a ``torch.save`` file with ``torch.load(weights_only=True)`` plus :data:`ALLOWED_GLOBALS`;
:func:`safe_unpickle` reads a plain pickle (legacy ``attr.pkl``) with a restricted unpickler that
enforces the same list. A file that needs any other global is refused with a ``ValueError`` naming
it. numpy's reconstructors are wrapped, because as they are they let a file forge object pointers
(``ndarray(..., buffer=...)`` with an object dtype, or a dtype whose pickled state adds object
fields): only plain dtypes and checked array states get through, and arrays come back as plain
``np.ndarray``.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ALLOWED_GLOBALS", "safe_torch_load", "safe_unpickle"]

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
        raise pickle.UnpicklingError(
            f"global 'numpy.dtype({code!r})' is not allowed (only plain, non-structured dtypes)")
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
        raise pickle.UnpicklingError(
            "global 'numpy.ndarray(...)' is not allowed (only via numpy's _reconstruct)")


class _SafeArray(np.ndarray):
    """Array under construction; its ``__setstate__`` checks the state before numpy's runs.

    Turned into a plain ``np.ndarray`` view once loaded (:func:`_finalize`).
    """

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("global '_SafeArray(...)' is not allowed")

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("unsupported numpy array state")
        version, (shape, dtype, is_fortran, data) = (
            (state[0], state[1:]) if len(state) == 5 else (None, state))
        if not _is_shape(shape):
            raise ValueError(f"bad numpy array shape {shape!r}")
        dtype = _resolve_dtype(dtype)
        if dtype.hasobject != isinstance(data, list) or not isinstance(data, (list, bytes, bytearray, str)):
            raise ValueError("numpy array data does not match its dtype")
        if not isinstance(is_fortran, bool):
            raise ValueError("bad numpy array order flag")
        checked = (shape, dtype, is_fortran, data)
        if version is not None:
            checked = (version, *checked)
        np.ndarray.__setstate__(self, checked)


def _is_shape(shape) -> bool:
    return isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)


def _plain_array(value):
    return value.view(np.ndarray) if isinstance(value, _SafeArray) else value


def _safe_reconstruct(subtype, shape, typecode):
    if subtype is not _NDArrayMarker:
        name = getattr(subtype, "__qualname__", subtype)
        raise pickle.UnpicklingError(f"global '_reconstruct({name!r})' is not allowed")
    if not _is_shape(shape):
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
    if not _is_shape(shape) or order not in ("C", "F"):
        raise ValueError("bad numpy array shape or order")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy(order=order)


def _safe_unpickle_block(values, placement, ndim):
    from pandas._libs.internals import _unpickle_block

    return _unpickle_block(_plain_array(values), _plain_array(placement), ndim)


class _IndexMarker:
    """What the global ``pandas...Index`` resolves to: only accepted as ``_new_Index``'s class."""

    pandas_class = pd.Index

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(
            "global 'pandas Index(...)' is not allowed (only via pandas' _new_Index)")


class _RangeIndexMarker(_IndexMarker):
    pandas_class = pd.RangeIndex


def _safe_new_index(cls, data):
    from pandas.core.indexes.base import _new_Index

    if cls is not _IndexMarker and cls is not _RangeIndexMarker:
        name = getattr(cls, "__qualname__", cls)
        raise pickle.UnpicklingError(f"global '_new_Index({name!r})' is not allowed")
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
    allowed["_codecs.encode"] = codecs.encode  # bytes under pickle protocol 2 (torch allows it by default)
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
_BUILDABLE_TYPES = frozenset(
    (*_BUILD_ONLY, pd.DataFrame, ALLOWED_GLOBALS["pandas.core.internals.managers.BlockManager"]))


def _torch_safe_globals():
    if not hasattr(torch.serialization, "safe_globals"):  # pragma: no cover - old torch
        raise RuntimeError(
            "Reading scvi-tools files safely needs torch >= 2.6 (torch.serialization.safe_globals).")
    entries = [(obj, name) for name, obj in ALLOWED_GLOBALS.items()]
    # torch only BUILDs types it finds among allowed values; a name with a newline can never be
    # written by a GLOBAL opcode, so these stay unreachable as callables.
    entries += [(cls, f"pyro_scvi\n{cls.__qualname__}") for cls in _BUILD_ONLY]
    return torch.serialization.safe_globals(entries)


_REFUSAL_PATTERNS = [
    r"Unsupported global: GLOBAL (\S+) was not an allowed global",
    r"Trying to load unsupported GLOBAL (\S+) whose module",
    r"Trying to call reduce for unrecognized function (.+?)(?: which belongs|$)",
    r"Can only create new object for nn\.Parameter or classes allowlisted via `add_safe_globals` "
    r"but got (.+)",
    r"Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, "
    r"but got (.+)",
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


def safe_torch_load(path: Path, map_location="cpu"):
    """``torch.load(weights_only=True)`` with the allow-list; every failure becomes ``ValueError``."""
    try:
        with _torch_safe_globals():
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        name = _refused_name(str(error))
        if name is not None:
            raise _refusal_error(path, name) from None
        raise ValueError(f"{path} is not a readable model file (truncated or corrupted?): "
                         f"{_first_line(error)}") from None
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
            name = getattr(func, "__qualname__", type(func).__name__)
            raise pickle.UnpicklingError(f"global '{name}' is not allowed")

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
            name = f"{type(inst).__module__}.{type(inst).__qualname__}"
            raise pickle.UnpicklingError(f"global '{name}' is not allowed")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def safe_unpickle(path: Path | bytes):
    """Read a plain pickle file (legacy ``attr.pkl``), or pickled ``bytes``, with
    :class:`_RestrictedUnpickler`."""
    data = bytes(path) if isinstance(path, (bytes, bytearray)) else None
    if data is not None:
        path = "the pickled data"
    try:
        with io.BytesIO(data) if data is not None else open(path, "rb") as handle:
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

