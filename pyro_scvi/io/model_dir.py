"""Read a saved model directory in whichever format it holds: pyro-scvi's or scvi-tools 1.x.

Pre-0.15 scvi-tools saves are refused with a pointer to :func:`pyro_scvi.io.convert_legacy_save`.
"""

from __future__ import annotations

import pprint

from .model_file import model_file_path, read_payload
from .native import is_native, native_registry, read_native
from .scvi_tools import attrs_from_scvi_tools, scvi_tools_model_from_payload

__all__ = ["read_model_dir", "load_registry", "view_setup_args"]


def read_model_dir(dir_path, prefix: str | None = None, map_location="cpu") -> dict:
    """Read a model directory written by pyro-scvi or by scvi-tools 1.x, without executing code.

    Returns ``{"source": "pyro-scvi" | "scvi-tools", "model_state_dict": <our names>,
    "var_names": ndarray of str, "attr_dict": {...}}`` with ``attr_dict`` normalised to what
    :class:`pyro_scvi.SCVI` keeps: ``registry_``, ``init_params_`` in our layout, ``is_trained_``,
    ``history_`` (dict of float DataFrames or None) and the split indices (int arrays or None).
    """
    path, payload = read_payload(dir_path, prefix, map_location)
    if is_native(payload):
        return read_native(payload)
    if "scvi_setup_dict_" in payload["attr_dict"]:
        raise ValueError(f"{path} was saved by scvi-tools < 0.15: convert it first with convert_legacy_save.")
    model = scvi_tools_model_from_payload(path, payload)
    return {"source": "scvi-tools", "model_state_dict": model["model_state_dict"],
            "var_names": model["var_names"], "attr_dict": attrs_from_scvi_tools(model["attr_dict"])}


def load_registry(dir_path, prefix: str | None = None) -> dict:
    """The registry saved in ``<dir_path>/<prefix>model.pt`` (pyro-scvi or scvi-tools 1.x file).

    ``ValueError`` for an attr dict still holding a pre-0.15 ``scvi_setup_dict_``.
    """
    _, payload = read_payload(dir_path, prefix)
    if is_native(payload):
        return native_registry(payload)
    attrs = payload["attr_dict"]
    if "scvi_setup_dict_" in attrs:
        raise ValueError("This model was saved by scvi-tools < 0.15 and has no registry yet; "
                         "convert the directory with convert_legacy_save first.")
    if "registry_" not in attrs:
        raise ValueError(f"{model_file_path(dir_path, prefix)} has no registry_ in its attr_dict.")
    return attrs["registry_"]


def view_setup_args(dir_path, prefix: str | None = None) -> None:
    """Print the setup arguments of the model saved in ``dir_path``."""
    registry = load_registry(dir_path, prefix)
    model_name = registry.get("model_name", "SCVI")
    method = registry.get("setup_method_name", "setup_anndata")
    print(f"Setup via `{model_name}.{method}` with arguments:")
    pprint.pprint(dict(registry.get("setup_args", {})), sort_dicts=False)
