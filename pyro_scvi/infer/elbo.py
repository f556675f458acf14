"""The ELBO of scVI with analytic KL terms, averaged over the cells of a minibatch.

``CellMeanELBO`` is Pyro's ``TraceMeanField_ELBO`` divided by the number of cells in the
``"cells"`` plate, which is scvi-tools' training objective::

    loss = mean_n [ −log p(x_n | z_n, l_n) + kl_weight · KL(q(z_n) ‖ p(z_n)) + KL(q(l_n) ‖ p(l_n)) ]

(``kl_weight`` is the KL warm-up factor of the ``z`` site, given per site in ``kl_weights``; Pyro's
``poutine.scale`` cannot express it because it must be able to reach 0). The KL of a latent site is
analytic when ``torch.distributions.kl_divergence`` knows the pair and a one-sample Monte-Carlo
estimate ``log q − log p`` otherwise. Besides the loss it returns the unscaled per-cell terms of
every site, which the training history and ``get_elbo`` use.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

__all__ = ["CellMeanELBO", "elbo_terms", "traces", "CELL_PLATE"]

CELL_PLATE = "cells"


def _cell_dim(site) -> int:
    for frame in site["cond_indep_stack"]:
        if frame.name == CELL_PLATE:
            return frame.dim
    raise ValueError(
        f"Sample site {site['name']!r} is outside the {CELL_PLATE!r} plate; CellMeanELBO supports "
        "only per-cell (local) latent variables and observations."
    )


def _scaled(term: torch.Tensor, scale) -> torch.Tensor:
    return term if isinstance(scale, (int, float)) and scale == 1.0 else term * scale


def traces(model, guide, *args, **kwargs):
    """Trace the guide, then the model replayed on the guide's samples: ``(model_trace, guide_trace)``."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def elbo_terms(model, guide, *args, kl_weights: dict[str, float] | None = None, **kwargs
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One-sample ELBO of a model/guide pair with a ``"cells"`` plate.

    ``kl_weights`` multiplies the KL term of the named latent sites in the loss (default 1).

    Returns
    -------
    loss
        Scalar: Σ_sites Σ_cells scale · term, divided by the number of cells.
    reconstruction
        ``{site: −log p(x | ·)}`` per observed site, unscaled, shape (…, n).
    kl
        ``{site: KL(q ‖ p)}`` per latent site, unscaled, shape (…, n).
    """
    model_trace, guide_trace = traces(model, guide, *args, **kwargs)
    loss = 0.0
    n_cells = None
    reconstruction: dict[str, torch.Tensor] = {}
    kl: dict[str, torch.Tensor] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic", False):
            continue
        cell_dim = _cell_dim(site)
        n_cells = site["value"].shape[cell_dim - site["fn"].event_dim] if n_cells is None else n_cells
        if site["is_observed"]:
            term = -site["fn"].log_prob(site["value"])
            reconstruction[name] = term
            loss = loss + _scaled(term, site["scale"]).sum()
        else:
            q = guide_trace.nodes[name]
            try:
                term = kl_divergence(q["fn"], site["fn"])
            except NotImplementedError:
                term = q["fn"].log_prob(q["value"]) - site["fn"].log_prob(site["value"])
            kl[name] = term
            weight = 1.0 if kl_weights is None else kl_weights.get(name, 1.0)
            loss = loss + (_scaled(term, q["scale"]).sum() * weight if weight != 1.0 else _scaled(term, q["scale"]).sum())
    if n_cells is None:
        raise ValueError("The model has no sample site inside the 'cells' plate.")
    return loss / n_cells, reconstruction, kl


class CellMeanELBO(ELBO):
    """Per-cell-mean ELBO loss with analytic KL (see module docstring).

    ``kl_weights`` (site name → factor, e.g. ``{"z": 0.3}``) weights KL terms; a training loop
    updates it for KL warm-up. After each call, ``last_reconstruction`` and ``last_kl`` hold the
    detached per-cell terms, so the loop can log them without a second forward pass.
    """

    def __init__(self, kl_weights: dict[str, float] | None = None) -> None:
        super().__init__(num_particles=1)
        self.kl_weights: dict[str, float] = dict(kl_weights or {})
        self.last_reconstruction: dict[str, torch.Tensor] = {}
        self.last_kl: dict[str, torch.Tensor] = {}

    def _get_trace(self, model, guide, args, kwargs):
        return traces(model, guide, *args, **kwargs)

    def _terms(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss, reconstruction, kl = elbo_terms(model, guide, *args, kl_weights=self.kl_weights, **kwargs)
        self.last_reconstruction = {k: v.detach() for k, v in reconstruction.items()}
        self.last_kl = {k: v.detach() for k, v in kl.items()}
        return loss

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
