"""Names of the plates and sample sites of scVI's model and guide: one source for each name.

Shapes: ``n`` cells of a minibatch, ``G`` genes, ``d = n_latent``, ``B`` batches, ``L`` labels,
``S`` posterior draws (the ``"particles"`` plate, when a query vectorises over draws).

Plates
------
==================  =========  ==============================================================
name                dim        what it covers
==================  =========  ==============================================================
``CELLS``           −1         the cells of a minibatch; sites inside are *local* (one per cell).
                               With a global latent its size is the number of training cells
                               and the minibatch its subsample (``SCVIModule.cells_plate``).
``GENES``           −1         the genes of a global per-gene site (``INVERSE_DISPERSION``)
``PARTICLES``       −2         ``S`` vectorised draws around the model and guide (queries,
                               importance sampling, predictive checks)
==================  =========  ==============================================================

Sites
-----
=========================  =========================================  =======================
name                       kind, shape                                written by / read by
=========================  =========================================  =======================
``Z`` "z"                  latent in ``CELLS``, model and guide,      models.scvi, guides.scvi;
                           event ``(d,)``: ``(n, d)``                 infer.importance, the
                                                                      queries of the user API
``LIBRARY`` "library"      latent in ``CELLS`` (only with a latent    models.scvi, guides.scvi;
                           library), event ``(1,)``: ``(n, 1)``        infer.importance,
                                                                      get_latent_library_size
``X`` "x"                  observed counts in ``CELLS``,              models.scvi; infer.elbo
                           event ``(G,)``: ``(n, G)``                 (reconstruction), infer.
                                                                      importance, predictive
                                                                      sampling, diagnostics
``NORMALIZED_EXPRESSION``  deterministic ρ in ``CELLS``, event         models.scvi;
"normalized_expression"    ``(G,)``: ``(n, G)``, sums to 1 over genes get_normalized_expression,
                                                                      differential expression
``MEAN`` "mean"            deterministic ``exp(l)·ρ`` in ``CELLS``,    models.scvi;
                           event ``(G,)``: ``(n, G)``                 get_normalized_expression
                                                                      (``library_size="latent"``)
``INVERSE_DISPERSION``     global latent θ in ``GENES`` (only with     models.scvi, guides.scvi;
"inverse_dispersion"       ``dispersion_prior``): ``(G,)`` or         infer.elbo and infer.
                           ``(G, B|L)``                               importance (as a global)
=========================  =========================================  =======================

``PYRO_MODULE`` ("scvi") is the name under which model and guide register the ``SCVIModule``
with ``pyro.module``: its weights are ``scvi$$$<parameter>`` in the (per-model) parameter store.

A custom model/guide pair must use ``CELLS``, ``Z`` and ``X`` and may add any other sites (see
:mod:`pyro_scvi.models.contract`).
"""

from __future__ import annotations

__all__ = [
    "CELLS", "GENES", "PARTICLES",
    "Z", "LIBRARY", "X", "NORMALIZED_EXPRESSION", "MEAN", "INVERSE_DISPERSION",
    "DETERMINISTIC_SITES", "PYRO_MODULE", "cell_frame",
]

# -- plates -----------------------------------------------------------------------------------
CELLS = "cells"
GENES = "genes"
PARTICLES = "particles"

# -- sites --------------------------------------------------------------------------------------
Z = "z"
LIBRARY = "library"
X = "x"
NORMALIZED_EXPRESSION = "normalized_expression"
MEAN = "mean"
INVERSE_DISPERSION = "inverse_dispersion"

#: the sites the model records with ``pyro.deterministic`` (not sampled)
DETERMINISTIC_SITES = (NORMALIZED_EXPRESSION, MEAN)

PYRO_MODULE = "scvi"


def cell_frame(site):
    """The ``CELLS`` plate frame of a trace site, or ``None`` for a global site."""
    for frame in site["cond_indep_stack"]:
        if frame.name == CELLS:
            return frame
    return None
