"""Neural networks of scVI: the fully connected block, the Gaussian encoders and the decoder.

The layer layout reproduces scvi-tools' (``Layer i`` blocks with fixed slots
``0 Linear, 1 BatchNorm, 2 LayerNorm, 3 ReLU, 4 Dropout``, empty slots kept as ``None``) so that
weights map one-to-one onto scvi-tools' state dicts; the heads carry descriptive names here and
``pyro_scvi.io`` holds the translation to scvi-tools' names.

Shapes: ``n`` cells, optionally a leading sample axis ``S`` (``(S, n, ·)`` inputs are accepted
everywhere; BatchNorm then sees the flattened ``(S·n, ·)`` rows).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FCLayers", "GaussianEncoder", "CholeskyHead", "ExpressionDecoder", "one_hot_covariates",
           "resolve_activation"]


def resolve_activation(var_activation) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Map ``None``, ``"exp"``, ``"softplus"``, ``torch.exp`` or ``nn.Softplus()`` to (name, function).

    Only named activations are accepted so that a saved model can be rebuilt without pickling code.
    """
    if var_activation is None or var_activation is torch.exp or var_activation == "exp":
        return "exp", torch.exp
    if var_activation == "softplus" or var_activation is F.softplus or (
        isinstance(var_activation, nn.Softplus)
        and var_activation.beta == 1
        and var_activation.threshold == 20
    ):
        return "softplus", F.softplus
    raise ValueError(
        f"var_activation={var_activation!r} is not supported; use None/'exp' (the default) or "
        "'softplus' (torch.nn.Softplus())."
    )


def one_hot_covariates(categorical: Sequence[torch.Tensor], n_categories: Sequence[int]
                       ) -> torch.Tensor | None:
    """One-hot encode integer codes ``(n, 1)`` per covariate and concatenate: ``(n, Σ K_j)``.

    Covariates with at most one category contribute no columns (as in scvi-tools).
    """
    blocks = [
        F.one_hot(codes.reshape(-1).long(), k).to(torch.get_default_dtype())
        for codes, k in zip(categorical, n_categories)
        if k > 1
    ]
    if not blocks:
        return None
    return torch.cat(blocks, dim=-1)


class FCLayers(nn.Module):
    """Stack of ``Linear → [BatchNorm] → [LayerNorm] → ReLU → [Dropout]`` blocks.

    Categorical covariates (integer codes, one tensor ``(n, 1)`` per covariate) are one-hot encoded
    and concatenated to the input of the first block, and of every block when
    ``inject_covariates``.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        use_activation: bool = True,
        inject_covariates: bool = True,
    ) -> None:
        super().__init__()
        self.n_cat_list = [k if k > 1 else 0 for k in (n_cat_list or [])]
        self.inject_covariates = inject_covariates
        n_cov = sum(self.n_cat_list)
        sizes = [n_in] + (n_layers - 1) * [n_hidden] + [n_out]
        blocks = OrderedDict()
        for i, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            n_injected = n_cov if self._injects(i) else 0
            blocks[f"Layer {i}"] = nn.Sequential(
                nn.Linear(size_in + n_injected, size_out),
                nn.BatchNorm1d(size_out, momentum=0.01, eps=1e-3) if use_batch_norm else None,
                nn.LayerNorm(size_out, elementwise_affine=False) if use_layer_norm else None,
                nn.ReLU() if use_activation else None,
                nn.Dropout(p=dropout_rate) if dropout_rate > 0 else None,
            )
        self.fc_layers = nn.Sequential(blocks)

    def _injects(self, layer: int) -> bool:
        return layer == 0 or self.inject_covariates

    def forward(self, x: torch.Tensor, *categorical: torch.Tensor, one_hot: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``x``: (…, n, n_in); ``categorical``: codes (n, 1) each. Returns (…, n, n_out).

        ``one_hot``: the covariates already one-hot encoded, (…, n, Σ K) with the leading shape of
        ``x``, in place of ``categorical`` (e.g. scANVI's labels, enumerated along a leading axis)."""
        covariates = one_hot_covariates(categorical, self.n_cat_list) if one_hot is None else one_hot
        if covariates is not None and covariates.shape[-1] != sum(self.n_cat_list):
            raise ValueError(f"FCLayers expects {sum(self.n_cat_list)} one-hot covariate columns, "
                             f"got {covariates.shape[-1]}.")
        for i, block in enumerate(self.fc_layers):
            for layer in block:
                if layer is None:
                    continue
                if isinstance(layer, nn.Linear) and covariates is not None and self._injects(i):
                    x = torch.cat([x, covariates.expand(*x.shape[:-1], -1)], dim=-1)
                if isinstance(layer, nn.BatchNorm1d) and x.dim() > 2:
                    x = layer(x.reshape(-1, x.shape[-1])).reshape(x.shape)
                else:
                    x = layer(x)
        return x


class GaussianEncoder(nn.Module):
    """Amortised diagonal Gaussian: input (…, n, n_in) → loc, scale (…, n, n_out).

    The variance is ``var_activation(raw) + var_eps`` and the scale its square root, as in scVI.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        var_activation=None,
        var_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.hidden = FCLayers(
            n_input, n_hidden, n_cat_list, n_layers, n_hidden, dropout_rate,
            use_batch_norm, use_layer_norm, inject_covariates=inject_covariates,
        )
        self.loc_head = nn.Linear(n_hidden, n_output)
        self.var_head = nn.Linear(n_hidden, n_output)
        self.var_activation_name, self.var_activation = resolve_activation(var_activation)
        self.var_eps = var_eps

    def forward(self, x: torch.Tensor, *categorical: torch.Tensor, one_hot: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(x, *categorical, one_hot=one_hot)[1:]

    def encode(self, x: torch.Tensor, *categorical: torch.Tensor, one_hot: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden representation h (…, n, n_hidden), loc and scale (…, n, n_out): what the richer
        guides condition on (:class:`CholeskyHead`, :class:`~.flows.ConditionalLatentFlow`).
        ``one_hot``: see :meth:`FCLayers.forward`."""
        h = self.hidden(x, *categorical, one_hot=one_hot)
        loc = self.loc_head(h)
        scale = (self.var_activation(self.var_head(h)) + self.var_eps).sqrt()
        return h, loc, scale


class CholeskyHead(nn.Module):
    """The strictly-lower-triangular part of a Cholesky factor from an encoder's hidden layer.

    ``off_diagonal`` is a Linear layer ``n_hidden → d(d−1)/2``, initialised at zero, so that a
    full-rank guide starts as the mean-field one. :meth:`forward` puts the encoder's positive
    scale ``(…, n, d)`` on the diagonal: ``L = diag(scale) + strict_tril(off_diagonal(h))``.
    """

    def __init__(self, n_hidden: int, n_latent: int) -> None:
        super().__init__()
        self.n_latent = n_latent
        self.off_diagonal = nn.Linear(n_hidden, n_latent * (n_latent - 1) // 2)
        nn.init.zeros_(self.off_diagonal.weight)
        nn.init.zeros_(self.off_diagonal.bias)
        rows, cols = torch.tril_indices(n_latent, n_latent, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, hidden: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``hidden`` (…, n, n_hidden), ``scale`` (…, n, d) → ``scale_tril`` (…, n, d, d)."""
        scale_tril = torch.diag_embed(scale)
        scale_tril[..., self.rows, self.cols] = self.off_diagonal(hidden)
        return scale_tril


class ExpressionDecoder(nn.Module):
    """Decoder from latent (…, n, n_in) to per-gene quantities (…, n, G).

    ``hidden`` is the shared MLP (no dropout); the heads are
    ``scale_head`` (normalized expression ρ: softmax over genes, or softplus when a size factor is
    used), ``dispersion_head`` (log θ per cell, for ``dispersion="gene-cell"``) and
    ``zero_inflation_head`` (zero-inflation logits). Heads are evaluated only when asked for.
    """

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        scale_activation: str = "softmax",
    ) -> None:
        super().__init__()
        self.hidden = FCLayers(
            n_input, n_hidden, n_cat_list, n_layers, n_hidden, dropout_rate=0.0,
            use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        if scale_activation not in ("softmax", "softplus"):
            raise ValueError(f"scale_activation must be 'softmax' or 'softplus', got {scale_activation!r}.")
        activation = nn.Softmax(dim=-1) if scale_activation == "softmax" else nn.Softplus()
        self.scale_head = nn.Sequential(nn.Linear(n_hidden, n_genes), activation)
        self.dispersion_head = nn.Linear(n_hidden, n_genes)
        self.zero_inflation_head = nn.Linear(n_hidden, n_genes)

    def forward(self, z: torch.Tensor, *categorical: torch.Tensor) -> torch.Tensor:
        """Hidden representation h (…, n, n_hidden); apply the heads to it."""
        return self.hidden(z, *categorical)
