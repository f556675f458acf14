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

from typing import NamedTuple

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from ..models.sites import CELLS, cell_frame

__all__ = ["CellMeanELBO", "ELBOTerms", "elbo_parts", "elbo_terms", "traces", "cell_frame"]


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


def elbo_parts(model, guide, *args, kl_weights: dict[str, float] | None = None, **kwargs) -> ELBOTerms:
    """One-sample ELBO of a model/guide pair with a ``"cells"`` plate, local and global terms apart.

    ``kl_weights`` multiplies the KL term of the named latent sites in the loss (default 1).
    Observed sites must be inside the ``"cells"`` plate; latent sites outside it are global.
    """
    model_trace, guide_trace = traces(model, guide, *args, **kwargs)
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
            term = -site["fn"].log_prob(site["value"])
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
    return ELBOTerms(loss / n_obs, reconstruction, kl, kl_global, n_obs)


def elbo_terms(model, guide, *args, kl_weights: dict[str, float] | None = None, **kwargs
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(loss, reconstruction, kl)`` of :func:`elbo_parts`: the scalar loss, and the unscaled
    per-cell terms ``(…, n)`` of the observed and of the local latent sites (global KL terms are
    in the loss only; :func:`elbo_parts` returns them too)."""
    parts = elbo_parts(model, guide, *args, kl_weights=kl_weights, **kwargs)
    return parts.loss, parts.reconstruction, parts.kl


class CellMeanELBO(ELBO):
    """Per-cell-mean ELBO loss with analytic KL (see module docstring).

    ``kl_weights`` (site name → factor, e.g. ``{"z": 0.3}``) weights KL terms; a training loop
    updates it for KL warm-up. After each call, ``last_reconstruction`` and ``last_kl`` hold the
    detached per-cell terms and ``last_kl_global`` the detached global KL per cell
    (``Σ KL_global / N``, 0.0 without global sites), so the loop can log them without a second
    forward pass.
    """

    def __init__(self, kl_weights: dict[str, float] | None = None) -> None:
        super().__init__(num_particles=1)
        self.kl_weights: dict[str, float] = dict(kl_weights or {})
        self.last_reconstruction: dict[str, torch.Tensor] = {}
        self.last_kl: dict[str, torch.Tensor] = {}
        self.last_kl_global = 0.0

    def _get_trace(self, model, guide, args, kwargs):  # abstract in pyro's ELBO; the losses use traces()
        return traces(model, guide, *args, **kwargs)

    def _terms(self, model, guide, *args, **kwargs) -> torch.Tensor:
        parts = elbo_parts(model, guide, *args, kl_weights=self.kl_weights, **kwargs)
        self.last_reconstruction = {k: v.detach() for k, v in parts.reconstruction.items()}
        self.last_kl = {k: v.detach() for k, v in parts.kl.items()}
        share = parts.kl_global_per_cell
        self.last_kl_global = share.detach() if torch.is_tensor(share) else share
        return parts.loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self._terms(model, guide, *args, **kwargs)

    def loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self._terms(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss = self._terms(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.detach()
