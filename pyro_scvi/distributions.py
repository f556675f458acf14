"""Count distributions of scVI in its (mean, inverse dispersion) parametrisation.

``NegativeBinomial(mean=μ, inverse_dispersion=θ)`` has variance ``μ + μ²/θ``; it is
``Poisson(Gamma(concentration=θ, rate=θ/μ))``. ``ZeroInflatedNegativeBinomial`` adds a
structural zero with probability ``π = sigmoid(ℓ)`` given as the logit ``ℓ``.

The log-densities follow scvi-tools' formulas exactly, including the ``ε = 1e-8`` inside the
logarithms, so that losses and ELBOs are comparable number for number::

    log NB(x | μ, θ) = θ·[log(θ+ε) − log(θ+μ+ε)] + x·[log(μ+ε) − log(θ+μ+ε)]
                       + lgamma(x+θ) − lgamma(θ) − lgamma(x+1)
    log ZINB(0 | μ, θ, ℓ) = softplus(−ℓ + θ·[log(θ+ε) − log(θ+μ+ε)]) − softplus(−ℓ)
    log ZINB(x | μ, θ, ℓ) = −softplus(−ℓ) − ℓ + log NB(x | μ, θ)          for x > 0

Parameters may have different (broadcastable) shapes, e.g. a per-gene θ of shape ``(G,)`` with a
per-cell-and-gene μ of shape ``(n, G)``. They are kept unexpanded internally so that terms that
depend on θ alone (``lgamma(θ)``, ``log(θ+ε)``) are computed once per gene, not once per entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

__all__ = ["NegativeBinomial", "ZeroInflatedNegativeBinomial"]

_EPS = 1e-8
#: upper clamp of the gamma draw before the Poisson draw (avoids overflow of torch.poisson)
_MAX_GAMMA_RATE = 1e8


def _as_tensors(*values):
    """Turn numbers into tensors with the dtype/device of the first tensor argument (else default)."""
    ref = next((v for v in values if isinstance(v, torch.Tensor)), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    return tuple(
        v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype, device=device)
        for v in values
    )


def _log_nb(value, mu, theta):
    """log NB(value | μ, θ) and its x = 0 part ``θ·[log(θ+ε) − log(θ+μ+ε)]`` (= log NB(0 | μ, θ)).

    All terms are finite for μ, θ > 0 and finite x ≥ 0, so the result can sit in the unused
    branch of a ``torch.where`` without leaking NaN gradients. At x = 0 the lgamma terms cancel
    exactly (``lgamma(θ) − lgamma(θ) − lgamma(1) == 0``), so NB needs no special case.
    ``log(θ+ε)`` and ``lgamma(θ)`` are evaluated on the unexpanded θ (once per gene).
    """
    log_theta_mu_eps = torch.log(theta + mu + _EPS)
    log_nb_zero = theta * (torch.log(theta + _EPS) - log_theta_mu_eps)
    log_prob = (
        log_nb_zero
        + value * (torch.log(mu + _EPS) - log_theta_mu_eps)
        + torch.lgamma(value + theta)
        - torch.lgamma(theta)
        - torch.lgamma(value + 1)
    )
    return log_prob, log_nb_zero


def _sample_nb(mu, theta, shape):
    """Draws of Poisson(Gamma(θ, θ/μ)) of the given shape (float tensor, no gradient)."""
    with torch.no_grad():
        gamma = torch.distributions.Gamma(
            concentration=theta.expand(shape), rate=(theta / mu).expand(shape), validate_args=False
        ).sample()
        return torch.poisson(gamma.clamp(max=_MAX_GAMMA_RATE))


def _repr(dist):
    params = ", ".join(f"{name}: {getattr(dist, name).size()}" for name in dist.arg_constraints)
    return f"{type(dist).__name__}({params})"


def _value_as_float(value, like):
    value = torch.as_tensor(value, device=like.device)
    if not value.is_floating_point():
        value = value.to(like.dtype)
    return value


class NegativeBinomial(TorchDistribution):
    """Negative binomial counts with mean ``μ`` and inverse dispersion ``θ`` (scVI's ``mu``/``theta``).

    Args:
        mean: μ > 0, expected count (e.g. library size × normalised expression); shape
            broadcastable with ``inverse_dispersion``.
        inverse_dispersion: θ > 0, so that ``Var[x] = μ + μ²/θ`` (θ → ∞ gives Poisson(μ)).
            Often per gene, shape ``(G,)``.
        validate_args: as in ``torch.distributions``.

    ``batch_shape`` is the broadcast shape of the parameters, ``event_shape`` is ``()``.
    ``sample`` returns float tensors of non-negative integers; ``log_prob`` is in nats.
    """

    arg_constraints = {"mean": constraints.positive, "inverse_dispersion": constraints.positive}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mean, inverse_dispersion, validate_args=None):
        self._mu, self._theta = _as_tensors(mean, inverse_dispersion)
        batch_shape = torch.broadcast_shapes(self._mu.shape, self._theta.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def mean(self):
        return self._mu.expand(self.batch_shape)

    @property
    def inverse_dispersion(self):
        return self._theta.expand(self.batch_shape)

    @property
    def variance(self):
        return self.mean + self.mean**2 / self.inverse_dispersion

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NegativeBinomial, _instance)
        batch_shape = torch.Size(batch_shape)
        new._mu = self._mu.expand(batch_shape)
        new._theta = self._theta.expand(batch_shape)
        super(NegativeBinomial, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self):
        return _repr(self)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        return _sample_nb(self._mu, self._theta, shape)

    def log_prob(self, value):
        value = _value_as_float(value, self._mu)
        if self._validate_args:
            self._validate_sample(value)
        return _log_nb(value, self._mu, self._theta)[0]


class ZeroInflatedNegativeBinomial(TorchDistribution):
    """Zero-inflated negative binomial: 0 with probability ``π = sigmoid(ℓ)``, else NB(μ, θ).

    Args:
        mean: μ > 0, mean of the negative binomial component (exposed as ``nb_mean``; the
            distribution's ``mean`` is ``(1 − π)·μ``).
        inverse_dispersion: θ > 0, inverse dispersion of the NB component.
        zero_inflation_logits: ℓ ∈ ℝ, logit of the structural-zero probability π.
        validate_args: as in ``torch.distributions``.

    All three broadcast, e.g. μ and ℓ of shape ``(n, G)`` with θ of shape ``(G,)``; the result is
    ``batch_shape``, ``event_shape`` is ``()``. ``log_prob`` is in nats; values below 1e-8 count
    as zero, as in scvi-tools.
    """

    arg_constraints = {
        "nb_mean": constraints.positive,
        "inverse_dispersion": constraints.positive,
        "zero_inflation_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mean, inverse_dispersion, zero_inflation_logits, validate_args=None):
        self._mu, self._theta, self._logits = _as_tensors(
            mean, inverse_dispersion, zero_inflation_logits
        )
        batch_shape = torch.broadcast_shapes(self._mu.shape, self._theta.shape, self._logits.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def nb_mean(self):
        return self._mu.expand(self.batch_shape)

    @property
    def inverse_dispersion(self):
        return self._theta.expand(self.batch_shape)

    @property
    def zero_inflation_logits(self):
        return self._logits.expand(self.batch_shape)

    @property
    def zero_inflation_probs(self):
        return torch.sigmoid(self.zero_inflation_logits)

    @property
    def mean(self):
        return torch.sigmoid(-self.zero_inflation_logits) * self.nb_mean

    @property
    def variance(self):
        mu, theta, pi = self.nb_mean, self.inverse_dispersion, self.zero_inflation_probs
        return (1 - pi) * mu * (mu + theta + pi * mu * theta) / theta

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ZeroInflatedNegativeBinomial, _instance)
        batch_shape = torch.Size(batch_shape)
        new._mu = self._mu.expand(batch_shape)
        new._theta = self._theta.expand(batch_shape)
        new._logits = self._logits.expand(batch_shape)
        super(ZeroInflatedNegativeBinomial, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self):
        return _repr(self)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        counts = _sample_nb(self._mu, self._theta, shape)
        with torch.no_grad():
            structural_zero = torch.bernoulli(torch.sigmoid(self._logits).expand(shape))
            return torch.where(structural_zero.bool(), torch.zeros_like(counts), counts)

    def log_prob(self, value):
        value = _value_as_float(value, self._mu)
        if self._validate_args:
            self._validate_sample(value)
        log_nb, log_nb_zero = _log_nb(value, self._mu, self._theta)
        softplus_neg_logits = F.softplus(-self._logits)
        case_zero = F.softplus(log_nb_zero - self._logits) - softplus_neg_logits
        case_non_zero = log_nb - softplus_neg_logits - self._logits
        return torch.where(value < _EPS, case_zero, case_non_zero)
