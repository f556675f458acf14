"""Importance sampling: the marginal likelihood log p(x_n).

For each cell, with K draws (z_k, l_k) ~ r(z, l | x) from a proposal r::

    log w_k   = log p(x | z_k, l_k) + log p(z_k) + log p(l_k) − log r(z_k | x) − log r(l_k | x)
    log p̂(x) = logsumexp_k log w_k − log K

The proposal is the guide q (``proposal="guide"``, the default), a defensive mixture of the guide
with a wider distribution (``"defensive"``) or a per-cell refinement of the guide (``"refined"``);
see :mod:`pyro_scvi.infer.proposals`.

Draws are vectorised with a ``"particles"`` plate, in passes small enough to bound memory.

Global latent sites (outside the ``"cells"`` plate, e.g. θ with a dispersion hyper-prior) are not
integrated out: model and guide are conditioned on their variational posterior mean θ̂ = E_q[θ],
so the estimate is ``log p(x_n | θ̂)`` and the weights hold per-cell terms only.
"""

from __future__ import annotations

import math

import torch
from pyro import plate, poutine
from pyro.poutine.util import prune_subsample_sites

from ..data.minibatch import Minibatch
from ..models.sites import LIBRARY, PARTICLES, X, Z, cell_frame
from .elbo import traces
from .posterior import variational_posterior
from .proposals import (
    check_proposal,
    defensive_proposal,
    local_sample_sites,
    proposal_guide,
    refined_proposal,
)

__all__ = ["log_importance_weights", "log_importance_weights_in_passes", "marginal_log_likelihood",
           "aggregate_posterior_log_weights", "global_posterior_means", "proposal_for"]

#: elements of the largest (samples × cells × genes) tensor one pass may create (2M floats: 8 MB per
#: tensor, ~100 MB for all the temporaries of a pass)
MAX_PASS_ELEMENTS = 2**21


_sample_sites = local_sample_sites


def global_posterior_means(guide, batch: Minibatch) -> dict[str, torch.Tensor]:
    """``{site: E_q[value]}`` for the latent sites of the guide outside the ``"cells"`` plate (``{}`` if
    none)."""
    trace = prune_subsample_sites(poutine.trace(guide).get_trace(batch))
    return {name: site["fn"].mean.detach() for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and cell_frame(site) is None}


def _at_global_means(model, guide, batch: Minibatch):
    """Model and guide conditioned on the posterior means of the global sites (unchanged if none)."""
    means = global_posterior_means(guide, batch)
    if not means:
        return model, guide
    return poutine.condition(model, data=means), poutine.condition(guide, data=means)


def log_importance_weights(model, guide, batch: Minibatch, n_samples: int, **kwargs) -> torch.Tensor:
    """``log p(x, z, l) − log q(z, l | x)`` for ``n_samples`` guide draws per cell: ``(K, n)``."""
    with plate(PARTICLES, n_samples, dim=-2):
        model_trace, guide_trace = traces(model, guide, batch, **kwargs)
    log_weight = 0.0
    for site in _sample_sites(model_trace):
        log_weight = log_weight + site["fn"].log_prob(site["value"])
    for site in _sample_sites(guide_trace):
        log_weight = log_weight - site["fn"].log_prob(site["value"])
    return log_weight.expand(n_samples, batch.n_cells)


def proposal_for(model, guide, batch: Minibatch, proposal: str = "guide", **options):
    """The guide function to draw importance samples from: ``guide`` itself for ``"guide"``, else
    one built by :mod:`pyro_scvi.infer.proposals` for the cells of ``batch``.

    ``options``: ``defensive_alpha``, ``defensive_widening``, ``defensive_df`` (see
    :func:`~pyro_scvi.infer.proposals.defensive_proposal`) and ``refine_steps``, ``refine_lr``,
    ``refine_particles``, ``refine_widening`` (see :func:`~pyro_scvi.infer.proposals.refined_proposal`).
    """
    check_proposal(proposal)
    known = {"defensive": ("defensive_alpha", "defensive_widening", "defensive_df"),
             "refined": ("refine_steps", "refine_lr", "refine_particles", "refine_widening",
                         "refine_covariance", "refine_df")}
    unknown = sorted(set(options) - set(known.get(proposal, ())))
    if unknown:
        raise TypeError(f"proposal={proposal!r} takes no option(s) {unknown}; "
                        f"it takes {list(known.get(proposal, ()))}.")
    if proposal == "guide":
        return guide
    if proposal == "defensive":
        kwargs = {key[len("defensive_"):]: value for key, value in options.items()}
        return proposal_guide(defensive_proposal(guide, batch, **kwargs))
    kwargs = {key[len("refine_"):]: value for key, value in options.items()}
    return proposal_guide(refined_proposal(model, guide, batch, **kwargs))


def log_importance_weights_in_passes(model, guide, batch: Minibatch, n_samples: int = 1000,
                                     samples_per_pass: int | None = None, n_genes: int | None = None,
                                     proposal: str = "guide", **proposal_options) -> torch.Tensor:
    """All ``n_samples`` log importance weights ``log p(x, z, l) − log r(z, l | x)`` of each cell of
    ``batch``: ``(S, n)``, drawn in passes (see :func:`marginal_log_likelihood` for the pass size)
    from the ``proposal`` r (see :func:`proposal_for`; ``"guide"``: r = q).

    These are the weights behind :func:`marginal_log_likelihood` (which is ``logsumexp`` over the
    first axis minus ``log S`` of this tensor, from the same random draws); the PSIS diagnostics of
    :mod:`pyro_scvi.diagnostics` read them.
    """
    check_proposal(proposal)
    if n_samples < 1:
        raise ValueError(f"n_mc_samples must be ≥ 1, got {n_samples}.")
    if samples_per_pass is None:
        width = n_genes or (batch.x.shape[-1] if batch.x is not None else 1)
        samples_per_pass = max(1, MAX_PASS_ELEMENTS // max(1, batch.n_cells * width))
    samples_per_pass = min(samples_per_pass, n_samples)
    model, guide = _at_global_means(model, guide, batch)
    guide = proposal_for(model, guide, batch, proposal, **proposal_options)
    chunks = []
    for start in range(0, n_samples, samples_per_pass):
        k = min(samples_per_pass, n_samples - start)
        chunks.append(log_importance_weights(model, guide, batch, k))
    return torch.cat(chunks, dim=0)


def marginal_log_likelihood(model, guide, batch: Minibatch, n_samples: int = 1000,
                            samples_per_pass: int | None = None, n_genes: int | None = None,
                            proposal: str = "guide", **proposal_options) -> torch.Tensor:
    """Importance-sampling estimate of ``log p(x_n)`` for each cell of ``batch``: ``(n,)``.

    ``samples_per_pass`` defaults to as many draws as keep one pass under
    :data:`MAX_PASS_ELEMENTS` elements (``n_genes`` is the width of the count matrix).
    ``proposal`` and ``proposal_options``: see :func:`proposal_for`.
    """
    log_weights = log_importance_weights_in_passes(model, guide, batch, n_samples, samples_per_pass, n_genes,
                                                   proposal, **proposal_options)
    return torch.logsumexp(log_weights, dim=0) - math.log(n_samples)


def aggregate_posterior_log_weights(model, guide, z: torch.Tensor, anchors: Minibatch,
                                    log_evidence: torch.Tensor, latent_library: bool = False) -> torch.Tensor:
    """Log importance weights (unnormalised) of draws ``z`` ``(M, d)`` that move the aggregate
    variational posterior of the anchor cells towards their aggregate true posterior::

        log w_m = logsumexp_a [log p(x_a | z_m) + log p(z_m) − log p(x_a)] − logsumexp_a log q(z_m | x_a)

    ``log p(x_a | z_m)`` decodes ``z_m`` with anchor ``a``'s batch, covariates and observed library;
    ``log_evidence`` is ``log p(x_a)`` ``(A,)`` (see :func:`marginal_log_likelihood`). Returns ``(M,)``.
    """
    posterior = variational_posterior(guide, anchors, Z)  # q(z | x_a): batch (A,) or (A, d)
    model, _ = _at_global_means(model, guide, anchors)
    n_anchors, width = anchors.n_cells, anchors.x.shape[-1]
    chunk = max(1, MAX_PASS_ELEMENTS // max(1, n_anchors * width))
    out = []
    for z_chunk in z.split(chunk):
        m = z_chunk.shape[0]
        values = {Z: z_chunk[:, None, :].expand(m, n_anchors, z.shape[-1])}
        if latent_library:
            values[LIBRARY] = anchors.log_library.expand(m, n_anchors, 1)
        with plate(PARTICLES, m, dim=-2):
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(anchors)
        _check_only_conditioned_latents(trace, values)
        log_likelihood = trace.nodes[X]["fn"].log_prob(anchors.x)  # (m, A)
        log_joint = log_likelihood + trace.nodes[Z]["fn"].log_prob(values[Z])  # (m, A)
        log_q = posterior.log_prob(values[Z])  # (m, A, d) for a diagonal Normal, else (m, A)
        log_q = log_q.sum(-1) if log_q.dim() == values[Z].dim() else log_q  # (m, A)
        out.append(torch.logsumexp(log_joint - log_evidence, dim=-1) - torch.logsumexp(log_q, dim=-1))
    return torch.cat(out)


def _check_only_conditioned_latents(trace, values: dict) -> None:
    """Importance weights of z need p(x | z) in closed form: no other per-cell latent may be drawn."""
    others = [site["name"] for site in _sample_sites(trace)  # per-cell sites only
              if not site["is_observed"] and site["name"] not in values]
    if others:
        raise ValueError(f"weights='importance' needs p(x | z) in closed form, but the model has the further "
                         f"per-cell latent site(s) {others}; use weights='uniform' with this model.")
