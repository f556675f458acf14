"""``SCVIModule``: the networks and parameters of one scVI model, bound to its model and guide.

The module owns every weight (encoders, decoder, gene dispersion, library prior); the Pyro model
and guide functions in :mod:`pyro_scvi.models` and :mod:`pyro_scvi.guides` read them. Pyro sees
them through ``pyro.module`` inside a parameter-store scope private to the ``SCVI`` instance, so
two models never share weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .data.minibatch import Minibatch
from .guides.scvi import scvi_guide
from .models.likelihoods import LIKELIHOODS, expression_likelihood
from .models.scvi import scvi_model
from .nn import ExpressionDecoder, GaussianEncoder

__all__ = ["SCVIModule", "DISPERSIONS", "LATENT_DISTRIBUTIONS", "NORM_PLACEMENTS"]

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
BATCH_REPRESENTATIONS = ("one-hot", "embedding")
LATENT_DISTRIBUTIONS = ("normal", "ln")
NORM_PLACEMENTS = ("encoder", "decoder", "both", "none")


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


class SCVIModule(nn.Module):
    """Networks and parameters of scVI for ``G`` genes, ``B`` batches and ``L`` labels.

    Arguments follow scvi-tools' ``VAE``. Notable members:

    * ``z_encoder``: q(z | x) (``GaussianEncoder``, ``n_layers`` hidden layers)
    * ``library_encoder``: q(l | x) for the log-library (one hidden layer; unused when the library
      is observed, but always built, as in scvi-tools, so weights map one-to-one)
    * ``decoder``: ``ExpressionDecoder`` from z to normalized expression ρ
    * ``log_dispersion``: log θ, shape ``(G,)``, ``(G, B)`` or ``(G, L)``; ``None`` for ``gene-cell``
    * ``batch_embedding`` (``nn.Embedding(B, 5)``) when ``batch_representation="embedding"``
    * buffers ``library_log_means`` / ``library_log_vars`` ``(1, B)``: the per-batch prior of the
      log-library when it is latent
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 1,
        n_labels: int = 1,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        log_variational: bool = True,
        gene_likelihood: str = "zinb",
        latent_distribution: str = "normal",
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        use_size_factor_key: bool = False,
        use_observed_lib_size: bool = True,
        library_log_means=None,
        library_log_vars=None,
        var_activation=None,
        batch_representation: str = "one-hot",
        batch_embedding_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        _check_choice("dispersion", dispersion, DISPERSIONS)
        _check_choice("gene_likelihood", gene_likelihood, tuple(LIKELIHOODS))
        _check_choice("latent_distribution", latent_distribution, LATENT_DISTRIBUTIONS)
        _check_choice("use_batch_norm", use_batch_norm, NORM_PLACEMENTS)
        _check_choice("use_layer_norm", use_layer_norm, NORM_PLACEMENTS)
        _check_choice("batch_representation", batch_representation, BATCH_REPRESENTATIONS)
        self.n_input, self.n_batch, self.n_labels, self.n_latent = n_input, max(n_batch, 1), max(n_labels, 1), n_latent
        self.dispersion = dispersion
        self.gene_likelihood = gene_likelihood
        self.latent_distribution = latent_distribution
        self.log_variational = log_variational
        self.encode_covariates = encode_covariates
        self.use_size_factor = bool(use_size_factor_key)
        self.use_observed_lib_size = bool(use_size_factor_key) or use_observed_lib_size
        self.n_continuous_cov = n_continuous_cov

        # the batch enters as a one-hot covariate, or as a learned embedding appended to the inputs
        self.batch_representation = batch_representation
        n_embedding = 0
        if batch_representation == "embedding":
            embedding_kwargs = dict(batch_embedding_kwargs or {})
            n_embedding = int(embedding_kwargs.pop("embedding_dim", 5))
            if embedding_kwargs:
                raise ValueError(f"Unknown batch_embedding_kwargs {sorted(embedding_kwargs)}; only embedding_dim is accepted.")
            self.batch_embedding = nn.Embedding(self.n_batch, n_embedding)
        cat_list = ([] if n_embedding else [self.n_batch]) + list(n_cats_per_cov or [])
        encoder_cats = cat_list if encode_covariates else None
        n_input_encoder = n_input + ((n_continuous_cov + n_embedding) if encode_covariates else 0)
        bn_encoder = use_batch_norm in ("encoder", "both")
        bn_decoder = use_batch_norm in ("decoder", "both")
        ln_encoder = use_layer_norm in ("encoder", "both")
        ln_decoder = use_layer_norm in ("decoder", "both")

        self.z_encoder = GaussianEncoder(
            n_input_encoder, n_latent, encoder_cats, n_layers, n_hidden, dropout_rate,
            bn_encoder, ln_encoder, inject_covariates=deeply_inject_covariates, var_activation=var_activation,
        )
        self.library_encoder = GaussianEncoder(
            n_input_encoder, 1, encoder_cats, 1, n_hidden, dropout_rate,
            bn_encoder, ln_encoder, inject_covariates=deeply_inject_covariates, var_activation=var_activation,
        )
        self.decoder = ExpressionDecoder(
            n_latent + n_continuous_cov + n_embedding, n_input, cat_list, n_layers, n_hidden,
            bn_decoder, ln_decoder, inject_covariates=deeply_inject_covariates,
            scale_activation="softplus" if self.use_size_factor else "softmax",
        )
        dispersion_shape = {"gene": (n_input,), "gene-batch": (n_input, self.n_batch), "gene-label": (n_input, self.n_labels)}
        if dispersion in dispersion_shape:
            self.log_dispersion = nn.Parameter(torch.randn(dispersion_shape[dispersion]))
        else:
            self.register_parameter("log_dispersion", None)
        if not self.use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("A latent library size needs library_log_means and library_log_vars, shape (1, n_batch).")
            self.register_buffer("library_log_means", torch.as_tensor(library_log_means, dtype=torch.float32).reshape(1, -1))
            self.register_buffer("library_log_vars", torch.as_tensor(library_log_vars, dtype=torch.float32).reshape(1, -1))
        #: parameter name → boolean mask of entries that training must not change (query mapping)
        self.frozen_parameters: dict[str, torch.Tensor] = {}

    # -- the probabilistic program ---------------------------------------------------------------
    def model(self, batch: Minibatch, transform_batch: int | None = None):
        """The generative model p(x, z, l) on ``batch`` (see :func:`pyro_scvi.models.scvi_model`)."""
        return scvi_model(self, batch, transform_batch=transform_batch)

    def guide(self, batch: Minibatch, transform_batch: int | None = None):
        """The amortised posterior q(z, l | x) (see :func:`pyro_scvi.guides.scvi_guide`)."""
        return scvi_guide(self, batch, transform_batch=transform_batch)

    # -- pieces the model and guide use ----------------------------------------------------------
    @property
    def latent_library(self) -> bool:
        """Whether the log-library is a latent variable (``use_observed_lib_size=False``)."""
        return not self.use_observed_lib_size

    @property
    def uses_batch_embedding(self) -> bool:
        return self.batch_representation == "embedding"

    def _categorical(self, batch: Minibatch, batch_index: torch.Tensor) -> list[torch.Tensor]:
        covariates = batch.categorical(batch_index)
        return covariates[1:] if self.uses_batch_embedding else covariates

    def encoder_input(self, batch: Minibatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input of both encoders ``(n, G [+ C] [+ E])`` and their categorical covariates."""
        x = batch.x
        if x is None:
            raise ValueError("The guide needs the counts of the cells (batch.x is None).")
        h = torch.log1p(x) if self.log_variational else x
        if not self.encode_covariates:
            return h, []
        if batch.continuous_covariates is not None and self.n_continuous_cov > 0:
            h = torch.cat([h, batch.continuous_covariates], dim=-1)
        if self.uses_batch_embedding:
            h = torch.cat([h, self.batch_embedding(batch.batch_index.reshape(-1))], dim=-1)
        return h, self._categorical(batch, batch.batch_index)

    def latent_transform(self, z: torch.Tensor) -> torch.Tensor:
        """Map the Gaussian latent to the decoder's input: identity, or softmax for ``"ln"``."""
        return torch.softmax(z, dim=-1) if self.latent_distribution == "ln" else z

    def decoder_input(self, z: torch.Tensor, batch: Minibatch, batch_index: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decoder input: transformed ``z`` (…, n, d) ⊕ continuous covariates ⊕ batch embedding,
        and the categorical covariates (batch one-hot first unless embedded)."""
        parts = [self.latent_transform(z)]
        if batch.continuous_covariates is not None and self.n_continuous_cov > 0:
            parts.append(batch.continuous_covariates.expand(*z.shape[:-1], -1))
        if self.uses_batch_embedding:
            parts.append(self.batch_embedding(batch_index.reshape(-1)).expand(*z.shape[:-1], -1))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return h, self._categorical(batch, batch_index)

    def inverse_dispersion(self, hidden: torch.Tensor, batch_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """θ > 0: ``(G,)`` for ``gene``, ``(n, G)`` for ``gene-batch``/``gene-label``, ``(…, n, G)`` for ``gene-cell``."""
        if self.dispersion == "gene":
            return self.log_dispersion.exp()
        if self.dispersion == "gene-batch":
            return self.log_dispersion.T[batch_index.reshape(-1)].exp()
        if self.dispersion == "gene-label":
            return self.log_dispersion.T[labels.reshape(-1)].exp()
        return self.decoder.dispersion_head(hidden).exp()

    def likelihood(self, mean: torch.Tensor, hidden: torch.Tensor, batch_index: torch.Tensor, labels: torch.Tensor):
        """The count distribution of each gene in each cell (batch shape (…, n, G))."""
        theta = None if self.gene_likelihood == "poisson" else self.inverse_dispersion(hidden, batch_index, labels)
        logits = self.decoder.zero_inflation_head(hidden) if self.gene_likelihood == "zinb" else None
        return expression_likelihood(self.gene_likelihood, mean, theta, logits)
