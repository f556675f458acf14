"""``SCVIModule``: the networks and parameters of one scVI model, bound to its model and guide.

The module owns every weight (encoders, decoder, gene dispersion, library prior); the Pyro model
and guide functions in :mod:`pyro_scvi.models` and :mod:`pyro_scvi.guides` read them. Pyro sees
them through ``pyro.module`` inside a parameter-store scope private to the ``SCVI`` instance, so
two models never share weights.
"""

from __future__ import annotations

import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..data.minibatch import Minibatch
from ..guides.scvi import GUIDES, scvi_guide
from . import sites
from .flows import ConditionalLatentFlow
from .likelihoods import get_likelihood
from .networks import CholeskyHead, ExpressionDecoder, GaussianEncoder
from .priors import LogNormalLibraryPrior, dispersion_prior_distribution, make_z_prior
from .scvi import scvi_model

__all__ = ["SCVIModule", "DISPERSIONS", "GUIDES", "LATENT_DISTRIBUTIONS", "NORM_PLACEMENTS"]

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
BATCH_REPRESENTATIONS = ("one-hot", "embedding")
LATENT_DISTRIBUTIONS = ("normal", "ln")
NORM_PLACEMENTS = ("encoder", "decoder", "both", "none")


def _row(values) -> torch.Tensor:
    """``values`` as a float32 row ``(1, K)``."""
    return torch.as_tensor(values, dtype=torch.float32).reshape(1, -1)


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
    * ``z_prior`` / ``library_prior``: prior modules (:mod:`pyro_scvi.models.priors`); ``z_prior``
      is ``"normal"``, ``"mog"``, ``"vamp"`` (``n_prior_components`` components) or a module
    * with ``dispersion_prior`` (``"gamma"``/``"lognormal"``) θ is a global latent variable:
      ``log_dispersion`` and ``log_dispersion_log_scale`` are then the location and log-scale of
      its log-normal variational posterior, and ``n_train_cells`` (set by ``SCVI.train``) the
      number of cells its KL is spread over (see :meth:`cells_plate`)
    * ``guide_family``: the built-in guide's family of q(z | x) (:data:`GUIDES`, see
      :mod:`pyro_scvi.guides.scvi`): ``"normal"`` (mean-field, the default), ``"full_rank"`` (adds
      ``z_cholesky``, a :class:`~pyro_scvi.models.networks.CholeskyHead`) or ``"flow"`` (adds
      ``z_flow``, a :class:`~pyro_scvi.models.flows.ConditionalLatentFlow` of ``n_flows`` layers);
      the extra networks are built last, so the default model's weights do not change
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
        z_prior="normal",
        n_prior_components: int = 10,
        library_prior: nn.Module | None = None,
        dispersion_prior: str | None = None,
        guide: str = "normal",
        n_flows: int = 2,
    ) -> None:
        super().__init__()
        _check_choice("dispersion", dispersion, DISPERSIONS)
        get_likelihood(gene_likelihood)  # ValueError listing the registered names and how to add one
        _check_choice("latent_distribution", latent_distribution, LATENT_DISTRIBUTIONS)
        _check_choice("use_batch_norm", use_batch_norm, NORM_PLACEMENTS)
        _check_choice("use_layer_norm", use_layer_norm, NORM_PLACEMENTS)
        _check_choice("batch_representation", batch_representation, BATCH_REPRESENTATIONS)
        _check_choice("guide", guide, GUIDES)
        self.n_input, self.n_latent = n_input, n_latent
        self.n_batch, self.n_labels = max(n_batch, 1), max(n_labels, 1)
        self.dispersion = dispersion
        self.gene_likelihood = gene_likelihood
        self.latent_distribution = latent_distribution
        self.log_variational = log_variational
        self.encode_covariates = encode_covariates
        self.use_size_factor = bool(use_size_factor_key)
        self.use_observed_lib_size = bool(use_size_factor_key) or use_observed_lib_size
        self.n_continuous_cov = n_continuous_cov
        self.batch_representation = batch_representation
        # creation order is fixed (it sets the random initial weights and the state-dict order)
        self._build_networks(n_hidden, n_layers, n_cats_per_cov, dropout_rate, deeply_inject_covariates,
                             use_batch_norm, use_layer_norm, var_activation, batch_embedding_kwargs)
        self._build_dispersion_and_library(library_log_means, library_log_vars)
        self._build_priors(z_prior, n_prior_components, library_prior, dispersion_prior)
        self._build_guide(guide, n_hidden, n_flows)
        #: parameter name → boolean mask of entries that training must not change (query mapping)
        self.frozen_parameters: dict[str, torch.Tensor] = {}

    def _build_networks(self, n_hidden, n_layers, n_cats_per_cov, dropout_rate, inject_covariates,
                        use_batch_norm, use_layer_norm, var_activation, batch_embedding_kwargs) -> None:
        """The batch embedding (if any), both encoders and the decoder."""
        # the batch enters as a one-hot covariate, or as a learned embedding appended to the inputs
        n_embedding = 0
        if self.batch_representation == "embedding":
            embedding_kwargs = dict(batch_embedding_kwargs or {})
            n_embedding = int(embedding_kwargs.pop("embedding_dim", 5))
            if embedding_kwargs:
                raise ValueError(f"Unknown batch_embedding_kwargs {sorted(embedding_kwargs)}; "
                                 "only embedding_dim is accepted.")
            self.batch_embedding = nn.Embedding(self.n_batch, n_embedding)
        cat_list = ([] if n_embedding else [self.n_batch]) + list(n_cats_per_cov or [])
        encoder_cats = cat_list if self.encode_covariates else None
        n_appended = (self.n_continuous_cov + n_embedding) if self.encode_covariates else 0
        n_input_encoder = self.n_input + n_appended
        self.n_input_encoder = n_input_encoder
        bn_encoder = use_batch_norm in ("encoder", "both")
        bn_decoder = use_batch_norm in ("decoder", "both")
        ln_encoder = use_layer_norm in ("encoder", "both")
        ln_decoder = use_layer_norm in ("decoder", "both")

        self.z_encoder = GaussianEncoder(
            n_input_encoder, self.n_latent, encoder_cats, n_layers, n_hidden, dropout_rate,
            bn_encoder, ln_encoder, inject_covariates=inject_covariates, var_activation=var_activation,
        )
        self.library_encoder = GaussianEncoder(
            n_input_encoder, 1, encoder_cats, 1, n_hidden, dropout_rate,
            bn_encoder, ln_encoder, inject_covariates=inject_covariates, var_activation=var_activation,
        )
        self.decoder = ExpressionDecoder(
            self.n_latent + self.n_continuous_cov + n_embedding, self.n_input, cat_list, n_layers, n_hidden,
            bn_decoder, ln_decoder, inject_covariates=inject_covariates,
            scale_activation="softplus" if self.use_size_factor else "softmax",
        )

    def _build_dispersion_and_library(self, library_log_means, library_log_vars) -> None:
        """``log_dispersion`` (none for ``gene-cell``) and the per-batch library buffers (latent library)."""
        shapes = {"gene": (self.n_input,), "gene-batch": (self.n_input, self.n_batch),
                  "gene-label": (self.n_input, self.n_labels)}
        if self.dispersion in shapes:
            self.log_dispersion = nn.Parameter(torch.randn(shapes[self.dispersion]))
        else:
            self.register_parameter("log_dispersion", None)
        if not self.use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("A latent library size needs library_log_means and library_log_vars, "
                                 "shape (1, n_batch).")
            self.register_buffer("library_log_means", _row(library_log_means))
            self.register_buffer("library_log_vars", _row(library_log_vars))

    def _build_priors(self, z_prior, n_prior_components, library_prior, dispersion_prior) -> None:
        """Priors (:mod:`pyro_scvi.models.priors`): of z, of the latent log-library, hyper-prior of θ."""
        self.z_prior = make_z_prior(z_prior, self.n_latent, n_prior_components)
        if library_prior is not None and self.use_observed_lib_size:
            raise ValueError("library_prior needs a latent library: build the model with "
                             "use_observed_lib_size=False.")
        if self.use_observed_lib_size:
            self.library_prior = None
        else:
            self.library_prior = LogNormalLibraryPrior() if library_prior is None else library_prior
        self.dispersion_prior = dispersion_prior
        if dispersion_prior is not None:
            if self.log_dispersion is None or not get_likelihood(self.gene_likelihood).dispersion:
                raise ValueError(f"dispersion_prior={dispersion_prior!r} needs a per-gene θ: dispersion "
                                 "'gene', 'gene-batch' or 'gene-label' and a likelihood with a dispersion "
                                 f"(got {self.dispersion!r}, {self.gene_likelihood!r}).")
            # checks the name
            dispersion_prior_distribution(dispersion_prior, tuple(self.log_dispersion.shape))
            self.log_dispersion_log_scale = nn.Parameter(torch.full_like(self.log_dispersion, math.log(0.1)))
        #: number of training cells; with a global latent the "cells" plate has this size (see cells_plate)
        self.n_train_cells: int | None = None
        for prior in (self.z_prior, self.library_prior):
            if prior is not None and hasattr(prior, "attach"):
                prior.attach(self)

    def _build_guide(self, guide: str, n_hidden: int, n_flows: int) -> None:
        """The networks the guide family adds to the z encoder (none for ``"normal"``)."""
        self.guide_family = guide
        if guide == "full_rank":
            self.z_cholesky = CholeskyHead(n_hidden, self.n_latent)
        elif guide == "flow":
            self.z_flow = ConditionalLatentFlow(self.n_latent, n_hidden, n_flows)

    # -- the probabilistic program ---------------------------------------------------------------
    #: user functions ``fn(module, batch, transform_batch=None)`` replacing the built-in model / guide
    #: (set by ``SCVI(..., model_fn=, guide_fn=)``; see docs/custom_models.md)
    model_fn = None
    guide_fn = None

    def model(self, batch: Minibatch, transform_batch: int | None = None):
        """The generative model p(x, z, l) on ``batch`` (see :func:`pyro_scvi.models.scvi_model`)."""
        if self.model_fn is not None:
            return self.model_fn(self, batch, transform_batch=transform_batch)
        return scvi_model(self, batch, transform_batch=transform_batch)

    def guide(self, batch: Minibatch, transform_batch: int | None = None):
        """The amortised posterior q(z, l | x) (see :func:`pyro_scvi.guides.scvi_guide`)."""
        if self.guide_fn is not None:
            return self.guide_fn(self, batch, transform_batch=transform_batch)
        return scvi_guide(self, batch, transform_batch=transform_batch)

    @property
    def has_custom_model(self) -> bool:
        """Whether the model is user code (``model_fn`` or an overridden :meth:`model`)."""
        return self.model_fn is not None or type(self).model is not SCVIModule.model

    @property
    def has_custom_guide(self) -> bool:
        """Whether the guide is user code (``guide_fn`` or an overridden :meth:`guide`)."""
        return self.guide_fn is not None or type(self).guide is not SCVIModule.guide

    # -- pieces the model and guide use ----------------------------------------------------------
    # -- priors and global latent variables -----------------------------------------------------
    @property
    def has_global_latents(self) -> bool:
        """Whether the model has a latent site outside the ``"cells"`` plate (θ with
        ``dispersion_prior``)."""
        return self.dispersion_prior is not None

    def cells_plate(self, batch: Minibatch) -> pyro.plate:
        """The ``"cells"`` plate (dim −1) of ``batch``, shared by model and guide.

        With a global latent and ``n_train_cells = N`` set, the plate has size ``N`` and the ``n``
        cells of the minibatch as its subsample, so Pyro scales per-cell terms by ``N / n`` and the
        minibatch ELBO estimates the full-data one (see :class:`~pyro_scvi.infer.elbo.CellMeanELBO`).
        """
        n = batch.n_cells
        if not self.has_global_latents or not self.n_train_cells:
            return pyro.plate(sites.CELLS, n, dim=-1)
        subsample = torch.arange(n, device=batch.batch_index.device)
        return pyro.plate(sites.CELLS, self.n_train_cells, subsample=subsample, dim=-1)

    def dispersion_hyperprior(self) -> dist.Distribution:
        """p(θ): batch shape ``(G,)``, event shape ``()`` or ``(B|L,)`` (see
        :data:`~pyro_scvi.models.priors.DISPERSION_PRIORS`)."""
        shape = tuple(self.log_dispersion.shape)
        return dispersion_prior_distribution(self.dispersion_prior, shape, self.log_dispersion.device)

    def dispersion_posterior(self) -> dist.Distribution:
        """q(θ) = LogNormal(log_dispersion, exp(log_dispersion_log_scale)), mean-field; shapes as the
        prior's."""
        q = dist.LogNormal(self.log_dispersion, self.log_dispersion_log_scale.exp())
        return q.to_event(self.log_dispersion.dim() - 1)

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

    def decoder_input(self, z: torch.Tensor, batch: Minibatch, batch_index: torch.Tensor
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decoder input: transformed ``z`` (…, n, d) ⊕ continuous covariates ⊕ batch embedding,
        and the categorical covariates (batch one-hot first unless embedded)."""
        parts = [self.latent_transform(z)]
        if batch.continuous_covariates is not None and self.n_continuous_cov > 0:
            parts.append(batch.continuous_covariates.expand(*z.shape[:-1], -1))
        if self.uses_batch_embedding:
            parts.append(self.batch_embedding(batch_index.reshape(-1)).expand(*z.shape[:-1], -1))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return h, self._categorical(batch, batch_index)

    def inverse_dispersion(self, hidden: torch.Tensor, batch_index: torch.Tensor, labels: torch.Tensor,
                           theta: torch.Tensor | None = None) -> torch.Tensor:
        """θ > 0: ``(G,)`` for ``gene``, ``(n, G)`` for ``gene-batch``/``gene-label``, ``(…, n, G)`` for
        ``gene-cell``.

        ``theta``: a draw of the global θ site (``dispersion_prior``), ``(…, G)`` or ``(…, G, B|L)``;
        then ``(…, 1, G)`` or ``(…, n, G)``."""
        if theta is not None:
            if self.dispersion == "gene":
                return theta.unsqueeze(-2)
            codes = (batch_index if self.dispersion == "gene-batch" else labels).reshape(-1)
            return theta.transpose(-1, -2)[..., codes, :]
        if self.dispersion == "gene":
            return self.log_dispersion.exp()
        if self.dispersion == "gene-batch":
            return self.log_dispersion.T[batch_index.reshape(-1)].exp()
        if self.dispersion == "gene-label":
            return self.log_dispersion.T[labels.reshape(-1)].exp()
        return self.decoder.dispersion_head(hidden).exp()

    def likelihood(self, mean: torch.Tensor, hidden: torch.Tensor, batch_index: torch.Tensor,
                   labels: torch.Tensor, theta: torch.Tensor | None = None):
        """The count distribution of each gene in each cell (batch shape (…, n, G)), built by the
        registered likelihood ``gene_likelihood`` from the heads it declares it needs (``theta``: a
        draw of the global θ site, see :meth:`inverse_dispersion`)."""
        spec = get_likelihood(self.gene_likelihood)
        theta = self.inverse_dispersion(hidden, batch_index, labels, theta) if spec.dispersion else None
        logits = self.decoder.zero_inflation_head(hidden) if spec.zero_inflation else None
        return spec(mean, theta, logits)
