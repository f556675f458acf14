"""Guide (variational posterior) functions."""

from .scvi import GUIDES, scvi_guide, z_posterior

__all__ = ["scvi_guide", "z_posterior", "GUIDES"]
