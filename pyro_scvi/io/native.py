"""Our model file format: ``<prefix>model.pt`` that loads with ``torch.load(weights_only=True)``.

The file is a dict of tensors, strings, numbers, lists and dicts only, so loading it never runs
code from the file. NumPy arrays (registry category mappings, var names, split indices) are stored
as tagged lists, and the history as plain columns::

    {"format": "pyro-scvi", "format_version": 1,
     "model_state_dict": {name: tensor}, "var_names": [str],
     "attr_dict": {"registry_": ..., "init_params_": ..., "is_trained_": bool,
                   "history_": {key: {"epoch": [...], "value": [...]}} | None,
                   "train_indices_": ..., "validation_indices_": ..., "test_indices_": ...}}

The directory is written to a temporary sibling and renamed into place, so a failed save never
leaves a half-written model and never destroys the previous one. :func:`read_native` turns a loaded
payload back into the model's attributes; :func:`pyro_scvi.io.read_model_dir` picks the format.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .model_file import model_file_path

__all__ = ["FORMAT", "FORMAT_VERSION", "to_safe", "from_safe", "history_to_safe", "history_from_safe",
           "write_model_dir", "is_native", "read_native", "native_registry"]

FORMAT = "pyro-scvi"
FORMAT_VERSION = 1
_ARRAY_TAG = "__ndarray__"


def to_safe(obj):
    """Convert nested registries/params into types ``torch.load(weights_only=True)`` accepts.

    An object with a ``to_dict()`` method (a typed registry) is stored as that dict.
    """
    if hasattr(obj, "to_dict") and not isinstance(obj, (pd.DataFrame, pd.Series)):
        obj = obj.to_dict()
    if isinstance(obj, (dict, defaultdict)):
        return {str(k) if not isinstance(k, (int, str)) else k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        kind = "object" if obj.dtype == object or obj.dtype.kind in "US" else obj.dtype.str
        return {_ARRAY_TAG: [to_safe(v) for v in obj.tolist()], "dtype": kind}
    if isinstance(obj, pd.Index):
        return to_safe(np.asarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    raise TypeError(f"Cannot store an object of type {type(obj).__name__} in a pyro-scvi model file.")


def from_safe(obj):
    """Inverse of :func:`to_safe`."""
    if isinstance(obj, dict):
        if _ARRAY_TAG in obj:
            values = [from_safe(v) for v in obj[_ARRAY_TAG]]
            if obj["dtype"] == "object":
                array = np.empty(len(values), dtype=object)
                array[:] = values
                return array
            return np.asarray(values, dtype=np.dtype(obj["dtype"]))
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    return obj


def history_to_safe(history: dict[str, pd.DataFrame] | None):
    if history is None:
        return None
    return {key: {"epoch": frame.index.to_numpy().tolist(), "value": frame.iloc[:, 0].astype(float).tolist()}
            for key, frame in history.items()}


def history_from_safe(history) -> dict[str, pd.DataFrame] | None:
    if history is None:
        return None
    return {key: pd.DataFrame({key: cols["value"]}, index=pd.Index(cols["epoch"], name="epoch"))
            for key, cols in history.items()}


def write_model_dir(dir_path, payload: dict, prefix: str | None = None, overwrite: bool = False, adata=None,
                    **anndata_write_kwargs) -> None:
    """Write ``payload`` (and optionally ``adata``) into ``dir_path`` atomically."""
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise ValueError(f"{dir_path} already exists. Please provide another directory for saving.")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{dir_path} exists and is not a directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if target.exists():  # keep files of other prefixes that live in the directory
            for item in target.iterdir():
                if item.is_file():
                    shutil.copy2(item, staging / item.name)
        torch.save(payload, model_file_path(staging, prefix))
        if adata is not None:
            adata.write_h5ad(staging / f"{prefix or ''}adata.h5ad", **anndata_write_kwargs)
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_native(payload: dict) -> bool:
    """Whether a loaded ``model.pt`` payload was written by pyro-scvi."""
    return payload.get("format") == FORMAT


def read_native(payload: dict) -> dict:
    """A pyro-scvi payload as ``{"source", "model_state_dict", "var_names", "attr_dict"}``.

    The attributes come back with numpy arrays and the history as DataFrames again.
    """
    attrs = from_safe(payload["attr_dict"])
    return {"source": FORMAT, "model_state_dict": payload["model_state_dict"],
            "var_names": np.asarray(payload["var_names"], dtype=object),
            "attr_dict": {**attrs, "history_": history_from_safe(attrs.get("history_"))}}


def native_registry(payload: dict) -> dict:
    """The registry of a pyro-scvi payload, with its numpy arrays."""
    return from_safe(payload["attr_dict"]["registry_"])
