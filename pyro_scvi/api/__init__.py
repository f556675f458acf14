"""The user-facing model classes and the reusable parts they are composed of."""

from .scvi import SCVI

__all__ = ["SCVI"]
