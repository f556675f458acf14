"""Data: AnnData registration, minibatches and splits, and the synthetic data generator."""

from .manager import AnnDataManager
from .minibatch import Minibatch
from .registry import REGISTRY_KEYS, get_from_registry, setup_registry
from .synthetic import synthetic_iid

__all__ = ["AnnDataManager", "Minibatch", "REGISTRY_KEYS", "get_from_registry", "setup_registry", "synthetic_iid"]
