"""The generative model of scVI (Lopez et al. 2018) as a Pyro model function.

For each cell n with batch s_n::

    θ_g  ~ Gamma / LogNormal hyper-prior                only with ``dispersion_prior`` (global, "genes"
                                                        plate)
    z_n ~ p(z)                                          latent state, d dimensions: Normal(0, I) by
                                                        default, or a mixture (module.z_prior)
    l_n  = log Σ_g x_ng        (observed library, the default)
      or ~ Normal(m_{s_n}, v_{s_n})                     (latent log-library, module.library_prior)
    ρ_n  = softmax(f(z_n, s_n))                         normalized expression over G genes
    x_ng ~ ZINB(mean = exp(l_n)·ρ_ng, θ_g, π_ng)        or NB / Poisson / Normal

With ``latent_distribution="ln"`` the decoder sees ``softmax(z_n)`` (logistic-normal latent).
"""

from __future__ import annotations

import pyro

from . import sites

__all__ = ["scvi_model", "observe_counts"]


def scvi_model(module, batch, transform_batch: int | None = None):
    """p(x, z, l | s) for one minibatch.

    Parameters
    ----------
    module
        :class:`pyro_scvi.models.module.SCVIModule` holding the decoder and the dispersion.
    batch
        :class:`pyro_scvi.data.Minibatch` of ``n`` cells; ``batch.x=None`` samples the counts.
    transform_batch
        Batch code the decoder, the batch-specific dispersion and the library prior use for every
        cell instead of its own (counterfactual expression).
    """
    pyro.module(sites.PYRO_MODULE, module)
    theta = None
    if module.dispersion_prior is not None:  # global latent θ, its KL spread over the training cells
        with pyro.plate(sites.GENES, module.n_input, dim=-1):
            theta = pyro.sample(sites.INVERSE_DISPERSION, module.dispersion_hyperprior())  # (G,) or (G, B|L)

    with module.cells_plate(batch):  # n cells (a subsample of n_train_cells when θ is global)
        z = pyro.sample(sites.Z, module.z_prior(batch))  # (n, d)
        return observe_counts(module, batch, z, transform_batch, theta)  # (n, G)


def observe_counts(module, batch, z, transform_batch: int | None = None, theta=None):
    """The library and the counts given the latent ``z`` (n, d): the part of the model scVI shares with
    the models built on it (scANVI). Call it inside the ``"cells"`` plate; ``theta``: a draw of the
    global θ site, if any."""
    counterfactual = batch if transform_batch is None else batch.with_batch(transform_batch)
    batch_index = counterfactual.batch_index  # (n, 1)
    if module.use_size_factor:
        log_library = batch.size_factor.log()  # (n, 1)
    elif module.use_observed_lib_size:
        log_library = batch.log_library  # (n, 1)
    else:
        log_library = pyro.sample(sites.LIBRARY, module.library_prior(counterfactual))  # (n, 1)

    # (n, d [+ C + E]) and the categorical covariates [(n, 1), ...]
    decoder_input, covariates = module.decoder_input(z, batch, batch_index)
    hidden = module.decoder(decoder_input, *covariates)  # (n, H)
    rho = module.decoder.scale_head(hidden)  # (n, G), sums to 1 over genes
    # recorded before the mean is computed: queries of ρ alone end the replay here
    pyro.deterministic(sites.NORMALIZED_EXPRESSION, rho, event_dim=1)
    mean = log_library.exp() * rho  # (n, G), expected counts before zero-inflation
    pyro.deterministic(sites.MEAN, mean, event_dim=1)

    likelihood = module.likelihood(mean, hidden, batch_index, batch.labels, theta)  # batch shape (n, G)
    return pyro.sample(sites.X, likelihood.to_event(1), obs=batch.x)  # (n, G)
