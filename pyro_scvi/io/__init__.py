"""Model files: pyro-scvi's own safe format and scvi-tools' format, both read without executing code."""

from .native import FORMAT, FORMAT_VERSION, history_to_safe, to_safe, write_model_dir
from .scvi_tools import convert_legacy_save, load_registry, read_model_dir, view_setup_args, write_scvi_tools_model

__all__ = ["FORMAT", "FORMAT_VERSION", "history_to_safe", "to_safe", "write_model_dir", "read_model_dir",
           "write_scvi_tools_model", "load_registry", "view_setup_args", "convert_legacy_save"]
