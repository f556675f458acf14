"""pyro-scvi: scVI as Pyro model and guide functions, with scvi-tools' ``SCVI`` API."""

from importlib.metadata import PackageNotFoundError, version

from . import data, pp
from .api import SCANVI, SCVI
from .models.module import SCVIModule
from .settings import settings

try:
    __version__ = version("pyro-scvi")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["SCVI", "SCANVI", "SCVIModule", "data", "pp", "settings", "__version__"]
