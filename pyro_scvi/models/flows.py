"""A conditional normalizing flow on z for the ``guide="flow"`` posterior.

``q(z | x)`` is the encoder's diagonal Gaussian pushed through ``n_flows`` conditional affine
coupling layers (:class:`pyro.distributions.transforms.ConditionalAffineCoupling`), each
conditioned on the encoder's hidden representation ``h(x)``, with the coordinates reversed between
layers so that every coordinate is transformed, and once more at the end when needed to restore
the order (an even number of reversals)::

    z_0 ~ Normal(μ(x), σ(x)),   z_k = f_k(reverse(z_{k−1}) if k > 1 else z_0; h(x)),
    z = z_K, or reverse(z_K) when K is even

A coupling layer keeps the first ``k = ⌊d/2⌋`` coordinates ``a`` and maps the rest ``b`` to
``b · exp(s(a, h)) + A(h) a + t(a, h)``: a linear shift in ``a`` whose ``(d − k) × k`` matrix comes
from the context, plus a bounded correction from a ``tanh`` network (:class:`AffineConditioner`).
Its inverse and Jacobian are exact and cheap, so ``log q(z | x)`` is exact at any ``z``
(importance sampling, DReG), not only at the flow's own draws.

Why the linear term and ``tanh``: far from the bulk the network saturates, so every layer becomes
affine and q keeps Gaussian tails with the bulk's orientation. With a ReLU network the shift
extrapolates with a different slope on each side, q is lighter than a Gaussian posterior far out,
and the importance weights get a heavy tail (Pareto k̂ ≈ 1 on an exactly Gaussian posterior). Two
layers can represent any correlated Gaussian exactly. Every output layer starts at zero: the flow
starts at the identity and the guide as the mean-field one.
"""

from __future__ import annotations

import torch
from pyro.distributions.transforms import ConditionalAffineCoupling, Permute
from torch import nn

__all__ = ["AffineConditioner", "ConditionalLatentFlow"]


class AffineConditioner(nn.Module):
    """``(shift, log_scale)`` of a coupling's transformed half ``(…, n, n_out)`` from its kept half
    ``a`` ``(…, n, n_kept)`` and the context ``h`` ``(n, n_context)``:
    ``shift = A(h) a + t(a, h)``, ``log_scale = s(a, h)``, with ``A`` linear in ``h`` and ``(t, s)`` a
    ``tanh`` network with ``hidden_dims``. Output layers start at zero (the identity map)."""

    def __init__(self, n_kept: int, n_out: int, n_context: int, hidden_dims: list[int]) -> None:
        super().__init__()
        self.n_kept, self.n_out = n_kept, n_out
        self.shift_matrix = nn.Linear(n_context, n_out * n_kept)
        layers, width = [], n_kept + n_context
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        self.correction = nn.Sequential(*layers, nn.Linear(width, 2 * n_out))
        for last in (self.shift_matrix, self.correction[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, kept: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = context.expand(kept.shape[:-1] + context.shape[-1:])  # (…, n, n_context)
        matrix = self.shift_matrix(context).unflatten(-1, (self.n_out, self.n_kept))  # (…, n, out, kept)
        linear = (matrix @ kept.unsqueeze(-1)).squeeze(-1)  # (…, n, out)
        shift, log_scale = self.correction(torch.cat([kept, context], -1)).chunk(2, -1)  # (…, n, out) each
        return linear + shift, log_scale


class ConditionalLatentFlow(nn.Module):
    """``n_flows`` conditional affine couplings on ``d``-dimensional z, conditioned on a context
    ``(n, n_context)`` (the encoder's hidden layer); ``hidden_dims`` are each coupling network's
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
        kept = n_latent // 2
        self.couplings = nn.ModuleList(
            ConditionalAffineCoupling(kept, AffineConditioner(kept, n_latent - kept, n_context, hidden_dims))
            for _ in range(n_flows)
        )
        self.register_buffer("reverse", torch.arange(n_latent - 1, -1, -1), persistent=False)

    def transforms(self, context: torch.Tensor) -> list:
        """The transforms ``[f_1(·; h), reverse, f_2(·; h), …, f_K(·; h)(, reverse)]`` for ``context``
        ``h`` ``(n, n_context)``: an even number of reversals, so that the initial flow is the identity."""
        out = []
        for k, coupling in enumerate(self.couplings):
            if k > 0:
                out.append(Permute(self.reverse))
            out.append(coupling.condition(context))
        if len(self.couplings) % 2 == 0:
            out.append(Permute(self.reverse))
        return out
