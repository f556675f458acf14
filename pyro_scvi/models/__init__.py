"""Generative model functions, the likelihood registry and the priors."""

from .likelihoods import (
    LIKELIHOODS,
    LikelihoodSpec,
    get_likelihood,
    register_likelihood,
    unregister_likelihood,
)
from .priors import LogNormalLibraryPrior, MixtureOfGaussiansPrior, NormalPrior, VampPrior
from .scvi import scvi_model

__all__ = ["scvi_model", "LIKELIHOODS", "LikelihoodSpec", "get_likelihood",
           "register_likelihood", "unregister_likelihood",
           "NormalPrior", "MixtureOfGaussiansPrior", "VampPrior", "LogNormalLibraryPrior"]
