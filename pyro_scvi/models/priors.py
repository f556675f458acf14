"""Priors of scVI's latent variables: the cell state z, the log-library and the gene dispersion.

The prior protocol
------------------
A **z prior** is an ``nn.Module`` whose ``forward(batch)`` returns a Pyro distribution over the
latent state of the ``n`` cells of a :class:`~pyro_scvi.data.Minibatch`, with batch shape ``(n,)``
and event shape ``(d,)`` (``d = n_latent``). It may ignore ``batch`` (as every prior here does
except through its device) or use the cells' batch, labels or covariates.

A **library prior** is the same for the log-library: batch shape ``(n,)``, event shape ``(1,)``.
It is used only when the library is latent (``use_observed_lib_size=False``). The model calls it
with the counterfactual batch codes under ``transform_batch``.

Two optional hooks:

* ``attach(module)``: called once by :class:`~pyro_scvi.models.module.SCVIModule` after it built its
  networks, so a prior can read them (``VampPrior`` uses ``module.z_encoder``; the default library
  prior reads the per-batch buffers). A prior object belongs to one module: pass a fresh instance
  to each model.
* ``init_from_data(batch)``: called by ``SCVI`` when built from an AnnData, with a minibatch of
  random cells (``VampPrior`` starts its pseudo-inputs there).

Learnable prior parameters are ``nn.Parameter`` s of the prior module, which is a child of the
``SCVIModule``: they train with the networks, live in the model's own parameter-store scope and
are saved with its state dict. The ELBO uses the analytic KL when torch knows the pair (the normal
prior) and a one-sample Monte-Carlo ``log q − log p`` otherwise (mixtures).

Dispersion hyper-prior
----------------------
With ``dispersion_prior="gamma"`` or ``"lognormal"`` the inverse dispersion θ of each gene (and
batch or label) is a *global* latent variable with the fixed prior of :data:`DISPERSION_PRIORS`
and a mean-field log-normal variational posterior (see :func:`dispersion_prior_distribution`).
"""

from __future__ import annotations

import contextlib
import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Gamma, LogNormal, register_kl

__all__ = [
    "NormalPrior",
    "MixtureOfGaussiansPrior",
    "VampPrior",
    "LogNormalLibraryPrior",
    "Z_PRIORS",
    "DISPERSION_PRIORS",
    "make_z_prior",
    "dispersion_prior_distribution",
]


def _attach_once(prior: nn.Module, module: nn.Module) -> None:
    """Remember ``module`` without registering it as a child (no second copy in the state dict)."""
    owner = prior.__dict__.get("_owner")
    if owner is not None and owner is not module:
        raise ValueError(f"This {type(prior).__name__} already belongs to another model; pass a new instance "
                         "to each model.")
    object.__setattr__(prior, "_owner", module)


def _owner(prior: nn.Module) -> nn.Module:
    owner = prior.__dict__.get("_owner")
    if owner is None:
        raise RuntimeError(f"{type(prior).__name__} is not attached to a module (SCVIModule calls attach).")
    return owner


class NormalPrior(nn.Module):
    """``z_n ~ Normal(0, I)``: scVI's prior. The KL to the Gaussian posterior is analytic.

    ``n_latent`` is taken from the module on :meth:`attach` when not given.
    """

    def __init__(self, n_latent: int | None = None) -> None:
        super().__init__()
        self.n_latent = n_latent

    def attach(self, module: nn.Module) -> None:
        self.n_latent = module.n_latent if self.n_latent is None else self.n_latent

    def forward(self, batch) -> dist.Distribution:
        """Batch shape ``(n,)``, event shape ``(d,)``."""
        zeros = batch.log_library.new_zeros((batch.n_cells, self.n_latent))  # (n, d)
        # a tensor scale: a number would become torch.tensor(1.0, device=...), a blocking host-to-device
        # copy at every step on CUDA
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


class MixtureOfGaussiansPrior(nn.Module):
    """``z_n ~ Σ_k w_k Normal(μ_k, diag σ_k²)`` with learnable weights, means and scales.

    Parameters: ``logits`` ``(K,)`` (weights ``w = softmax(logits)``), ``means`` ``(K, d)``,
    ``log_scales`` ``(K, d)``. Initialised with equal weights, unit scales and means drawn from
    ``Normal(0, init_spread²)`` (``init_spread=0`` puts every component at the origin).
    """

    def __init__(self, n_latent: int, n_components: int = 10, init_spread: float = 1.0) -> None:
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be ≥ 1, got {n_components}.")
        self.n_latent, self.n_components = n_latent, n_components
        self.logits = nn.Parameter(torch.zeros(n_components))
        self.means = nn.Parameter(init_spread * torch.randn(n_components, n_latent))
        self.log_scales = nn.Parameter(torch.zeros(n_components, n_latent))

    def mixture(self) -> dist.Distribution:
        """The mixture itself: batch shape ``()``, event shape ``(d,)``."""
        components = dist.Normal(self.means, self.log_scales.exp()).to_event(1)  # batch (K,), event (d,)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)

    def forward(self, batch) -> dist.Distribution:
        """Batch shape ``(n,)``, event shape ``(d,)``."""
        return self.mixture().expand((batch.n_cells,))


@contextlib.contextmanager
def _layers_in_eval_mode(module: nn.Module):
    """Run ``module`` with BatchNorm on its running statistics and no dropout; gradients still flow."""
    states = [(m, m.training) for m in module.modules()]
    for m, _ in states:
        m.training = False
    try:
        yield
    finally:
        for m, training in states:
            m.training = training


class VampPrior(nn.Module):
    """Variational mixture of posteriors (Tomczak & Welling 2018)::

        p(z) = 1/K Σ_k q(z | u_k)

    with ``K`` learnable pseudo-inputs ``u_k`` in the encoder's input space (``log1p`` counts, plus
    the continuous covariates and batch embedding when ``encode_covariates=True``) passed through
    the model's own ``z_encoder``.

    Choices, for a well-defined prior that does not depend on the minibatch:

    * the pseudo-inputs go through the encoder with BatchNorm on its running statistics and without
      dropout (as at evaluation), also while training, and they never update those statistics;
    * every categorical covariate of the encoder (the batch one-hot first) is code 0.

    The pseudo-inputs ``(K, n_input_encoder)`` are created on :meth:`attach`, from ``pseudo_inputs``
    when given, else ``Normal(0, 1)``; ``SCVI`` then copies ``K`` random cells onto them
    (:meth:`init_from_data`).
    """

    def __init__(self, n_components: int = 10, pseudo_inputs: torch.Tensor | None = None) -> None:
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be ≥ 1, got {n_components}.")
        self.n_components = n_components
        self._initial = None if pseudo_inputs is None else torch.as_tensor(pseudo_inputs, dtype=torch.float32)
        self.pseudo_inputs = None

    def attach(self, module: nn.Module) -> None:
        _attach_once(self, module)
        if self.pseudo_inputs is not None:
            return
        shape = (self.n_components, module.n_input_encoder)
        initial = torch.randn(shape) if self._initial is None else self._initial
        if tuple(initial.shape) != shape:
            raise ValueError(f"pseudo_inputs must have shape {shape} (n_components, encoder input width), "
                             f"got {tuple(initial.shape)}.")
        self.pseudo_inputs = nn.Parameter(initial.clone())
        self._initial = None

    @torch.no_grad()
    def init_from_data(self, batch) -> None:
        """Copy the encoder inputs of the cells of ``batch`` (cycled to ``K`` rows) onto the pseudo-inputs."""
        inputs, _ = _owner(self).encoder_input(batch)  # (n, G [+ C + E])
        rows = torch.arange(self.n_components, device=inputs.device) % inputs.shape[0]
        self.pseudo_inputs.copy_(inputs[rows].to(self.pseudo_inputs))

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | u_k)``: loc and scale ``(K, d)``."""
        encoder = _owner(self).z_encoder
        codes = [torch.zeros(self.n_components, 1, dtype=torch.long, device=self.pseudo_inputs.device)
                 for _ in encoder.hidden.n_cat_list]
        with _layers_in_eval_mode(encoder):
            return encoder(self.pseudo_inputs, *codes)

    def forward(self, batch) -> dist.Distribution:
        """Batch shape ``(n,)``, event shape ``(d,)``."""
        loc, scale = self.components()  # (K, d) each
        weights = dist.Categorical(logits=loc.new_zeros(self.n_components))
        mixture = dist.MixtureSameFamily(weights, dist.Normal(loc, scale).to_event(1))
        return mixture.expand((batch.n_cells,))


class LogNormalLibraryPrior(nn.Module):
    """Per-batch log-normal library size: ``log l_n ~ Normal(m_{s_n}, v_{s_n}^{1/2})`` (scVI's).

    ``log_means`` / ``log_vars`` ``(1, B)`` are the mean and variance of the log total counts of
    each batch. Without them (the default model) the prior reads the module's buffers
    ``library_log_means`` / ``library_log_vars``, which ``setup_anndata``'s data fill and which keep
    scvi-tools' state-dict names.
    """

    def __init__(self, log_means=None, log_vars=None) -> None:
        super().__init__()
        if (log_means is None) != (log_vars is None):
            raise ValueError("Pass both log_means and log_vars, or neither.")
        self.owns_parameters = log_means is not None
        if self.owns_parameters:
            self.register_buffer("log_means", torch.as_tensor(log_means, dtype=torch.float32).reshape(1, -1))
            self.register_buffer("log_vars", torch.as_tensor(log_vars, dtype=torch.float32).reshape(1, -1))

    def attach(self, module: nn.Module) -> None:
        _attach_once(self, module)

    def forward(self, batch) -> dist.Distribution:
        """Batch shape ``(n,)``, event shape ``(1,)``."""
        source = self if self.owns_parameters else _owner(self)
        means = source.log_means if self.owns_parameters else source.library_log_means  # (1, B)
        variances = source.log_vars if self.owns_parameters else source.library_log_vars  # (1, B)
        loc, var = means[0, batch.batch_index], variances[0, batch.batch_index]  # (n, 1) each
        return dist.Normal(loc, var.sqrt()).to_event(1)


#: names accepted by ``SCVI(z_prior=...)``
Z_PRIORS = ("normal", "mog", "vamp")


def make_z_prior(spec, n_latent: int, n_components: int = 10) -> nn.Module:
    """The z prior for ``SCVI(z_prior=spec)``: a name of :data:`Z_PRIORS` or a module (returned as is)."""
    if isinstance(spec, nn.Module):
        return spec
    if spec == "normal":
        return NormalPrior(n_latent)
    if spec == "mog":
        return MixtureOfGaussiansPrior(n_latent, n_components)
    if spec == "vamp":
        return VampPrior(n_components)
    raise ValueError(f"z_prior={spec!r} is not one of {', '.join(map(repr, Z_PRIORS))} or an nn.Module "
                     "following the prior protocol.")


#: fixed hyper-priors of the inverse dispersion θ (weakly informative, centred on θ ≈ 5):
#: ``"gamma"``: Gamma(concentration 1.5, rate 0.3), mean 5, sd ≈ 4.1;
#: ``"lognormal"``: LogNormal(log 5, 1.5), median 5, 95% of the mass in [0.27, 95].
DISPERSION_PRIORS = {
    "gamma": {"concentration": 1.5, "rate": 0.3},
    "lognormal": {"loc": math.log(5.0), "scale": 1.5},
}


def dispersion_prior_distribution(name: str, shape: tuple[int, ...], device=None) -> dist.Distribution:
    """The hyper-prior ``name`` of θ over ``shape`` = ``(G,)`` or ``(G, B)``: batch shape ``(G,)``,
    event shape ``()`` or ``(B,)`` (a ``"genes"`` plate covers the first axis)."""
    if name not in DISPERSION_PRIORS:
        names = ", ".join(map(repr, DISPERSION_PRIORS))
        raise ValueError(f"dispersion_prior={name!r} is not one of None, {names}.")
    # torch.full fills on the device; torch.tensor(v, device=...) would copy from the host and wait
    p = {k: torch.full((), v, device=device) for k, v in DISPERSION_PRIORS[name].items()}
    if name == "gamma":
        prior = dist.Gamma(p["concentration"], p["rate"])
    else:
        prior = dist.LogNormal(p["loc"], p["scale"])
    return prior.expand(shape).to_event(len(shape) - 1)


@register_kl(LogNormal, Gamma)
def kl_lognormal_gamma(q: LogNormal, p: Gamma) -> torch.Tensor:
    """KL(LogNormal(μ, σ) ‖ Gamma(a, b)) in closed form, so θ's KL under ``dispersion_prior="gamma"``
    is analytic (no Monte-Carlo noise in its gradient)::

        KL = −H(q) − E_q[log p(θ)]
           = −(μ + ½ + log σ + ½ log 2π) − [a log b − log Γ(a) + (a − 1) μ − b exp(μ + σ²/2)]

    using E_q[log θ] = μ and E_q[θ] = exp(μ + σ²/2).
    """
    mu, sigma = q.loc, q.scale
    a, b = p.concentration, p.rate
    entropy = mu + 0.5 + sigma.log() + 0.5 * math.log(2 * math.pi)
    expected_log_p = a * b.log() - torch.lgamma(a) + (a - 1) * mu - b * torch.exp(mu + sigma.pow(2) / 2)
    return -entropy - expected_log_p
