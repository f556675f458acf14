"""A conditional normalizing flow on z for the ``guide="flow"`` posterior.

``q(z | x)`` is the encoder's diagonal Gaussian pushed through ``n_flows`` conditional affine
coupling layers (:func:`pyro.distributions.transforms.conditional_affine_coupling`), each
conditioned on the encoder's hidden representation ``h(x)``, with the coordinates reversed between
layers so that every coordinate is transformed, and once more at the end when needed to restore
the order (an even number of reversals)::

    z_0 ~ Normal(μ(x), σ(x)),   z_k = f_k(reverse(z_{k−1}) if k > 1 else z_0; h(x)),
    z = z_K, or reverse(z_K) when K is even

A coupling layer keeps the first ``⌊d/2⌋`` coordinates and applies an affine map to the rest whose
location and log-scale are a network of the kept half and ``h``; its inverse and Jacobian are
exact and cheap, so ``log q(z | x)`` is exact at any ``z`` (importance sampling, DReG), not only at
the flow's own draws. The last layer of each network is initialised at zero: the flow starts at
the identity and the guide as the mean-field one.
"""

from __future__ import annotations

import torch
from pyro.distributions.transforms import Permute, conditional_affine_coupling
from torch import nn

__all__ = ["ConditionalLatentFlow"]


class ConditionalLatentFlow(nn.Module):
    """``n_flows`` conditional affine couplings on ``d``-dimensional z, conditioned on a context
    ``(…, n, n_context)`` (the encoder's hidden layer); ``hidden_dims`` are each coupling network's
    hidden widths (default ``[n_context]``)."""

    def __init__(self, n_latent: int, n_context: int, n_flows: int = 2,
                 hidden_dims: list[int] | None = None) -> None:
        super().__init__()
        if n_latent < 2:
            raise ValueError(f"guide='flow' needs n_latent >= 2 (a coupling layer splits z in two), "
                             f"got n_latent={n_latent}; use guide='normal' or 'full_rank'.")
        if not isinstance(n_flows, int) or isinstance(n_flows, bool) or n_flows < 1:
            raise ValueError(f"n_flows must be a positive integer, got {n_flows!r}.")
        hidden_dims = list(hidden_dims or [n_context])
        self.couplings = nn.ModuleList(
            conditional_affine_coupling(n_latent, n_context, hidden_dims=hidden_dims) for _ in range(n_flows)
        )
        for coupling in self.couplings:
            last = coupling.nn.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.register_buffer("reverse", torch.arange(n_latent - 1, -1, -1), persistent=False)

    def transforms(self, context: torch.Tensor) -> list:
        """The transforms ``[f_1(·; h), reverse, f_2(·; h), …, f_K(·; h)(, reverse)]`` for ``context``
        ``h`` ``(…, n, n_context)``: an even number of reversals, so that the initial flow is the identity."""
        out = []
        for k, coupling in enumerate(self.couplings):
            if k > 0:
                out.append(Permute(self.reverse))
            out.append(coupling.condition(context))
        if len(self.couplings) % 2 == 0:
            out.append(Permute(self.reverse))
        return out
