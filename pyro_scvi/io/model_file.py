"""The ``<prefix>model.pt`` file that both formats share: where it is, reading it safely, writing it.

Reading goes through :func:`pyro_scvi.io.safe_unpickle.safe_torch_load`, so nothing in the file
is executed; a missing file gets a hint when the directory holds a pre-0.15 scvi-tools save.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .safe_unpickle import safe_torch_load

__all__ = ["model_file_path", "read_payload", "prepare_target", "atomic_torch_save"]


def model_file_path(dir_path, prefix: str | None = None) -> Path:
    return Path(dir_path) / f"{prefix or ''}model.pt"


def _missing_model_error(dir_path, prefix: str | None) -> ValueError:
    path = model_file_path(dir_path, prefix)
    legacy = Path(dir_path) / f"{prefix or ''}model_params.pt"
    if legacy.exists():
        return ValueError(
            f"Failed to load model file at {path}: no such file, but {legacy.name} is there, so this looks "
            "like a save from scvi-tools < 0.15. Convert it first with "
            "`pyro_scvi.io.convert_legacy_save(dir_path, output_dir_path)`."
        )
    return ValueError(
        f"Failed to load model file at {path}: no such file. If attempting to load a saved model from "
        "scvi-tools < 0.15, use `convert_legacy_save` to convert it first."
    )


def read_payload(dir_path, prefix: str | None = None, map_location="cpu") -> tuple[Path, dict]:
    """``(path, payload)`` of ``<dir_path>/<prefix>model.pt``, read with the allow-list.

    ``ValueError`` unless the payload is a dict with ``model_state_dict`` and ``attr_dict`` dicts.
    """
    path = model_file_path(dir_path, prefix)
    if not path.is_file():
        raise _missing_model_error(dir_path, prefix)
    try:
        payload = safe_torch_load(path, map_location=map_location)
    except FileNotFoundError:
        raise _missing_model_error(dir_path, prefix) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model_state_dict"), dict) \
            or not isinstance(payload.get("attr_dict"), dict):
        raise ValueError(f"{path} is not a model file (expected a dict with model_state_dict and attr_dict).")
    return path, payload


def prepare_target(dir_path, overwrite: bool) -> Path:
    """Create ``dir_path`` (an existing one needs ``overwrite``) and return it."""
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise ValueError(f"{dir_path} already exists. Please provide another directory for saving.")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{dir_path} exists and is not a directory.")
    target.mkdir(parents=True, exist_ok=True)
    return target


def atomic_torch_save(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary sibling, then rename over ``path``."""
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(payload, staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
