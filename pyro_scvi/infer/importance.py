"""Importance sampling with the guide as proposal: the marginal likelihood log p(x_n).

For each cell, with K draws (z_k, l_k) ~ q(z, l | x)::

    log w_k   = log p(x | z_k, l_k) + log p(z_k) + log p(l_k) − log q(z_k | x) − log q(l_k | x)
    log p̂(x) = logsumexp_k log w_k − log K

Draws are vectorised with a ``"particles"`` plate, in passes small enough to bound memory.
"""

from __future__ import annotations

import math

import torch
from pyro import plate

from ..data.minibatch import Minibatch
from .elbo import traces

__all__ = ["log_importance_weights", "marginal_log_likelihood"]

#: elements of the largest (samples × cells × genes) tensor one pass may create
MAX_PASS_ELEMENTS = 2**25


def _sample_sites(trace):
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site["infer"].get("_deterministic", False):
            yield site


def log_importance_weights(model, guide, batch: Minibatch, n_samples: int, **kwargs) -> torch.Tensor:
    """``log p(x, z, l) − log q(z, l | x)`` for ``n_samples`` guide draws per cell: ``(K, n)``."""
    with plate("particles", n_samples, dim=-2):
        model_trace, guide_trace = traces(model, guide, batch, **kwargs)
    log_weight = 0.0
    for site in _sample_sites(model_trace):
        log_weight = log_weight + site["fn"].log_prob(site["value"])
    for site in _sample_sites(guide_trace):
        log_weight = log_weight - site["fn"].log_prob(site["value"])
    return log_weight.expand(n_samples, batch.n_cells)


def marginal_log_likelihood(model, guide, batch: Minibatch, n_samples: int = 1000, samples_per_pass: int | None = None,
                            n_genes: int | None = None) -> torch.Tensor:
    """Importance-sampling estimate of ``log p(x_n)`` for each cell of ``batch``: ``(n,)``.

    ``samples_per_pass`` defaults to as many draws as keep one pass under
    :data:`MAX_PASS_ELEMENTS` elements (``n_genes`` is the width of the count matrix).
    """
    if n_samples < 1:
        raise ValueError(f"n_mc_samples must be ≥ 1, got {n_samples}.")
    if samples_per_pass is None:
        width = n_genes or (batch.x.shape[-1] if batch.x is not None else 1)
        samples_per_pass = max(1, MAX_PASS_ELEMENTS // max(1, batch.n_cells * width))
    samples_per_pass = min(samples_per_pass, n_samples)
    chunks = []
    for start in range(0, n_samples, samples_per_pass):
        k = min(samples_per_pass, n_samples - start)
        chunks.append(log_importance_weights(model, guide, batch, k))
    return torch.logsumexp(torch.cat(chunks, dim=0), dim=0) - math.log(n_samples)
