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

from ..models import sites

__all__ = ["scvi_guide", "z_posterior", "GUIDES"]


def normal_posterior(module, hidden, loc, scale) -> dist.Distribution:
    """Mean-field: batch (n,), event (d,)."""
    return dist.Normal(loc, scale).to_event(1)


def full_rank_posterior(module, hidden, loc, scale) -> dist.Distribution:
    """Full-rank Gaussian: Cholesky factor (n, d, d) with the encoder's σ on the diagonal."""
    return dist.MultivariateNormal(loc, scale_tril=module.z_cholesky(hidden, scale))


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
        if batch.latent_loc is not None:  # minified data: the stored posterior
            if module.guide_family != "normal":
                raise ValueError(f"Minified data stores a diagonal Gaussian posterior, which the "
                                 f"guide={module.guide_family!r} model cannot read; use the full counts.")
            qz = normal_posterior(module, None, batch.latent_loc, batch.latent_scale)  # (n, d) each
        else:
            encoder_input, covariates = module.encoder_input(batch)  # (n, G [+ C]), [(n, 1), ...]
            qz = z_posterior(module, encoder_input, covariates)  # batch (n,), event (d,)
        pyro.sample(sites.Z, qz)  # (n, d)

        if module.latent_library:
            library_loc, library_scale = module.library_encoder(encoder_input, *covariates)  # (n, 1) each
            pyro.sample(sites.LIBRARY, dist.Normal(library_loc, library_scale).to_event(1))  # (n, 1)
