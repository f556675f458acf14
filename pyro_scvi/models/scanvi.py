"""The generative model of scANVI (Xu et al. 2021) as a Pyro model function.

For each cell n, with ``L`` cell types::

    y_n   ~ Categorical(π)                         cell type; π = module.y_prior (uniform by default)
    z2_n  ~ Normal(0, I_d)                         within-type variation
    z1_n  ~ Normal(μ(z2_n, y_n), σ(z2_n, y_n))     the scVI latent ("z"), from ``module.z1_decoder``
    l_n, x_n | z1_n                                exactly scVI's library and count model

The labels never reach the expression decoder: every site from ``l`` on is shared with
:func:`pyro_scvi.models.scvi.scvi_model` (:func:`observe_counts`).

The function runs with ``y`` sampled (shapes ``(n,)``) or enumerated by the guide (``y`` replayed
as ``(L, 1)``, all labels at dim −2): then ``z2`` is ``(L, n, d)`` and ``log p(z1 | z2, y)`` is
``(L, n)``, one value per label. How the training objective weights these terms is in
:mod:`pyro_scvi.infer.scanvi`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from . import sites
from .scvi import observe_counts

__all__ = ["scanvi_model", "Y", "Z2"]

#: the cell-type site (a latent in the model; the guide enumerates it)
Y = "y"
#: the second-level latent site
Z2 = "z2"


def scanvi_model(module, batch, transform_batch: int | None = None):
    """p(x, z1, z2, y, l | s) for one minibatch (``module``: a
    :class:`~pyro_scvi.models.scanvi_module.SCANVIModule`)."""
    pyro.module(sites.PYRO_MODULE, module)
    n, d = batch.n_cells, module.n_latent
    with module.cells_plate(batch):  # n cells
        y = pyro.sample(Y, dist.Categorical(module.y_prior.expand(n, -1)))  # (n,) or (L, 1) enumerated
        zeros = torch.zeros(n, d, device=batch.batch_index.device)
        # a tensor scale (a number would be copied to the device from the host at every step)
        z2 = pyro.sample(Z2, dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))  # (n, d) or (L, n, d)
        loc, scale = module.z1_prior(z2, y)  # (…, n, d) each
        z1 = pyro.sample(sites.Z, dist.Normal(loc, scale).to_event(1))  # (n, d): sampled once by the guide
        return observe_counts(module, batch, z1, transform_batch)  # (n, G)
