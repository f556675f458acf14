"""The amortised variational posterior of scVI as a Pyro guide function.

For each cell n, with ``h(x_n)``, ``μ_z(x_n)``, ``σ_z(x_n)`` from the z encoder::

    q(z_n | x_n) = Normal(μ_z, σ_z)                 guide="normal" (the default, mean-field)
                 = MultivariateNormal(μ_z, L L^T)   guide="full_rank": L = diag(σ_z) + strict_tril(W h + b)
                 = flow_K ∘ … ∘ flow_1 # Normal(μ_z, σ_z)   guide="flow": conditional couplings on h
    q(l_n | x_n) = Normal(μ_l(x_n), σ_l(x_n))       only when the log-library is latent (every guide)
    q(θ_g)       = LogNormal(m_g, s_g)              only with a dispersion hyper-prior (global, mean-field)

z is the pre-softmax Gaussian-family variable for the logistic-normal latent (``"ln"``) in every
family. The encoders read ``log1p(x_n)`` (``log_variational``) and, with ``encode_covariates=True``,
the continuous covariates and the one-hot batch and categorical covariates. On minified data
(counts dropped by ``SCVI.minify_adata``) q(z_n | x_n) is the normal posterior stored with the cells.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import register_kl

from ..models import sites

__all__ = ["scvi_guide", "sample_z_and_library", "z_posterior", "GUIDES"]


def normal_posterior(module, hidden, loc, scale) -> dist.Distribution:
    """Mean-field: batch (n,), event (d,)."""
    return dist.Normal(loc, scale).to_event(1)


def full_rank_posterior(module, hidden, loc, scale) -> dist.Distribution:
    """Full-rank Gaussian: Cholesky factor (n, d, d) with the encoder's σ on the diagonal."""
    return dist.MultivariateNormal(loc, scale_tril=module.z_cholesky(hidden, scale))


@register_kl(dist.MultivariateNormal, dist.Independent)
def _kl_full_rank_diagonal(q, p) -> torch.Tensor:
    """KL(N(μ, L Lᵀ) ‖ N(m, diag s²)) in closed form, so the full-rank guide keeps the analytic KL of
    the normal prior: Σ_i [log s_i − log L_ii + ((L Lᵀ)_ii + (μ_i − m_i)²) / (2 s_i²) − ½]."""
    base = p.base_dist
    if not isinstance(base, torch.distributions.Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError  # the ELBO then takes the Monte-Carlo estimate
    variance = base.scale.pow(2)  # (…, n, d)
    marginal = q.scale_tril.pow(2).sum(-1)  # diag(L Lᵀ), (…, n, d)
    log_det_ratio = base.scale.log() - q.scale_tril.diagonal(dim1=-2, dim2=-1).log()
    terms = log_det_ratio + (marginal + (q.loc - base.loc).pow(2)) / (2 * variance) - 0.5
    return terms.sum(-1)


def flow_posterior(module, hidden, loc, scale) -> dist.Distribution:
    """The encoder's Gaussian pushed through the conditional flow on ``hidden`` (n, H)."""
    return dist.TransformedDistribution(normal_posterior(module, hidden, loc, scale),
                                        module.z_flow.transforms(hidden))


#: guide family → builder of q(z | x) from the encoder's hidden layer (n, H), loc and scale (n, d)
Z_POSTERIORS = {"normal": normal_posterior, "full_rank": full_rank_posterior, "flow": flow_posterior}
GUIDES = tuple(Z_POSTERIORS)


def z_posterior(module, encoder_input, covariates) -> dist.Distribution:
    """q(z | x) of ``module.guide_family`` from the encoder input (n, G [+ C]): batch (n,), event (d,)."""
    hidden, loc, scale = module.z_encoder.encode(encoder_input, *covariates)  # (n, H), (n, d), (n, d)
    return Z_POSTERIORS[module.guide_family](module, hidden, loc, scale)


def scvi_guide(module, batch, transform_batch: int | None = None):
    """q(z, l | x) for one minibatch; takes the model's arguments (``transform_batch`` is unused:
    the encoder always sees the cell's own batch)."""
    pyro.module(sites.PYRO_MODULE, module)
    if module.dispersion_prior is not None:
        with pyro.plate(sites.GENES, module.n_input, dim=-1):
            pyro.sample(sites.INVERSE_DISPERSION, module.dispersion_posterior())  # (G,) or (G, B|L)

    with module.cells_plate(batch):
        sample_z_and_library(module, batch)  # (n, d)


def sample_z_and_library(module, batch):
    """Sample q(z | x) and, when the log-library is latent, q(l | x) inside the ``"cells"`` plate: the
    part of the guide scVI shares with the guides built on it (scANVI). Returns z (n, d)."""
    if batch.latent_loc is not None:  # minified data: the stored posterior
        if module.guide_family != "normal":
            raise ValueError(f"Minified data stores a diagonal Gaussian posterior, which the "
                             f"guide={module.guide_family!r} model cannot read; use the full counts.")
        qz = normal_posterior(module, None, batch.latent_loc, batch.latent_scale)  # (n, d) each
    else:
        encoder_input, covariates = module.encoder_input(batch)  # (n, G [+ C]), [(n, 1), ...]
        qz = z_posterior(module, encoder_input, covariates)  # batch (n,), event (d,)
    z = pyro.sample(sites.Z, qz)  # (n, d)

    if module.latent_library:
        library_loc, library_scale = module.library_encoder(encoder_input, *covariates)  # (n, 1) each
        pyro.sample(sites.LIBRARY, dist.Normal(library_loc, library_scale).to_event(1))  # (n, 1)
    return z
