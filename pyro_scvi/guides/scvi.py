"""The amortised variational posterior of scVI as a Pyro guide function.

For each cell n::

    q(z_n | x_n) = Normal(μ_z(x_n), σ_z(x_n))     (pre-softmax for the logistic-normal latent)
    q(l_n | x_n) = Normal(μ_l(x_n), σ_l(x_n))     only when the log-library is latent
    q(θ_g)       = LogNormal(m_g, s_g)            only with a dispersion hyper-prior (global, mean-field)

The encoders read ``log1p(x_n)`` (``log_variational``) and, with ``encode_covariates=True``, the
continuous covariates and the one-hot batch and categorical covariates. On minified data (counts
dropped by ``SCVI.minify_adata``) q(z_n | x_n) is the posterior stored with the cells.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

from ..models import sites

__all__ = ["scvi_guide"]


def scvi_guide(module, batch, transform_batch: int | None = None):
    """q(z, l | x) for one minibatch; takes the model's arguments (``transform_batch`` is unused:
    the encoder always sees the cell's own batch)."""
    pyro.module(sites.PYRO_MODULE, module)
    if module.dispersion_prior is not None:
        with pyro.plate(sites.GENES, module.n_input, dim=-1):
            pyro.sample(sites.INVERSE_DISPERSION, module.dispersion_posterior())  # (G,) or (G, B|L)

    with module.cells_plate(batch):
        if batch.latent_loc is not None:  # minified data: the stored posterior
            z_loc, z_scale = batch.latent_loc, batch.latent_scale  # (n, d) each
        else:
            encoder_input, covariates = module.encoder_input(batch)  # (n, G [+ C]), [(n, 1), ...]
            z_loc, z_scale = module.z_encoder(encoder_input, *covariates)  # (n, d) each
        pyro.sample(sites.Z, dist.Normal(z_loc, z_scale).to_event(1))  # (n, d)

        if module.latent_library:
            library_loc, library_scale = module.library_encoder(encoder_input, *covariates)  # (n, 1) each
            pyro.sample(sites.LIBRARY, dist.Normal(library_loc, library_scale).to_event(1))  # (n, 1)
