"""Posterior queries on one minibatch: the variational posterior of z and l, and posterior samples
of any model site (vectorised over samples with a ``"particles"`` plate)."""

from __future__ import annotations

import torch
from pyro import plate, poutine
from pyro.distributions import Independent

from ..data.minibatch import Minibatch
from ..models.contract import missing_site_message

__all__ = ["variational_posterior", "posterior_model_traces", "posterior_sites", "observation_distribution"]


def _base(distribution):
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    return distribution


def variational_posterior(guide, batch: Minibatch, site: str = "z"):
    """The guide's distribution at ``site`` for the cells of ``batch`` (e.g. ``Normal`` with loc (n, d)).

    The guide is traced once; any guide with a site of that name works (custom guides too).
    """
    trace = poutine.trace(guide).get_trace(batch)
    if site not in trace.nodes:
        raise KeyError(missing_site_message("guide", site))
    return _base(trace.nodes[site]["fn"])


def posterior_model_traces(model, guide, batch: Minibatch, n_samples: int, transform_batches=(None,)) -> list:
    """Draw ``n_samples`` from the guide once (a ``"particles"`` plate) and replay the model on
    them for each entry of ``transform_batches`` (``None``: the cells' own batches).

    Returns one model trace per entry; every site carries a leading sample axis ``(S, n, ·)``.
    """
    with plate("particles", n_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(batch)
        return [
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch, transform_batch=code)
            for code in transform_batches
        ]


def posterior_sites(model, guide, batch: Minibatch, n_samples: int, sites: list[str],
                    transform_batches=(None,)) -> list[dict[str, torch.Tensor]]:
    """Values ``(S, n, ·)`` of model ``sites`` under posterior draws, one dict per transform batch
    (the same draws for each; see :func:`posterior_model_traces`)."""
    results = []
    for model_trace in posterior_model_traces(model, guide, batch, n_samples, transform_batches):
        out = {}
        for name in sites:
            if name not in model_trace.nodes:
                raise KeyError(missing_site_message("model", name))
            value = model_trace.nodes[name]["value"]
            out[name] = value if value.dim() >= 3 else value.expand(n_samples, *value.shape[-2:])
        results.append(out)
    return results


def observation_distribution(model_trace, site: str = "x"):
    """The likelihood of ``site`` in a model trace, without ``Independent`` wrappers."""
    if site not in model_trace.nodes:
        raise KeyError(missing_site_message("model", site))
    return _base(model_trace.nodes[site]["fn"])
