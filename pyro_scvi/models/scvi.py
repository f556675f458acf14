"""The generative model of scVI (Lopez et al. 2018) as a Pyro model function.

For each cell n with batch s_n::

    z_n ~ Normal(0, I)                                  latent state, d dimensions
    l_n  = log Σ_g x_ng        (observed library, the default)
      or ~ Normal(m_{s_n}, v_{s_n})                     (latent log-library, per-batch prior)
    ρ_n  = softmax(f(z_n, s_n))                         normalized expression over G genes
    x_ng ~ ZINB(mean = exp(l_n)·ρ_ng, θ_g, π_ng)        or NB / Poisson / Normal

With ``latent_distribution="ln"`` the decoder sees ``softmax(z_n)`` (logistic-normal latent).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

__all__ = ["scvi_model"]


def scvi_model(module, batch, transform_batch: int | None = None):
    """p(x, z, l | s) for one minibatch.

    Parameters
    ----------
    module
        :class:`pyro_scvi.module.SCVIModule` holding the decoder and the dispersion.
    batch
        :class:`pyro_scvi.data.Minibatch` of ``n`` cells; ``batch.x=None`` samples the counts.
    transform_batch
        Batch code the decoder, the batch-specific dispersion and the library prior use for every
        cell instead of its own (counterfactual expression).
    """
    pyro.module("scvi", module)
    n, d = batch.n_cells, module.n_latent
    batch_index = batch.batch_index if transform_batch is None else batch.with_batch(transform_batch).batch_index
    zeros = batch.log_library.new_zeros((n, d))

    with pyro.plate("cells", n, dim=-1):
        z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))  # (n, d)

        if module.use_size_factor:
            log_library = batch.size_factor.log()  # (n, 1)
        elif module.use_observed_lib_size:
            log_library = batch.log_library  # (n, 1)
        else:
            prior_loc = module.library_log_means[0, batch_index]  # (n, 1)
            prior_scale = module.library_log_vars[0, batch_index].sqrt()  # (n, 1)
            log_library = pyro.sample("library", dist.Normal(prior_loc, prior_scale).to_event(1))  # (n, 1)

        decoder_input, covariates = module.decoder_input(z, batch, batch_index)  # (n, d [+ C + E]), [(n, 1), ...]
        hidden = module.decoder(decoder_input, *covariates)  # (n, H)
        rho = module.decoder.scale_head(hidden)  # (n, G), sums to 1 over genes
        mean = log_library.exp() * rho  # (n, G), expected counts before zero-inflation
        pyro.deterministic("normalized_expression", rho, event_dim=1)
        pyro.deterministic("mean", mean, event_dim=1)

        likelihood = module.likelihood(mean, hidden, batch_index, batch.labels)  # batch shape (n, G)
        return pyro.sample("x", likelihood.to_event(1), obs=batch.x)  # (n, G)
