"""Posterior queries on one minibatch: the variational posterior of z and l, and posterior samples
of any model site (vectorised over samples with a ``"particles"`` plate).

:func:`posterior_traces` is the one place that draws from the guide and replays the model on the
draws; the queries of the user API, :func:`~pyro_scvi.SCVI.to_arviz` and
:func:`pyro_scvi.diagnostics.posterior_predictive_check` all go through it."""

from __future__ import annotations

import torch
from pyro import plate, poutine
from pyro.distributions import Independent, MultivariateNormal
from pyro.poutine.messenger import Messenger

from ..data.minibatch import Minibatch
from ..models import sites
from ..models.contract import missing_site_message

__all__ = [
    "variational_posterior",
    "latent_mean_variance",
    "monte_carlo_moments",
    "posterior_traces",
    "posterior_model_traces",
    "posterior_sites",
    "observation_distribution",
    "guide_latent_values",
    "predictive_observation",
]



def _base(distribution):
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    return distribution


def variational_posterior(guide, batch: Minibatch, site: str = sites.Z):
    """The guide's distribution at ``site`` for the cells of ``batch`` (e.g. ``Normal`` with loc (n, d)).

    The guide is traced once; any guide with a site of that name works (custom guides too).
    """
    trace = poutine.trace(guide).get_trace(batch)
    if site not in trace.nodes:
        raise KeyError(missing_site_message("guide", site))
    return _base(trace.nodes[site]["fn"])


#: elements (draws × cells × width) one Monte-Carlo pass of :func:`monte_carlo_moments` may hold
MC_PASS_ELEMENTS = 2**24


def monte_carlo_moments(distribution, n_samples: int, transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) variance ``(n, d)`` of ``transform(z)`` over ``n_samples`` draws
    ``z ~ distribution`` (batch ``(n,)``, event ``(d,)``), drawn in passes of at most
    :data:`MC_PASS_ELEMENTS` elements and accumulated in float64."""
    n_cells = max(1, distribution.batch_shape.numel())
    width = max(1, distribution.event_shape.numel()) * 16  # a flow's networks are wider than z
    per_pass = max(1, MC_PASS_ELEMENTS // (n_cells * width))
    total = total_sq = None
    for start in range(0, n_samples, per_pass):
        draws = distribution.sample((min(per_pass, n_samples - start),))
        draws = draws if transform is None else transform(draws)
        dtype, draws = draws.dtype, draws.double()
        total = draws.sum(0) if total is None else total + draws.sum(0)
        total_sq = draws.pow(2).sum(0) if total_sq is None else total_sq + draws.pow(2).sum(0)
    mean = total / n_samples
    variance = (total_sq - n_samples * mean.pow(2)).clamp(min=0) / max(n_samples - 1, 1)
    return mean.to(dtype), variance.to(dtype)


def latent_mean_variance(distribution, n_samples: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and marginal variances ``(n, d)`` of a guide's distribution at a latent site (as
    returned by :func:`variational_posterior`): exact for a ``MultivariateNormal`` (diagonal of
    ``L Lᵀ``) and for any distribution with ``loc`` and ``scale`` (``loc``, ``scale²``; the normal
    guide), else a Monte-Carlo estimate from ``n_samples`` draws (the flow guide)."""
    if isinstance(distribution, MultivariateNormal):
        return distribution.loc, distribution.scale_tril.pow(2).sum(-1)
    if hasattr(distribution, "loc") and hasattr(distribution, "scale"):
        return distribution.loc, distribution.scale.pow(2)
    return monte_carlo_moments(distribution, n_samples)


class _SitesRecorded(Exception):
    """Raised by :class:`_StopAfterSites` once the sites asked for are in the trace."""


class _StopAfterSites(Messenger):
    """Ends a model's execution as soon as every site of ``names`` has been recorded by an enclosing
    trace, so that work after them (a likelihood's extra heads, the observation) is skipped."""

    def __init__(self, names):
        super().__init__()
        self.remaining = set(names)

    def _pyro_post_sample(self, msg) -> None:
        # post-processing runs outermost first: the enclosing trace has recorded this site already
        self.remaining.discard(msg["name"])
        if not self.remaining:
            raise _SitesRecorded


def _model_trace(model, guide_trace, batch: Minibatch, code, stop_after):
    """The model replayed on ``guide_trace``; with ``stop_after`` (site names) only until they are all
    recorded (the partial trace)."""
    replayed = poutine.replay(model, trace=guide_trace)
    if stop_after is None:
        return poutine.trace(replayed).get_trace(batch, transform_batch=code)
    tracer = poutine.trace(_StopAfterSites(stop_after)(replayed))
    try:
        return tracer.get_trace(batch, transform_batch=code)
    except _SitesRecorded:
        return tracer.msngr.trace


def posterior_traces(model, guide, batch: Minibatch, n_samples: int, transform_batches=(None,), *,
                     sample_observed: bool = False, global_trace=None, stop_after=None):
    """Draw ``n_samples`` from the guide once (a ``"particles"`` plate, dim −2) and replay the model
    on them for each entry of ``transform_batches`` (``None``: the cells' own batches).

    ``sample_observed=True`` replays the model with its observed sites unconditioned, so that the
    trace holds posterior-predictive draws instead of the data. ``global_trace``: a guide trace whose
    sites are reused instead of drawn (e.g. the global latents of a first minibatch, so that draw
    ``s`` is one value for every cell). ``stop_after``: model site names; the replay ends once they
    are all recorded and the model traces hold the sites up to there.

    Returns ``(guide_trace, model_traces)``, one model trace per transform batch; every site
    inside the ``"cells"`` plate carries a leading sample axis ``(S, n, ·)``.
    """
    if global_trace is not None:
        guide = poutine.replay(guide, trace=global_trace)
    if sample_observed:
        model = poutine.uncondition(model)
    with plate(sites.PARTICLES, n_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(batch)
        model_traces = [_model_trace(model, guide_trace, batch, code, stop_after)
                        for code in transform_batches]
    return guide_trace, model_traces


def posterior_model_traces(model, guide, batch: Minibatch, n_samples: int, transform_batches=(None,),
                           stop_after=None) -> list:
    """The model traces of :func:`posterior_traces` (one per transform batch, the same draws)."""
    return posterior_traces(model, guide, batch, n_samples, transform_batches, stop_after=stop_after)[1]


def posterior_sites(model, guide, batch: Minibatch, n_samples: int, sites: list[str],
                    transform_batches=(None,)) -> list[dict[str, torch.Tensor]]:
    """Values ``(S, n, ·)`` of model ``sites`` under posterior draws, one dict per transform batch
    (the same draws for each; see :func:`posterior_model_traces`). The model is replayed only until
    the last of ``sites``."""
    results = []
    for model_trace in posterior_model_traces(model, guide, batch, n_samples, transform_batches, sites):
        out = {}
        for name in sites:
            if name not in model_trace.nodes:
                raise KeyError(missing_site_message("model", name))
            value = model_trace.nodes[name]["value"]
            out[name] = value if value.dim() >= 3 else value.expand(n_samples, *value.shape[-2:])
        results.append(out)
    return results


def observation_distribution(model_trace, site: str = sites.X):
    """The likelihood of ``site`` in a model trace, without ``Independent`` wrappers."""
    if site not in model_trace.nodes:
        raise KeyError(missing_site_message("model", site))
    return _base(model_trace.nodes[site]["fn"])


def guide_latent_values(
    guide_trace, n_samples: int, n_cells: int
) -> dict[str, tuple[torch.Tensor, list | None]]:
    """Values of the guide's latent sample sites, from a :func:`posterior_traces` guide trace.

    Sites in the ``"cells"`` plate: ``(S, n, ·)`` with ``None`` as names. Global sites (e.g. a
    latent dispersion): ``(S, ·)`` without the singleton axes the particles plate leaves, with
    the names of the axes after the draw axis (``"gene"`` for the axis of a ``"genes"`` plate).
    """
    out = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site["infer"].get("_deterministic", False):
            continue
        value, event_dim = site["value"], site["fn"].event_dim
        frames = {frame.name: frame.dim for frame in site["cond_indep_stack"]}
        if sites.CELLS in frames:
            event = tuple(value.shape[value.dim() - event_dim:]) if event_dim else ()
            out[name] = (value.expand(n_samples, n_cells, *event), None)
            continue
        axis_names = {value.dim() - event_dim + dim: "gene" for plate_name, dim in frames.items()
                      if plate_name == sites.GENES}
        keep = [i for i in range(1, value.dim()) if value.shape[i] != 1 or i in axis_names]
        value = value.expand(n_samples, *value.shape[1:]) if value.shape[0] == 1 else value
        value = value.reshape(n_samples, *[value.shape[i] for i in keep])
        out[name] = (value, [axis_names.get(i, f"{name}_dim_{j}") for j, i in enumerate(keep)])
    return out


def predictive_observation(model_trace, x: torch.Tensor, n_samples: int,
                           site: str = sites.X) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """From a model trace with ``sample_observed=True``: predictive draws ``(S, n, G)``, the
    log-likelihood of the observed ``x`` ``(n, G)`` per cell ``(S, n)`` (summed over genes) and
    whether the likelihood is discrete."""
    if site not in model_trace.nodes:
        raise KeyError(missing_site_message("model", site))
    node = model_trace.nodes[site]
    log_lik = node["fn"].log_prob(x)
    while log_lik.dim() > 2:
        log_lik = log_lik.sum(-1)
    discrete = bool(getattr(node["fn"].support, "is_discrete", False))
    return node["value"].expand(n_samples, *x.shape), log_lik.expand(n_samples, x.shape[0]), discrete
