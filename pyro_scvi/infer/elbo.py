"""The ELBO of scVI with analytic KL terms, averaged over the cells of a minibatch.

``CellMeanELBO`` is Pyro's ``TraceMeanField_ELBO`` divided by the size ``N`` of the ``"cells"``
plate, which is scvi-tools' training objective::

    loss = mean_n [ −log p(x_n | z_n, l_n) + kl_weight · KL(q(z_n) ‖ p(z_n)) + KL(q(l_n) ‖ p(l_n)) ]
           + Σ_global KL(q(θ) ‖ p(θ)) / N

Sites inside the ``"cells"`` plate are local; latent sites outside it (e.g. the gene dispersion θ
with a hyper-prior) are global. When the model declares the plate with the training-set size ``N``
and the minibatch as subsample (``pyro.plate("cells", N, subsample=...)``), Pyro scales the local
terms by ``N / n``; dividing the whole Pyro ELBO by ``N`` gives the line above, the usual minibatch
estimate of the full-data ELBO per cell. Without subsampling ``N = n``.

(``kl_weight`` is the KL warm-up factor of the ``z`` site, given per site in ``kl_weights``; Pyro's
``poutine.scale`` cannot express it because it must be able to reach 0). The KL of a latent site is
analytic when ``torch.distributions.kl_divergence`` knows the pair and a one-sample Monte-Carlo
estimate ``log q − log p`` otherwise. Besides the loss it returns the unscaled per-cell terms of
every site, which the training history and ``get_elbo`` use.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from ..models.sites import CELLS, PARTICLES, cell_frame

__all__ = ["CellMeanELBO", "ELBOTerms", "IWAETerms", "OBJECTIVES", "elbo_parts", "elbo_terms", "iwae_parts",
           "dreg_gradients", "traces", "particle_traces", "vectorize_particles", "cell_frame"]

#: training objectives: the per-cell ELBO (scvi-tools') and the importance-weighted bound
OBJECTIVES = ("elbo", "iwae")
#: normalised importance weights below this count as 0 in the IWAE's gradient (float32's ε is 1.2e-7)
_NEGLIGIBLE_WEIGHT = 1e-12


class ELBOTerms(NamedTuple):
    """The pieces of :func:`elbo_parts`."""

    #: scalar loss: Σ_sites weight · Σ scale · term, divided by ``n_obs``
    loss: torch.Tensor
    #: ``{site: −log p(x | ·)}`` per observed site, unscaled, shape (…, n)
    reconstruction: dict
    #: ``{site: KL(q ‖ p)}`` per local latent site, unscaled, shape (…, n)
    kl: dict
    #: ``{site: KL(q ‖ p)}`` per global latent site, summed over the site: a scalar for all the data
    kl_global: dict
    #: ``N``: the full size of the ``"cells"`` plate (the minibatch size without subsampling)
    n_obs: int

    @property
    def kl_global_per_cell(self):
        """``Σ_global KL / N``: each cell's share of the global KL (0.0 without global sites)."""
        return sum(self.kl_global.values(), 0.0) / self.n_obs


def _kl_term(q_site, p_site) -> torch.Tensor:
    """Analytic KL where torch knows the pair, else the one-sample estimate ``log q − log p``."""
    try:
        return kl_divergence(q_site["fn"], p_site["fn"])
    except NotImplementedError:
        return q_site["fn"].log_prob(q_site["value"]) - p_site["fn"].log_prob(p_site["value"])


def _scaled(term: torch.Tensor, scale) -> torch.Tensor:
    return term if isinstance(scale, (int, float)) and scale == 1.0 else term * scale


def traces(model, guide, *args, **kwargs):
    """Trace the guide, then the model replayed on the guide's samples: ``(model_trace, guide_trace)``."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def vectorize_particles(fn, num_particles: int):
    """``fn`` run inside a ``"particles"`` plate of ``num_particles`` draws at dim −2 (cells are at −1)."""
    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLES, num_particles, dim=-2):
            return fn(*args, **kwargs)
    return vectorized


def particle_traces(model, guide, *args, num_particles: int = 1, **kwargs):
    """:func:`traces` of ``num_particles`` vectorised draws (sites in the cells plate: ``(K, n, ·)``).

    ``num_particles=1`` traces without a particles plate (sites ``(n, ·)``), as :func:`traces`.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}.")
    if num_particles > 1:
        model, guide = vectorize_particles(model, num_particles), vectorize_particles(guide, num_particles)
    model_trace, guide_trace = traces(model, guide, *args, **kwargs)
    if num_particles > 1 and any(
        site["type"] == "sample" and not site["is_observed"] and cell_frame(site) is None
        for site in model_trace.nodes.values()
    ):
        raise ValueError("num_particles > 1 does not support global latent sites (e.g. dispersion_prior): "
                         "train with num_particles=1, or without the global latent.")
    return model_trace, guide_trace


def elbo_parts(model, guide, *args, kl_weights: dict[str, float] | None = None, num_particles: int = 1,
               **kwargs) -> ELBOTerms:
    """ELBO of a model/guide pair with a ``"cells"`` plate, local and global terms apart.

    ``kl_weights`` multiplies the KL term of the named latent sites in the loss (default 1).
    Observed sites must be inside the ``"cells"`` plate; latent sites outside it are global.
    With ``num_particles = K > 1`` the terms are averaged over K vectorised draws.
    """
    model_trace, guide_trace = particle_traces(model, guide, *args, num_particles=num_particles, **kwargs)
    return _elbo_from_traces(model_trace, guide_trace, kl_weights, num_particles)


def _observed_log_likelihoods(model_trace) -> dict[str, torch.Tensor]:
    """``{site: log p(x | ·)}`` of the observed sites in the ``"cells"`` plate, shape (…, n)."""
    return {name: site["fn"].log_prob(site["value"]) for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and site["is_observed"] and cell_frame(site) is not None
            and not site["infer"].get("_deterministic", False)}


def _elbo_from_traces(model_trace, guide_trace, kl_weights: dict[str, float] | None,
                      num_particles: int = 1, log_likelihoods: dict | None = None) -> ELBOTerms:
    """:class:`ELBOTerms` of traced draws; terms of ``K > 1`` particles are averaged over the draws.
    ``log_likelihoods`` (from :func:`_observed_log_likelihoods`) saves recomputing the observed sites."""
    loss = 0.0
    n_obs = None
    reconstruction: dict[str, torch.Tensor] = {}
    kl: dict[str, torch.Tensor] = {}
    kl_global: dict[str, torch.Tensor] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic", False):
            continue
        frame = cell_frame(site)
        if frame is not None and n_obs is None:
            n_obs = frame.full_size or frame.size
        if site["is_observed"]:
            if frame is None:
                raise ValueError(f"Observed site {site['name']!r} is outside the {CELLS!r} plate; "
                                 "CellMeanELBO needs every observation inside it (only latent sites may be "
                                 "global).")
            term = -(log_likelihoods[name] if log_likelihoods else site["fn"].log_prob(site["value"]))
            reconstruction[name] = term
            loss = loss + _scaled(term, site["scale"]).sum()
        else:
            q = guide_trace.nodes[name]
            term = _kl_term(q, site)
            if frame is None:
                term = term.sum()
                kl_global[name] = term
            else:
                kl[name] = term
            weight = 1.0 if kl_weights is None else kl_weights.get(name, 1.0)
            scaled = _scaled(term, q["scale"]).sum()
            loss = loss + (scaled * weight if weight != 1.0 else scaled)
    if n_obs is None:
        raise ValueError(f"The model has no sample site inside the {CELLS!r} plate.")
    if num_particles > 1:  # per-cell terms (K, n) → (n,); the loss summed the K draws
        reconstruction = {k: _particle_mean(v) for k, v in reconstruction.items()}
        kl = {k: _particle_mean(v) for k, v in kl.items()}
        return ELBOTerms(loss / (n_obs * num_particles), reconstruction, kl, kl_global, n_obs)
    return ELBOTerms(loss / n_obs, reconstruction, kl, kl_global, n_obs)


def _particle_mean(term: torch.Tensor) -> torch.Tensor:
    """Mean over the leading particle axis of a per-cell term ``(K, n)``; an analytic KL that did not
    broadcast over the particles ``(n,)`` is returned as is."""
    return term.mean(0) if term.dim() >= 2 else term


class IWAETerms(NamedTuple):
    """The pieces of :func:`iwae_parts`."""

    #: scalar: −mean_n IWAE_n(β) + Σ_global KL / N, the tempered objective (positive, lower is better)
    loss: torch.Tensor
    #: scalar whose gradient, taken inside :func:`dreg_gradients`, is the doubly-reparameterised one
    #: for the guide and the IWAE one for the model
    surrogate: torch.Tensor
    #: ``(n,)``: the importance-weighted bound ``log (1/K) Σ_k w_k`` of each cell, untempered (β = 1)
    bound: torch.Tensor
    #: the ELBO terms of the same draws (for the history)
    elbo: ELBOTerms
    #: ``(draw, factor)`` pairs: each reparameterised local draw ``(K, n, ·)`` and the factor ``(K, n)``
    #: its gradient is multiplied by, ``(1 − β) + β w̃`` for the site's warm-up weight β
    draws: tuple = ()


@contextlib.contextmanager
def dreg_gradients(terms: IWAETerms):
    """Within this context, gradients reaching the draws are multiplied by their factors, so that
    differentiating ``terms.surrogate`` gives DReG's guide gradient ``Σ_k w̃_k [(1 − β) + β w̃_k] ∂log
    w_k/∂φ`` (through the draws; ``w̃_k²`` at β = 1). The hooks are removed on exit, so other
    gradients of the same graph (e.g. of ``terms.loss``) stay the plain ones."""
    handles = []
    for value, factor in terms.draws:
        shape = factor.shape + (1,) * (value.dim() - factor.dim())
        handles.append(value.register_hook(lambda grad, f=factor.reshape(shape): grad * f))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _local_log_weights(model_trace, guide_trace, kl_weights: dict[str, float] | None,
                       log_likelihoods: dict[str, torch.Tensor]):
    """Log importance weights ``(K, n)`` of the local sites, tempered and plain, and the draws DReG needs.

    Tempered: ``log w = Σ_obs log p(x | ·) + Σ_latent β_site · [log p(v) − log q(v)]`` with ``β_site``
    from ``kl_weights`` (the KL warm-up weight; 1 by default); plain: every ``β = 1``. Returns
    ``(tempered, plain, [(value, q_fn, β), ...])`` over the local latent draws.
    """
    log_lik, tempered_ratio, ratio, latents = 0.0, 0.0, 0.0, []
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic", False) or cell_frame(site) is None:
            continue
        if site["is_observed"]:
            log_lik = log_lik + log_likelihoods[name]
            continue
        q = guide_trace.nodes[name]
        weight = 1.0 if kl_weights is None else kl_weights.get(name, 1.0)
        # log q through the draw itself: a flow's cached inverse would route ∂log q/∂φ around the draw,
        # past dreg_gradients' hook; a new view of the draw is inverted exactly, keeping ∂log q/∂z
        site_ratio = site["fn"].log_prob(site["value"]) - q["fn"].log_prob(q["value"].view_as(q["value"]))
        ratio, tempered_ratio = ratio + site_ratio, tempered_ratio + weight * site_ratio
        latents.append((q["value"], q["fn"], weight))
    return log_lik + tempered_ratio, log_lik + ratio, latents


def iwae_parts(model, guide, *args, num_particles: int, kl_weights: dict[str, float] | None = None,
               **kwargs) -> IWAETerms:
    """The importance-weighted bound (Burda et al. 2016) of ``K = num_particles`` vectorised draws per
    cell, with the doubly-reparameterised gradient for the guide (DReG, Tucker et al. 2019).

    Per cell, ``IWAE = log (1/K) Σ_k w_k``; the loss is ``−mean_n IWAE_n`` plus each cell's share of
    the global KL (global latents are treated as in the ELBO). KL warm-up tempers the latent part of
    each weight: ``log w = log p(x | z, l) + β · [log p(z) − log q(z)] + [log p(l) − log q(l)]``, so
    β = 0 weighs draws by the likelihood alone and β = 1 is the IWAE. The surrogate's gradient is
    ``Σ_k w̃_k ∇_model log w_k`` for the model and ``Σ_k w̃_k [(1 − β) + β w̃_k] ∂ log w_k/∂v_k ·
    ∂v_k/∂φ`` (through the reparameterised draws v only) for the guide, with ``w̃`` the normalised
    weights: the score term ``−β Σ_k w̃_k ∂log q(v_k)/∂φ`` of the tempered bound, rewritten by
    DReG's identity as ``−β Σ_k w̃_k (1 − w̃_k) ∂ log w_k/∂v_k · ∂v_k/∂φ``, joins the path term. It
    needs reparameterisable guide sites and is taken inside :func:`dreg_gradients`. With K = 1 the
    bound is the one-draw ELBO and the guide's gradient the path derivative ("sticking the landing").
    """
    model_trace, guide_trace = particle_traces(model, guide, *args, num_particles=num_particles, **kwargs)
    log_likelihoods = _observed_log_likelihoods(model_trace)  # the costly (K, n, G) term, computed once
    elbo = _elbo_from_traces(model_trace, guide_trace, kl_weights, num_particles, log_likelihoods)
    log_w, plain_log_w, latents = _local_log_weights(model_trace, guide_trace, kl_weights, log_likelihoods)
    if num_particles == 1:  # traced without a particles plate: one draw per cell
        log_w, plain_log_w = log_w.unsqueeze(0), plain_log_w.unsqueeze(0)
    tempered_bound = torch.logsumexp(log_w, dim=0) - math.log(num_particles)  # (n,)
    bound = torch.logsumexp(plain_log_w.detach(), dim=0) - math.log(num_particles)  # (n,), reported
    normalized = torch.softmax(log_w, dim=0).detach()  # (K, n)
    # weights below float32's resolution of a sum of one are 0, not subnormal: subnormal factors in the
    # backward pass slow the decoder's matrix products on x86 by an order of magnitude
    normalized = normalized.masked_fill(normalized < _NEGLIGIBLE_WEIGHT, 0.0)
    surrogate, draws = log_w, []
    for value, q_fn, weight in latents:
        if value.requires_grad:  # DReG: (1 − β) w̃ + β w̃² through the draws, the score of log q cancelled
            factor = (1.0 - weight) + weight * normalized  # (K, n)
            draws.append((value, factor if num_particles > 1 else factor[0]))
            score = q_fn.log_prob(value.detach())
            surrogate = surrogate + weight * (score.unsqueeze(0) if num_particles == 1 else score)
    global_share = elbo.kl_global_per_cell
    loss = -tempered_bound.mean() + global_share
    surrogate = -(normalized * surrogate).sum(0).mean() + global_share
    return IWAETerms(loss, surrogate, bound, elbo, tuple(draws))


def elbo_terms(model, guide, *args, kl_weights: dict[str, float] | None = None, **kwargs
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(loss, reconstruction, kl)`` of :func:`elbo_parts`: the scalar loss, and the unscaled
    per-cell terms ``(…, n)`` of the observed and of the local latent sites (global KL terms are
    in the loss only; :func:`elbo_parts` returns them too)."""
    parts = elbo_parts(model, guide, *args, kl_weights=kl_weights, **kwargs)
    return parts.loss, parts.reconstruction, parts.kl


class CellMeanELBO(ELBO):
    """Per-cell-mean training loss: the ELBO with analytic KL (see module docstring), or the IWAE bound.

    ``kl_weights`` (site name → factor, e.g. ``{"z": 0.3}``) weights KL terms; a training loop
    updates it for KL warm-up. ``num_particles`` draws per cell are vectorised in a ``"particles"``
    plate; ``objective="iwae"`` trains on the importance-weighted bound of those draws with the
    DReG gradient (:func:`iwae_parts`). After each call, ``last_reconstruction`` and ``last_kl``
    hold the detached per-cell ELBO terms, ``last_kl_global`` the detached global KL per cell
    (``Σ KL_global / N``, 0.0 without global sites) and, for the IWAE, ``last_bound`` the per-cell
    bound ``(n,)``, so the loop can log them without a second forward pass.
    """

    def __init__(self, kl_weights: dict[str, float] | None = None, num_particles: int = 1,
                 objective: str = "elbo") -> None:
        super().__init__(num_particles=1)  # particles are vectorised here, not looped by pyro's ELBO
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}.")
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}.")
        self.kl_weights: dict[str, float] = dict(kl_weights or {})
        self.particles, self.objective = num_particles, objective
        self.last_reconstruction: dict[str, torch.Tensor] = {}
        self.last_kl: dict[str, torch.Tensor] = {}
        self.last_kl_global = 0.0
        self.last_bound: torch.Tensor | None = None

    def _get_trace(self, model, guide, args, kwargs):  # abstract in pyro's ELBO; the losses use traces()
        return traces(model, guide, *args, **kwargs)

    def _terms(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, IWAETerms | None]:
        """``(value, iwae_terms)``: the loss, and for the IWAE its terms (surrogate and draws)."""
        terms = None
        if self.objective == "iwae":
            terms = iwae_parts(model, guide, *args, num_particles=self.particles, kl_weights=self.kl_weights,
                               **kwargs)
            parts, value = terms.elbo, terms.loss
            self.last_bound = terms.bound.detach()
        else:
            parts = elbo_parts(model, guide, *args, kl_weights=self.kl_weights, num_particles=self.particles,
                               **kwargs)
            value = parts.loss
        self.last_reconstruction = {k: v.detach() for k, v in parts.reconstruction.items()}
        self.last_kl = {k: v.detach() for k, v in parts.kl.items()}
        share = parts.kl_global_per_cell
        self.last_kl_global = share.detach() if torch.is_tensor(share) else share
        return value, terms

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The loss; for the IWAE its plain reparameterised gradient (``loss_and_grads`` uses DReG)."""
        return self._terms(model, guide, *args, **kwargs)[0]

    def loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self._terms(model, guide, *args, **kwargs)[0]

    def loss_and_grads(self, model, guide, *args, **kwargs) -> torch.Tensor:
        value, terms = self._terms(model, guide, *args, **kwargs)
        if terms is not None and terms.surrogate.requires_grad:
            with dreg_gradients(terms):
                terms.surrogate.backward()
        elif value.requires_grad:
            value.backward()
        return value.detach()
