"""Guide (variational posterior) functions."""

from .scvi import scvi_guide

__all__ = ["scvi_guide"]
