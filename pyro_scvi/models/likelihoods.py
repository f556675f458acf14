"""The observation models of scVI, by name: a registry users can extend.

Each entry maps the per-gene mean ``μ = exp(l)·ρ`` (…, n, G), the inverse dispersion ``θ`` and the
zero-inflation logits to a Pyro distribution over counts with batch shape (…, n, G). An entry also
says which decoder heads it needs (θ, zero-inflation logits: the module computes only those) and
how :meth:`pyro_scvi.SCVI.get_likelihood_parameters` names the parameters of its distribution.

Built in: ``"zinb"``, ``"nb"``, ``"poisson"`` and ``"normal"``. Add your own with
:func:`register_likelihood`, e.g. a zero-inflated Poisson::

    import pyro.distributions as dist
    from pyro_scvi.models import register_likelihood

    register_likelihood(
        "zip",
        lambda mean, theta, logits: dist.ZeroInflatedPoisson(mean, gate_logits=logits),
        dispersion=False, zero_inflation=True,
        parameters=lambda d: {"mean": d.base_dist.rate, "dropout": d.gate},
    )
    model = SCVI(adata, gene_likelihood="zip")

A model saved with a registered likelihood stores its name only: register it again before
``SCVI.load``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import pyro.distributions as dist
import torch

from ..distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

__all__ = [
    "LIKELIHOODS", "LikelihoodSpec", "register_likelihood", "unregister_likelihood", "get_likelihood",
    "likelihood_parameters", "BUILTIN_LIKELIHOODS",
]

#: ``(mean (…, n, G), inverse_dispersion or None, zero_inflation_logits or None) → Distribution``
LikelihoodFactory = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
                             torch.distributions.Distribution]


@dataclass(frozen=True)
class LikelihoodSpec:
    """One registered observation model.

    Attributes
    ----------
    name
        The ``gene_likelihood`` value that selects it.
    factory
        ``(mean, inverse_dispersion, zero_inflation_logits) → Distribution`` with batch shape
        (…, n, G). ``mean`` is ``exp(l)·ρ`` (…, n, G); ``inverse_dispersion`` is θ > 0 shaped by the
        model's ``dispersion`` (``(G,)``, ``(n, G)`` or ``(…, n, G)``) or ``None`` when
        ``dispersion=False``; ``zero_inflation_logits`` is (…, n, G) or ``None`` when
        ``zero_inflation=False``.
    dispersion
        Whether the factory needs θ (the module's ``dispersion`` parameter or head).
    zero_inflation
        Whether the factory needs the decoder's zero-inflation logits.
    parameters
        ``Distribution → {name: tensor}``: what ``get_likelihood_parameters`` returns (each
        broadcastable to the batch shape). ``None``: ``{"mean": distribution.mean}``.
    """

    name: str
    factory: LikelihoodFactory
    dispersion: bool = True
    zero_inflation: bool = False
    parameters: Callable[[torch.distributions.Distribution], Mapping[str, torch.Tensor]] | None = None

    def __call__(self, mean, inverse_dispersion=None, zero_inflation_logits=None):
        return self.factory(mean, inverse_dispersion, zero_inflation_logits)

    def parameters_of(self, distribution) -> dict[str, torch.Tensor]:
        """The named parameters of ``distribution``, broadcast to its batch shape."""
        if self.parameters is None:
            values = {"mean": distribution.mean}
        else:
            values = dict(self.parameters(distribution))
        shape = distribution.batch_shape
        return {key: torch.as_tensor(value).expand(shape) for key, value in values.items()}


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


def _builtin_parameters(distribution) -> dict[str, torch.Tensor]:
    """scvi-tools' names for the built-in likelihoods (dispatch on the distribution's type)."""
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
    raise TypeError(f"No parameter names known for {type(distribution).__name__}: register the likelihood "
                    "with register_likelihood(..., parameters=fn) to name them.")


BUILTIN_LIKELIHOODS = ("zinb", "nb", "poisson", "normal")

#: name → :class:`LikelihoodSpec` (callable as ``spec(mean, inverse_dispersion, zero_inflation_logits)``)
LIKELIHOODS: dict[str, LikelihoodSpec] = {
    "zinb": LikelihoodSpec("zinb", _zinb, dispersion=True, zero_inflation=True,
                           parameters=_builtin_parameters),
    "nb": LikelihoodSpec("nb", _nb, dispersion=True, parameters=_builtin_parameters),
    "poisson": LikelihoodSpec("poisson", _poisson, dispersion=False, parameters=_builtin_parameters),
    "normal": LikelihoodSpec("normal", _normal, dispersion=True, parameters=_builtin_parameters),
}


def register_likelihood(
    name: str,
    factory: LikelihoodFactory,
    *,
    dispersion: bool = True,
    zero_inflation: bool = False,
    parameters: Callable[[torch.distributions.Distribution], Mapping[str, torch.Tensor]] | None = None,
    overwrite: bool = False,
) -> LikelihoodSpec:
    """Register ``factory`` as ``gene_likelihood=name`` (see :class:`LikelihoodSpec` for the arguments).

    The registry is process-wide (like a plugin table; each model's weights stay private). Built-in
    names cannot be replaced; another registered name needs ``overwrite=True``. Returns the spec.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A likelihood name must be a non-empty string, got {name!r}.")
    if not callable(factory):
        raise TypeError("factory must be callable (mean, inverse_dispersion, zero_inflation_logits) -> "
                        f"Distribution, got {factory!r}.")
    if parameters is not None and not callable(parameters):
        raise TypeError("parameters must be a callable Distribution -> {name: tensor} (or None).")
    if name in BUILTIN_LIKELIHOODS:
        raise ValueError(f"{name!r} is a built-in likelihood and cannot be replaced; choose another name.")
    if name in LIKELIHOODS and not overwrite:
        raise ValueError(f"A likelihood named {name!r} is already registered; pass overwrite=True to "
                         "replace it.")
    spec = LikelihoodSpec(name, factory, dispersion=bool(dispersion), zero_inflation=bool(zero_inflation),
                          parameters=parameters)
    LIKELIHOODS[name] = spec
    return spec


def unregister_likelihood(name: str) -> None:
    """Remove a user-registered likelihood (built-ins stay)."""
    if name in BUILTIN_LIKELIHOODS:
        raise ValueError(f"{name!r} is a built-in likelihood and cannot be removed.")
    LIKELIHOODS.pop(name, None)


def unknown_likelihood_message(name) -> str:
    registered = ", ".join(map(repr, LIKELIHOODS))
    return (f"gene_likelihood={name!r} is not a registered likelihood; registered: {registered}. "
            "Add one with pyro_scvi.models.register_likelihood(name, factory, dispersion=..., "
            "zero_inflation=..., parameters=...) before building or loading the model.")


def get_likelihood(name: str) -> LikelihoodSpec:
    """The registered :class:`LikelihoodSpec` called ``name`` (``ValueError`` listing the registered
    names)."""
    try:
        return LIKELIHOODS[name]
    except (KeyError, TypeError):
        raise ValueError(unknown_likelihood_message(name)) from None


def likelihood_parameters(distribution, name: str | None = None) -> dict[str, torch.Tensor]:
    """The named parameters of a likelihood, broadcast to its batch shape.

    Built-ins use scvi-tools' names: ``"mean"`` (the NB mean for zinb/nb, the rate for poisson, the
    location for normal), ``"dispersions"`` (θ for zinb/nb, the standard deviation for normal) and
    ``"dropout"`` (the zero-inflation probability π, zinb). A registered likelihood ``name`` uses
    its ``parameters`` function; a distribution of a built-in type is named as the built-ins are
    (so a custom model that builds, say, a Poisson itself still gets ``{"mean"}``).
    """
    spec = LIKELIHOODS.get(name) if name is not None else None
    if spec is not None and name not in BUILTIN_LIKELIHOODS:
        return spec.parameters_of(distribution)
    return _builtin_parameters(distribution)
