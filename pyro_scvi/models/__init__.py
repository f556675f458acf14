"""Generative model functions and the likelihood registry."""

from .likelihoods import LIKELIHOODS, expression_likelihood
from .scvi import scvi_model

__all__ = ["scvi_model", "LIKELIHOODS", "expression_likelihood"]
