"""The observation models of scVI, by name.

Each maps the per-gene mean ``μ = exp(l)·ρ`` (…, n, G), the inverse dispersion ``θ`` and the
zero-inflation logits to a Pyro distribution over counts with batch shape (…, n, G).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ..distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

__all__ = ["LIKELIHOODS", "expression_likelihood", "likelihood_parameters"]


# Argument validation is off: the support check is a full pass over the counts at every step, and
# setup_anndata already warns when the registered data are not counts.


def _zinb(mean, theta, logits):
    return ZeroInflatedNegativeBinomial(mean, theta, logits, validate_args=False)


def _nb(mean, theta, logits):
    return NegativeBinomial(mean, theta, validate_args=False)


def _poisson(mean, theta, logits):
    return dist.Poisson(mean, validate_args=False)


def _normal(mean, theta, logits):
    # scvi-tools' "normal" likelihood: loc = μ, scale = θ = exp(log_dispersion)
    return dist.Normal(mean, theta.expand_as(mean) if torch.is_tensor(theta) else theta, validate_args=False)


#: name → constructor ``(mean, inverse_dispersion, zero_inflation_logits) → Distribution``
LIKELIHOODS = {"zinb": _zinb, "nb": _nb, "poisson": _poisson, "normal": _normal}


def expression_likelihood(name: str, mean: torch.Tensor, inverse_dispersion=None, zero_inflation_logits=None):
    """Build the likelihood ``name`` (one of :data:`LIKELIHOODS`)."""
    if name not in LIKELIHOODS:
        raise ValueError(f"gene_likelihood={name!r} is not one of {sorted(LIKELIHOODS)}.")
    return LIKELIHOODS[name](mean, inverse_dispersion, zero_inflation_logits)


def likelihood_parameters(distribution) -> dict[str, torch.Tensor]:
    """The parameters of a likelihood built here, under scvi-tools' names.

    ``"mean"``: μ (the NB mean for zinb/nb, the rate for poisson, the location for normal);
    ``"dispersions"``: θ (zinb/nb) or the standard deviation (normal); ``"dropout"``: the
    zero-inflation probability π (zinb). Each broadcast to the distribution's batch shape.
    """
    shape = distribution.batch_shape
    if isinstance(distribution, ZeroInflatedNegativeBinomial):
        return {"mean": distribution.nb_mean, "dispersions": distribution.inverse_dispersion,
                "dropout": distribution.zero_inflation_probs.expand(shape)}
    if isinstance(distribution, NegativeBinomial):
        return {"mean": distribution.mean, "dispersions": distribution.inverse_dispersion}
    if isinstance(distribution, dist.Poisson):
        return {"mean": distribution.rate.expand(shape)}
    if isinstance(distribution, dist.Normal):
        return {"mean": distribution.loc.expand(shape), "dispersions": distribution.scale.expand(shape)}
    raise TypeError(f"No parameter names known for {type(distribution).__name__}.")
