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

Fast paths. On float32 CPU tensors whose counts, μ and logits share one shape, ``log_prob`` calls
the fused kernel of :mod:`pyro_scvi.distributions.fused`: one vectorised C pass computes the
log-density and its derivatives in μ, θ and the logits (compiled on first use; the same function,
tested against this module's formula in float64). Where it does not apply (CUDA, float64,
broadcast μ, no C compiler) the torch formula below is used, with the sparse-aware variant on
sparse CPU data.

Sparse-aware log-density. UMI matrices are mostly zeros, and at x = 0 the lgamma
terms cancel: ``log NB(0 | μ, θ) = θ·[log(θ+ε) − log(θ+μ+ε)]``. When the counts have the
distribution's full batch shape, live on the CPU and fewer than :data:`SPARSE_DENSITY_THRESHOLD`
of them are non-zero, ``log_prob`` evaluates the zero-count formula
on every entry and the remaining terms (``x·log μ``, ``lgamma(x+θ) − lgamma(θ) − lgamma(x+1)``,
the non-zero ZINB branch) only at the non-zero entries, then writes those into place. It is the
same function, so values and gradients agree with the dense formula to float rounding
(tests/test_fast_log_prob.py); :func:`dense_log_prob` switches it and the fused kernel off. On
CUDA the dense formula is used: finding the non-zero entries would make the host wait for the
device at every step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from . import fused, kernel_choice
from .pochhammer import is_integer_valued, log_factorial, log_pochhammer

__all__ = [
    "NegativeBinomial", "ZeroInflatedNegativeBinomial", "dense_log_prob", "fused_kernel_off",
    "torch_formula_log_prob",
]

_EPS = 1e-8
#: upper clamp of the gamma draw before the Poisson draw (avoids overflow of torch.poisson)
_MAX_GAMMA_RATE = 1e8


def _as_tensors(*values):
    """Turn numbers into tensors with the dtype/device of the first tensor argument (else default)."""
    ref = next((v for v in values if isinstance(v, torch.Tensor)), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    return tuple(
        v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype, device=device) for v in values
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
    log_prob = log_nb_zero + value * (torch.log(mu + _EPS) - log_theta_mu_eps) + _count_terms(value, theta)
    return log_prob, log_nb_zero


def _per_gene(theta, n_genes: int):
    """θ as a ``(G,)`` tensor when it is one value per gene (shape ``(G,)``, ``(1, G)``, …), else None."""
    if theta.shape[-1:] != (n_genes,) or any(size != 1 for size in theta.shape[:-1]):
        return None
    return theta.reshape(n_genes)


def _count_terms(value, theta):
    """``lgamma(x + θ) − lgamma(θ) − lgamma(x + 1)`` on the broadcast shape of ``value`` and ``θ``:
    by per-gene lookup tables (:mod:`pyro_scvi.distributions.pochhammer`) for whole-number counts on
    the CPU with one θ per gene (genes on the last dim), else by lgamma."""
    n_genes = value.shape[-1] if value.dim() else 0
    if _FAST_PATHS and value.device.type == "cpu" and theta.dim() and theta.shape[-1] == n_genes:
        per_gene = _per_gene(theta, n_genes)
        if per_gene is not None and is_integer_valued(value):
            return log_pochhammer(value, per_gene) - log_factorial(value)
    return torch.lgamma(value + theta) - torch.lgamma(theta) - torch.lgamma(value + 1)


_FAST_PATHS = True
_FUSED_KERNEL = True


@contextlib.contextmanager
def dense_log_prob():
    """Within this block ``log_prob`` uses the plain dense formula with lgamma everywhere (no fused
    kernel, no sparse path, no lookup tables), for checks and timing."""
    global _FAST_PATHS
    previous, _FAST_PATHS = _FAST_PATHS, False
    try:
        yield
    finally:
        _FAST_PATHS = previous


@contextlib.contextmanager
def fused_kernel_off():
    """Within this block ``log_prob`` uses the torch formula (with its sparse-aware path and tables)
    instead of the fused kernel, to compare the two (:mod:`.kernel_choice`)."""
    global _FUSED_KERNEL
    previous, _FUSED_KERNEL = _FUSED_KERNEL, False
    try:
        yield
    finally:
        _FUSED_KERNEL = previous


def torch_formula_log_prob(value, mu, theta, logits=None):
    """log NB / log ZINB (``logits`` given) by the torch formula with its sparse-aware path and
    tables, never the fused kernel: what :mod:`.kernel_choice` measures the kernel against."""
    with fused_kernel_off():
        if logits is None:
            return NegativeBinomial(mu, theta, validate_args=False).log_prob(value)
        return ZeroInflatedNegativeBinomial(mu, theta, logits, validate_args=False).log_prob(value)


#: the sparse-aware path pays off below this fraction of non-zero counts (measured on CellBench:
#: 8% faster per epoch at 42% non-zero, 12% slower at 79%; see benchmarks/README.md)
SPARSE_DENSITY_THRESHOLD = 0.5


def _fused_log_prob(value, batch_shape, mu, theta, logits=None):
    """log NB / log ZINB from the fused CPU kernel (:mod:`pyro_scvi.distributions.fused`), or ``None``
    where it does not apply (fast paths off, CUDA, float64, broadcast μ or logits, no compiler, or counts
    that require a gradient: the kernel differentiates in the parameters only) or where the torch formula
    measured faster on this machine (:mod:`.kernel_choice`)."""
    if not (_FAST_PATHS and _FUSED_KERNEL) or mu.shape != batch_shape:
        return None
    if not value.dim() or value.requires_grad:
        return None
    if value.shape != batch_shape:
        if torch.broadcast_shapes(value.shape, batch_shape) != batch_shape:
            return None
        value = value.expand(batch_shape)
    if not fused.supports(value, mu, theta, logits):
        return None
    # False where the kernel is unavailable (asked at every call) or measured slower (once per process)
    if not kernel_choice.choice(torch_formula_log_prob)["use_fused"]:
        return None
    return fused.nb_log_prob(value, mu, theta, logits)


def _use_sparse_path(value, batch_shape) -> bool:
    if not (_FAST_PATHS and value.device.type == "cpu" and value.shape == batch_shape and value.dim() > 0):
        return False
    return int(torch.count_nonzero(value)) < SPARSE_DENSITY_THRESHOLD * value.numel()


def _non_zero_entries(value, threshold: float | None = None):
    """The non-zero entries of ``value`` (or those ≥ ``threshold``): flat positions ``(k,)``,
    coordinates ``(k, value.dim())`` and values ``(k,)``."""
    coordinates = torch.nonzero(value != 0 if threshold is None else value >= threshold)  # (k, D)
    strides = torch.empty(value.shape, device="meta").stride()  # of the contiguous layout
    position = coordinates[:, -1]
    for dim in range(value.dim() - 1):
        position = position + coordinates[:, dim] * strides[dim]
    return position, coordinates, value.reshape(-1).index_select(0, position)


def _at(parameter, position, coordinates, batch_shape):
    """Entries ``(k,)`` of ``parameter`` (broadcastable to ``batch_shape``) at the positions and
    coordinates of :func:`_non_zero_entries`. ``index_select`` (whose gradient is an ``index_add``)
    on the unexpanded parameter, e.g. a per-gene θ of shape (G,) is indexed by the gene."""
    shape = (1,) * (len(batch_shape) - parameter.dim()) + tuple(parameter.shape)
    if tuple(shape) == tuple(batch_shape):
        return parameter.reshape(-1).index_select(0, position)
    kept = [dim for dim, size in enumerate(shape) if size != 1]
    if not kept:
        return parameter.reshape(1).expand(position.shape)
    if len(kept) == 1:
        return parameter.reshape(-1).index_select(0, coordinates[:, kept[0]])
    return parameter.expand(batch_shape).reshape(-1).index_select(0, position)


def _log_nb_at(x, mu, theta, log_theta_eps, count_terms):
    """``(log NB(x | μ, θ), log NB(0 | μ, θ))`` elementwise for tensors of one shape ``(k,)``;
    ``log(θ+ε)`` (computed once per gene, then gathered) and the count terms
    ``lgamma(x+θ) − lgamma(θ) − lgamma(x+1)`` are given."""
    log_theta_mu_eps = torch.log(theta + mu + _EPS)
    log_nb_zero = theta * (log_theta_eps - log_theta_mu_eps)
    log_nb = log_nb_zero + x * (torch.log(mu + _EPS) - log_theta_mu_eps) + count_terms
    return log_nb, log_nb_zero


def _log_nb_entries(value, mu, theta, batch_shape, threshold=None):
    """log NB(0) on every entry ``batch_shape``, and at the non-zero entries of ``value`` their
    flat positions, coordinates, log NB(x) and log NB(0) ``(k,)``."""
    log_theta_eps = torch.log(theta + _EPS)  # shape of θ, e.g. (G,)
    log_nb_zero = theta * (log_theta_eps - torch.log(theta + mu + _EPS))  # batch_shape
    position, coordinates, x = _non_zero_entries(value, threshold)

    def at(parameter):
        return _at(parameter, position, coordinates, batch_shape)

    theta_k = at(theta)
    per_gene = _per_gene(theta, batch_shape[-1])
    if per_gene is not None and is_integer_valued(x):  # lookup tables indexed by the gene of each entry
        count_terms = log_pochhammer(x, per_gene, coordinates[:, -1]) - log_factorial(x)
    else:
        count_terms = torch.lgamma(x + theta_k) - at(torch.lgamma(theta)) - torch.lgamma(x + 1)
    log_nb_k, log_nb_zero_k = _log_nb_at(x, at(mu), theta_k, at(log_theta_eps), count_terms)
    return log_nb_zero.expand(batch_shape), position, coordinates, log_nb_k, log_nb_zero_k


def _log_nb_sparse(value, mu, theta, batch_shape):
    """log NB(value | μ, θ) of shape ``batch_shape``: the zero-count formula everywhere, corrected
    to the full formula at the non-zero entries."""
    log_nb_zero, position, _, log_nb_k, log_nb_zero_k = _log_nb_entries(value, mu, theta, batch_shape)
    return log_nb_zero.reshape(-1).index_add(0, position, log_nb_k - log_nb_zero_k).reshape(batch_shape)


def _zinb_zero_case(log_nb_zero, logits):
    """log ZINB(0) = softplus(log NB(0) − ℓ) − softplus(−ℓ)."""
    return F.softplus(log_nb_zero - logits) - F.softplus(-logits)


def _log_zinb_sparse(value, mu, theta, logits, batch_shape):
    """log ZINB(value | μ, θ, ℓ) of shape ``batch_shape``: the zero case everywhere, corrected to
    the non-zero case where x ≥ ε."""
    log_nb_zero, position, coordinates, log_nb_k, log_nb_zero_k = _log_nb_entries(
        value, mu, theta, batch_shape, _EPS
    )
    case_zero = _zinb_zero_case(log_nb_zero, logits)  # batch_shape
    logits_k = _at(logits, position, coordinates, batch_shape)  # (k,)
    case_non_zero = log_nb_k - F.softplus(-logits_k) - logits_k  # (k,)
    correction = case_non_zero - _zinb_zero_case(log_nb_zero_k, logits_k)  # (k,)
    return case_zero.expand(batch_shape).reshape(-1).index_add(0, position, correction).reshape(batch_shape)


def _sample_nb(mu, theta, shape):
    """Draws of Poisson(Gamma(θ, θ/μ)) of the given shape (float tensor, no gradient)."""
    with torch.no_grad():
        gamma = torch.distributions.Gamma(
            concentration=theta.expand(shape), rate=(theta / mu).expand(shape), validate_args=False
        ).sample()
        return torch.poisson(gamma.clamp(max=_MAX_GAMMA_RATE))


def _expand_parameters(batch_shape: torch.Size, *parameters):
    """``expand`` keeps the parameters as they are (they broadcast to the new ``batch_shape``), so a
    per-gene θ stays ``(G,)`` inside Pyro's plates and its per-gene terms stay per gene."""
    for parameter in parameters:
        if torch.broadcast_shapes(parameter.shape, batch_shape) != batch_shape:
            raise ValueError(
                f"Cannot expand parameters of shape {tuple(parameter.shape)} "
                f"to batch shape {tuple(batch_shape)}."
            )
    return parameters


def _broadcast(log_prob, value, batch_shape):
    """``log_prob`` expanded to the shape torch promises: ``broadcast(value.shape, batch_shape)``."""
    shape = torch.broadcast_shapes(value.shape, batch_shape)
    return log_prob if log_prob.shape == shape else log_prob.expand(shape)


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
        new._mu, new._theta = _expand_parameters(batch_shape, self._mu, self._theta)
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
        log_prob = _fused_log_prob(value, self.batch_shape, self._mu, self._theta)
        if log_prob is not None:
            return log_prob
        if _use_sparse_path(value, self.batch_shape):
            return _log_nb_sparse(value, self._mu, self._theta, self.batch_shape)
        return _broadcast(_log_nb(value, self._mu, self._theta)[0], value, self.batch_shape)


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
        self._mu, self._theta, self._logits = _as_tensors(mean, inverse_dispersion, zero_inflation_logits)
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
        new._mu, new._theta, new._logits = _expand_parameters(
            batch_shape, self._mu, self._theta, self._logits
        )
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
        log_prob = _fused_log_prob(value, self.batch_shape, self._mu, self._theta, self._logits)
        if log_prob is not None:
            return log_prob
        if _use_sparse_path(value, self.batch_shape):
            return _log_zinb_sparse(value, self._mu, self._theta, self._logits, self.batch_shape)
        log_nb, log_nb_zero = _log_nb(value, self._mu, self._theta)
        softplus_neg_logits = F.softplus(-self._logits)
        case_zero = F.softplus(log_nb_zero - self._logits) - softplus_neg_logits
        case_non_zero = log_nb - softplus_neg_logits - self._logits
        return _broadcast(torch.where(value < _EPS, case_zero, case_non_zero), value, self.batch_shape)
