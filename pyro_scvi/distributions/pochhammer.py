"""The count terms of the negative binomial by per-gene lookup tables instead of lgamma/digamma.

For an integer count x ≥ 0 and inverse dispersion θ > 0::

    lgamma(x + θ) − lgamma(θ) = Σ_{j<x} log(θ + j)          (log rising factorial, "log Pochhammer")
    d/dθ [ … ]               = Σ_{j<x} 1 / (θ + j)           (= digamma(x + θ) − digamma(θ))
    lgamma(x + 1)            = Σ_{j<x} log(1 + j)            (log x!)

With one θ per gene (scVI's default ``dispersion="gene"``), a table of the partial sums for
c = 0 … :data:`TABLE_SIZE` per gene costs G·TABLE_SIZE logarithms (a few hundred thousand, once per
step) and replaces the lgamma of every entry, and its digamma in the backward pass, by a lookup.
Counts above the table fall back to lgamma/digamma. The tables are summed in float64, so the
result is at least as accurate as float32 lgamma differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TABLE_SIZE", "log_pochhammer", "log_factorial", "is_integer_valued"]

#: counts up to this value are looked up; larger ones use lgamma/digamma
TABLE_SIZE = 64


def is_integer_valued(x: torch.Tensor) -> bool:
    """Whether every entry is a whole number (one pass; reads a flag back to the host)."""
    return bool(torch.all(x == torch.floor(x)))


def _partial_sums(terms: torch.Tensor) -> torch.Tensor:
    """``(…, TABLE_SIZE)`` terms → ``(…, TABLE_SIZE + 1)`` partial sums starting at 0."""
    return F.pad(terms.cumsum(-1), (1, 0))


def _table(theta: torch.Tensor, derivative: bool) -> torch.Tensor:
    """``(G, TABLE_SIZE + 1)`` table of Σ_{j<c} log(θ_g + j) (or of Σ 1/(θ_g + j)), float32."""
    shifted = theta.detach().double()[:, None] + torch.arange(
        TABLE_SIZE, dtype=torch.float64, device=theta.device
    )
    return _partial_sums(shifted.reciprocal() if derivative else shifted.log()).to(theta.dtype)


class _LogPochhammer(torch.autograd.Function):
    """``lgamma(x + θ_g) − lgamma(θ_g)`` for counts ``x`` whose gene is the last dim (dense
    layout, ``gene=None``) or given by ``gene`` (flat layout, ``x`` and ``gene`` of shape (k,))."""

    @staticmethod
    def forward(ctx, theta, x, gene):
        count = x.to(torch.int64)
        looked_up = count.clamp(max=TABLE_SIZE)
        if gene is None:  # (…, G): row offsets broadcast over the leading dims
            index = looked_up + torch.arange(theta.shape[0], device=x.device) * (TABLE_SIZE + 1)
        else:
            index = looked_up + gene * (TABLE_SIZE + 1)
        out = _table(theta, derivative=False).reshape(-1).take(index)
        large = torch.nonzero(count.reshape(-1) > TABLE_SIZE).squeeze(-1)
        if large.numel():
            x_large, theta_large = _at_large(x, gene, theta, large)
            out.view(-1)[large] = torch.lgamma(x_large + theta_large) - torch.lgamma(theta_large)
        ctx.save_for_backward(theta, x, index, large, gene if gene is not None else torch.empty(0))
        ctx.dense = gene is None
        return out

    @staticmethod
    def backward(ctx, grad):
        theta, x, index, large, gene = ctx.saved_tensors
        gene = None if ctx.dense else gene
        derivative = _table(theta, derivative=True).reshape(-1).take(index)
        if large.numel():
            x_large, theta_large = _at_large(x, gene, theta, large)
            derivative.view(-1)[large] = torch.digamma(x_large + theta_large) - torch.digamma(theta_large)
        weighted = grad * derivative
        if gene is None:
            grad_theta = weighted.reshape(-1, theta.shape[0]).sum(0)
        else:
            grad_theta = torch.zeros_like(theta).index_add_(0, gene, weighted)
        return grad_theta, None, None


def _at_large(x, gene, theta, large):
    """Counts and θ at the flat positions ``large`` (the entries beyond the table)."""
    x_large = x.reshape(-1)[large]
    genes = large % theta.shape[0] if gene is None else gene[large]
    return x_large, theta[genes]


def log_pochhammer(x: torch.Tensor, theta: torch.Tensor, gene: torch.Tensor | None = None) -> torch.Tensor:
    """``lgamma(x + θ) − lgamma(θ)`` for whole-number counts ``x`` and a per-gene ``θ`` of shape (G,).

    ``gene=None``: ``x`` has the genes on its last dim (``(…, G)``); otherwise ``x`` and ``gene``
    (gene indices) are flat ``(k,)``. Differentiable in ``θ``; the result has the shape of ``x``.
    """
    return _LogPochhammer.apply(theta, x, gene)


_LOG_FACTORIAL: dict[tuple, torch.Tensor] = {}


def log_factorial(x: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + 1)`` for whole-number counts (a table lookup up to :data:`TABLE_SIZE`)."""
    key = (x.dtype, x.device)
    if key not in _LOG_FACTORIAL:
        _LOG_FACTORIAL[key] = torch.lgamma(torch.arange(TABLE_SIZE + 1, dtype=torch.float64) + 1).to(
            dtype=x.dtype, device=x.device
        )
    count = x.to(torch.int64)
    out = _LOG_FACTORIAL[key].take(count.clamp(max=TABLE_SIZE))
    large = count > TABLE_SIZE
    if bool(large.any()):
        out = torch.where(large, torch.lgamma(x + 1), out)
    return out
