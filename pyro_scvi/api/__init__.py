"""The user-facing model classes and the reusable parts they are composed of."""

from .scanvi import SCANVI
from .scvi import SCVI

__all__ = ["SCVI", "SCANVI"]
