"""The amortised variational posterior of scANVI as a Pyro guide function.

For each cell n::

    q(z1_n | x_n)        scVI's encoder (and q(l_n | x_n) when the library is latent)
    q(y_n | z1_n)        = Categorical(softmax(classifier(z1_n)))       read at the *sampled* z1
    q(z2_n | z1_n, y_n)  = Normal(m(z1_n, y_n), v(z1_n, y_n))           ``module.z2_encoder``

``y`` is marked for parallel enumeration: under ``poutine.enum`` it takes all ``L`` labels at
dim −2 (value ``(L, 1)``) and ``z2`` gets one draw per (label, cell), ``(L, n, d)``; without it
``y`` is sampled, ``(n,)``. Observed labels are never used here (scvi-tools' loss marginalises
``y`` for every cell; labelled cells enter through the classification term instead).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

from ..models import sites
from ..models.scanvi import Z2, Y
from .scvi import sample_z_and_library

__all__ = ["scanvi_guide"]


def scanvi_guide(module, batch, transform_batch: int | None = None):
    """q(z1, y, z2, l | x) for one minibatch; takes the model's arguments (``transform_batch`` is
    unused)."""
    pyro.module(sites.PYRO_MODULE, module)
    with module.cells_plate(batch):  # n cells
        z1 = sample_z_and_library(module, batch)  # (n, d)
        probs = module.classify(z1)  # (n, L)
        y = pyro.sample(Y, dist.Categorical(probs), infer={"enumerate": "parallel"})  # (n,) or (L, 1)
        loc, scale = module.z2_posterior(z1, y)  # (…, n, d) each
        pyro.sample(Z2, dist.Normal(loc, scale).to_event(1))  # (n, d) or (L, n, d)
