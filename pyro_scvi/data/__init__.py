"""Data: AnnData registration, minibatches and splits, and the synthetic data generator."""

from .manager import AnnDataManager
from .minibatch import Minibatch
from .registry import REGISTRY_KEYS, Field, Registry, get_from_registry, setup_registry
from .synthetic import synthetic_iid

__all__ = [
    "AnnDataManager",
    "Field",
    "Minibatch",
    "REGISTRY_KEYS",
    "Registry",
    "get_from_registry",
    "setup_registry",
    "synthetic_iid",
]
