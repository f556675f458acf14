"""Proposals for importance sampling other than the guide itself: a defensive mixture and a per-cell
refinement of the guide (semi-amortised inference).

Both are built from one trace of the guide on a minibatch: its per-cell latent sites (``z``, and
``library`` when latent), each a distribution with batch shape ``(n,)``. Each site gets its own
proposal, independent of the others (the scVI guide factorises over sites; a guide whose later
site depends on an earlier draw is approximated by the conditional at the traced draw).

* ``"defensive"``: ``α·q(·|x) + (1 − α)·q_wide(·|x)`` (:class:`DefensiveMixture`).
* ``"refined"``: a Gaussian per cell (full covariance by default), started at the guide's moments
  and moved by a few Adam steps on that cell's ELBO (:func:`refined_proposal`).

:func:`proposal_guide` turns the per-site proposals into a guide function with a ``"cells"``
plate, which :mod:`pyro_scvi.infer.importance` draws from like any guide.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import plate, poutine
from pyro.distributions import Independent, TorchDistribution, constraints
from pyro.poutine.util import prune_subsample_sites

from ..data.minibatch import Minibatch
from ..models.sites import CELLS, PARTICLES, cell_frame

__all__ = ["PROPOSALS", "DefensiveMixture", "check_proposal", "guide_moments", "guide_cholesky",
           "concatenate_cells", "local_sample_sites",
           "local_guide_distributions", "defensive_proposal", "refined_proposal", "proposal_guide"]

#: the proposals of :func:`pyro_scvi.infer.importance.log_importance_weights_in_passes`
PROPOSALS = ("guide", "defensive", "refined")

#: draws of the Monte-Carlo moments of a guide distribution without closed-form ones (e.g. a flow)
MOMENT_DRAWS = 256


def check_proposal(proposal: str) -> None:
    """``ValueError`` naming the choices unless ``proposal`` is one of :data:`PROPOSALS`."""
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {list(PROPOSALS)}, got {proposal!r}.")


def local_sample_sites(trace):
    """The per-cell sample sites of a trace (global sites and plate subsample sites left out)."""
    for site in trace.nodes.values():
        if site["type"] != "sample" or site["infer"].get("_deterministic", False):
            continue
        if cell_frame(site) is not None:
            yield site


def local_guide_distributions(guide, batch: Minibatch) -> dict:
    """``{site: distribution}`` of the guide's per-cell latent sites, batch shape ``(n,)``, from one
    trace of the guide (no particles plate)."""
    trace = prune_subsample_sites(poutine.trace(guide).get_trace(batch))
    return {site["name"]: site["fn"] for site in local_sample_sites(trace) if not site["is_observed"]}


def guide_moments(fn, n_draws: int = MOMENT_DRAWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` of a guide distribution, each ``batch_shape + event_shape``: the Normal's own
    parameters, else its mean and standard deviation (element-wise; Monte-Carlo estimates from
    ``n_draws`` draws when it has none in closed form, e.g. a normalizing flow)."""
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    if isinstance(base, torch.distributions.Normal):
        shape = fn.batch_shape + fn.event_shape
        return base.loc.expand(shape), base.scale.expand(shape)
    try:
        return fn.mean, fn.stddev
    except NotImplementedError:
        draws = fn.sample((n_draws,))
        return draws.mean(0), draws.std(0)


class DefensiveMixture(TorchDistribution):
    """``α·proposal + (1 − α)·wide`` (two distributions with the same batch and event shapes).

    Draws pick a component per element of the batch (``Bernoulli(α)``) and the density is
    ``logaddexp(log α + log proposal, log(1 − α) + log wide)``. Expanding the batch shape (e.g. by a
    ``"particles"`` plate) adds leading sample dimensions to the components' draws instead of
    expanding the components themselves, so any guide distribution works.
    """

    arg_constraints: dict = {}
    has_rsample = False

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def __init__(self, proposal, wide, alpha: float, batch_shape=None):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"defensive_alpha must be in (0, 1), got {alpha}.")
        self.proposal, self.wide, self.alpha = proposal, wide, float(alpha)
        batch_shape = proposal.batch_shape if batch_shape is None else torch.Size(batch_shape)
        super().__init__(batch_shape, proposal.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return DefensiveMixture(self.proposal, self.wide, self.alpha, batch_shape)

    def sample(self, sample_shape=torch.Size()):
        extra = self.batch_shape[: len(self.batch_shape) - len(self.proposal.batch_shape)]
        shape = torch.Size(sample_shape) + extra
        first, second = self.proposal.sample(shape), self.wide.sample(shape)
        pick = torch.rand(shape + self.proposal.batch_shape, device=first.device) < self.alpha
        pick = pick.reshape(pick.shape + (1,) * len(self.event_shape))
        return torch.where(pick, first, second)

    def log_prob(self, value):
        return torch.logaddexp(math.log(self.alpha) + self.proposal.log_prob(value),
                               math.log1p(-self.alpha) + self.wide.log_prob(value))


def _diagonal(loc, scale, event_dim: int, df: float | None = None):
    base = dist.Normal(loc, scale) if df is None else dist.StudentT(df, loc, scale)
    return base.to_event(event_dim) if event_dim else base


def defensive_proposal(guide, batch: Minibatch, alpha: float = 0.5, widening: float = 2.0,
                       df: float | None = 4.0) -> dict:
    """``{site: α·q + (1 − α)·q_wide}`` for the guide's per-cell sites (see :func:`proposal_guide`).

    ``q_wide`` is element-wise independent, centred on the guide's mean, with ``widening`` × its
    standard deviation as scale: a Student-t with ``df`` degrees of freedom, or a Normal for
    ``df=None`` (:func:`guide_moments`).
    """
    out = {}
    for name, fn in local_guide_distributions(guide, batch).items():
        loc, scale = guide_moments(fn)
        out[name] = DefensiveMixture(fn, _diagonal(loc, scale * widening, fn.event_dim, df), alpha)
    return out


def _local_log_joint(model, batch: Minibatch, values: dict) -> torch.Tensor:
    """``log p(x, values)`` per draw and cell ``(K, n)`` of the model conditioned on ``values``
    ``{site: (K, n, ·)}``, summed over its per-cell sites."""
    n_draws = next(iter(values.values())).shape[0]
    with plate(PARTICLES, n_draws, dim=-2):
        trace = prune_subsample_sites(poutine.trace(poutine.condition(model, data=values)).get_trace(batch))
    log_joint = 0.0
    for site in local_sample_sites(trace):
        log_joint = log_joint + site["fn"].log_prob(site["value"])
    return log_joint


def guide_cholesky(fn, n_draws: int = MOMENT_DRAWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale_tril)`` ``(n, d)``, ``(n, d, d)`` of a guide distribution with event shape ``(d,)``:
    a multivariate normal's own, a diagonal Normal's ``diag(σ)``, else the Cholesky factor of the
    Monte-Carlo covariance of ``n_draws`` draws (e.g. a normalizing flow)."""
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return fn.loc, fn.scale_tril
    base = fn.base_dist if isinstance(fn, Independent) else fn
    if isinstance(base, torch.distributions.Normal):
        loc, scale = guide_moments(fn)
        return loc, torch.diag_embed(scale)
    draws = fn.sample((n_draws,))  # (S, n, d)
    centred = draws - draws.mean(0)
    covariance = torch.einsum("sni,snj->nij", centred, centred) / (n_draws - 1)
    jitter = 1e-6 * torch.eye(draws.shape[-1], device=draws.device, dtype=draws.dtype)
    return draws.mean(0), torch.linalg.cholesky(covariance + jitter)


class _RefinedGaussian:
    """Per-cell Gaussian parameters being refined: ``loc`` ``(n, d)`` and a Cholesky factor
    ``L = diag(σ) (I + A)`` stored as ``log σ`` on the diagonal and the strictly lower ``A`` below it
    (``A`` is scale-free, so one Adam step changes correlations, not absolute covariances, by about
    the learning rate), or a log scale ``(n, ·)`` when diagonal."""

    def __init__(self, fn, full: bool) -> None:
        self.event_dim, self.full = fn.event_dim, full and fn.event_dim == 1
        if self.full:
            loc, tril = guide_cholesky(fn)
            scale = tril.diagonal(dim1=-2, dim2=-1)  # (n, d)
            self.raw = torch.tril(tril / scale.unsqueeze(-1), -1) + torch.diag_embed(scale.log())
        else:
            loc, scale = guide_moments(fn)
            self.raw = scale.log()
        self.loc = loc.detach().clone().requires_grad_(True)
        self.raw = self.raw.detach().clone().requires_grad_(True)

    def leaves(self) -> list[torch.Tensor]:
        return [self.loc, self.raw]

    def distribution(self, widening: float = 1.0, df: float | None = None, detach: bool = False):
        """The Gaussian (``df=None``) or Student-t with these parameters, its scale × ``widening``;
        ``detach=True`` cuts it from the refinement's graph."""
        loc, raw = (self.loc.detach(), self.raw.detach()) if detach else (self.loc, self.raw)
        if not self.full:
            return _diagonal(loc, raw.exp() * widening, self.event_dim, df)
        scale = raw.diagonal(dim1=-2, dim2=-1).exp().unsqueeze(-1) * widening  # (n, d, 1)
        tril = scale * (torch.tril(raw, -1) + torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device))
        if df is None:
            return dist.MultivariateNormal(loc, scale_tril=tril)
        return dist.MultivariateStudentT(df, loc, tril)


def refined_proposal(model, guide, batch: Minibatch, steps: int = 50, lr: float = 0.05,
                     particles: int = 16, widening: float = 1.2, covariance: str = "full",
                     df: float | None = None) -> dict:
    """Per cell a Gaussian started at the guide's moments and moved by ``steps`` Adam steps (learning
    rate ``lr``) on that cell's ELBO ``E_q[log p(x, z, l)] + H[q]`` (``particles`` reparameterised
    draws a step); returned with its scale × ``widening``, as a Student-t with ``df`` degrees of
    freedom when ``df`` is given.

    ``covariance="full"`` refines a full covariance (a Cholesky factor per cell, started at the
    guide's: :func:`guide_cholesky`), so the proposal can follow the posterior's correlations, which
    the guide misses; ``"diagonal"`` refines element-wise scales. The ELBO optimum of a Gaussian is
    too narrow for importance sampling (zero-forcing), hence ``widening``. On CellBench 5cl (top 2000
    genes, 200 epochs, 1000 draws) these defaults leave 97 % of held-out cells below k̂ 0.7, against
    51 % with 20 steps at rate 0.1 and 8 draws, and 54 % for a diagonal refinement.

    Only the per-cell parameters move: the gradient is taken with :func:`torch.autograd.grad` with
    respect to them alone, so the networks' weights and their ``.grad`` are untouched. All cells and
    draws are one vectorised pass per step.
    """
    if steps < 0 or particles < 1:
        raise ValueError(f"refine_steps must be ≥ 0 and refine_particles ≥ 1, got {steps} and {particles}.")
    if covariance not in ("full", "diagonal"):
        raise ValueError(f"refine_covariance must be 'full' or 'diagonal', got {covariance!r}.")
    if df is not None and not df > 0:
        raise ValueError(f"refine_df must be a positive number of degrees of freedom or None, got {df!r}.")
    start = local_guide_distributions(guide, batch)
    discrete = [name for name, fn in start.items() if fn.support.is_discrete]
    if discrete:
        raise ValueError(f"proposal='refined' moves continuous per-cell latents, but the guide's site(s) "
                         f"{discrete} are discrete: use proposal='guide' or 'defensive' for the marginal "
                         f"likelihood, and weights='uniform' for expression and DE.")
    params = {name: _RefinedGaussian(fn, covariance == "full") for name, fn in start.items()}
    leaves = [leaf for refined in params.values() for leaf in refined.leaves()]
    optimiser = torch.optim.Adam(leaves, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            q = {name: refined.distribution() for name, refined in params.items()}
            values = {name: fn.rsample((particles,)) for name, fn in q.items()}  # (P, n, ·) each
            entropy = sum(fn.entropy() for fn in q.values())  # (n,)
            elbo = _local_log_joint(model, batch, values).mean(0) + entropy  # (n,)
            grads = torch.autograd.grad(-elbo.sum(), leaves)
            for leaf, grad in zip(leaves, grads):
                leaf.grad = grad
            optimiser.step()
    return {name: refined.distribution(widening, df, detach=True) for name, refined in params.items()}


def proposal_guide(distributions: dict):
    """A guide function drawing each site of ``distributions`` ``{site: batch shape (n,)}`` inside a
    ``"cells"`` plate of ``n`` cells (it takes the model's arguments and ignores them)."""

    def guide(batch: Minibatch, *args, **kwargs):
        with plate(CELLS, batch.n_cells, dim=-1):
            for name, fn in distributions.items():
                pyro.sample(name, fn)

    return guide


def _with_parameters(fn, op):
    """``fn`` rebuilt with ``op(name)`` for each of its parameters (of the same family)."""
    if isinstance(fn, Independent):
        return _with_parameters(fn.base_dist, op).to_event(fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.MultivariateStudentT):
        return dist.MultivariateStudentT(fn.df, op("loc"), op("scale_tril"))
    if isinstance(fn, dist.MultivariateNormal):
        return dist.MultivariateNormal(op("loc"), scale_tril=op("scale_tril"))
    if isinstance(fn, dist.StudentT):
        return dist.StudentT(fn.df, op("loc"), op("scale"))
    if isinstance(fn, dist.Normal):
        return dist.Normal(op("loc"), op("scale"))
    raise TypeError(f"Cannot select cells of a {type(fn).__name__} proposal.")


def concatenate_cells(parts: list[dict], index=None) -> dict:
    """``{site: distribution}`` with batch shape ``(n,)`` of several minibatches' proposals
    (:func:`refined_proposal`), their cells concatenated in order, then the cells at positions
    ``index`` selected (all when ``None``)."""
    out = {}
    for name, first in parts[0].items():
        def op(attribute, name=name):
            bases = [part[name].base_dist if isinstance(part[name], Independent) else part[name]
                     for part in parts]
            joined = torch.cat([getattr(base, attribute) for base in bases])  # cells on the first axis
            return joined if index is None else joined[torch.as_tensor(index, device=joined.device)]

        out[name] = _with_parameters(first, op)
    return out
