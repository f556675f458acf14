"""``SCVI``: single-cell Variational Inference with scvi-tools' ``scvi.model.SCVI`` API.

The class is a composition: :class:`~pyro_scvi.api.base.BaseModel` keeps the state and the
AnnData bookkeeping, the mixins of :mod:`pyro_scvi.api` add training, queries, evaluation,
saving, reference mapping, minification, differential expression and criticism. What is
scVI's own is here: the fields ``setup_anndata`` registers and the module the constructor builds
(:class:`~pyro_scvi.models.module.SCVIModule`, which binds the Pyro model of
:mod:`pyro_scvi.models.scvi` and the guide of :mod:`pyro_scvi.guides.scvi`).
"""

from __future__ import annotations

import anndata
import numpy as np
import torch

from ..data.manager import AnnDataManager
from ..data.registry import MINIFY_TYPE_KEY, library_size_prior, setup_registry
from ..models.module import SCVIModule
from ..models.networks import resolve_activation
from ..settings import settings
from .base import BaseModel
from .criticism import CriticismMixin
from .differential import DifferentialExpressionMixin
from .evaluation import EvaluationMixin
from .minify import MinificationMixin
from .queries import QueriesMixin
from .reference_mapping import ReferenceMappingMixin
from .saving import SavingMixin
from .training import TrainingMixin

__all__ = ["SCVI"]

_MODULE_KWARGS = (
    "log_variational", "encode_covariates", "deeply_inject_covariates", "use_batch_norm", "use_layer_norm",
    "var_activation", "batch_representation", "batch_embedding_kwargs", "z_prior", "n_prior_components",
    "library_prior", "dispersion_prior", "guide", "n_flows",
)

class SCVI(
    TrainingMixin, QueriesMixin, EvaluationMixin, SavingMixin, ReferenceMappingMixin, MinificationMixin,
    DifferentialExpressionMixin, CriticismMixin, BaseModel,
):
    """single-cell Variational Inference (Lopez et al. 2018) with scvi-tools' ``SCVI`` interface.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        A saved registry to build the model without data (used by :meth:`load`).
    n_hidden, n_latent, n_layers, dropout_rate
        Width of hidden layers, dimension of z, number of hidden layers, encoder dropout.
    dispersion
        ``"gene"`` (θ per gene), ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"zinb"``, ``"nb"``, ``"poisson"``, ``"normal"`` or a name added with
        :func:`pyro_scvi.models.register_likelihood`.
    use_observed_lib_size
        Use log total counts as the library (default) or infer it with a per-batch prior.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    **kwargs
        ``log_variational``, ``encode_covariates``, ``deeply_inject_covariates``,
        ``use_batch_norm``, ``use_layer_norm`` (``"encoder"|"decoder"|"both"|"none"``),
        ``var_activation`` (``None``/``"exp"`` or ``"softplus"``), ``batch_representation``
        (``"one-hot"`` or ``"embedding"``) and ``batch_embedding_kwargs`` (``{"embedding_dim": 5}``).
        Priors (:mod:`pyro_scvi.models.priors`): ``z_prior`` (``"normal"``, the default;
        ``"mog"``: a learnable mixture of ``n_prior_components`` Gaussians, default 10; ``"vamp"``:
        VampPrior with ``n_prior_components`` pseudo-inputs; or an ``nn.Module`` following the prior
        protocol), ``library_prior`` (a module for the latent log-library, with
        ``use_observed_lib_size=False``) and ``dispersion_prior`` (``None``, ``"gamma"`` or
        ``"lognormal"``: θ becomes a global latent variable with a log-normal posterior). Prior
        *objects* are not saved: pass them again to :meth:`load`.
        The guide's family of q(z | x) (:mod:`pyro_scvi.guides.scvi`): ``guide="normal"`` (the
        default: scVI's mean-field Gaussian encoder), ``"full_rank"`` (a Gaussian whose Cholesky
        factor comes from the encoder) or ``"flow"`` (the encoder's Gaussian followed by ``n_flows``
        conditional affine couplings, default 2, conditioned on the encoder's hidden layer). A latent
        library keeps its Gaussian posterior. Non-default guides cannot be minified or exported to
        scvi-tools' format.
    model_fn, guide_fn
        Optional Pyro functions ``fn(module, batch, transform_batch=None)`` that replace the built-in
        model / guide (they reuse the networks of :attr:`module`; the contract is in
        docs/custom_models.md). They are not saved: pass them again to :meth:`load`. To add
        networks or parameters, subclass :class:`~pyro_scvi.SCVIModule` and set ``_module_cls``
        on a subclass of this class instead.
    """

    #: the module class built for each model (a subclass may override it)
    _module_cls = SCVIModule
    _summary_params = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion", "gene_likelihood",
                       "latent_distribution")

    def __init__(
        self,
        adata: anndata.AnnData | None = None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        use_observed_lib_size: bool = True,
        latent_distribution: str = "normal",
        model_fn=None,
        guide_fn=None,
        **kwargs,
    ) -> None:
        for name, fn in (("model_fn", model_fn), ("guide_fn", guide_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"{name} must be a function fn(module, batch, transform_batch=None), got {fn!r}."
                )
        unknown = sorted(set(kwargs) - set(_MODULE_KWARGS))
        if unknown:
            raise TypeError(
                f"SCVI got unexpected keyword argument(s) {unknown}; accepted extra arguments: "
                f"{list(_MODULE_KWARGS)}."
            )
        if "var_activation" in kwargs:
            kwargs["var_activation"] = resolve_activation(kwargs["var_activation"])[0]
        self._init_state(adata, registry)
        params = dict(n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
                      dispersion=dispersion, gene_likelihood=gene_likelihood,
                      use_observed_lib_size=use_observed_lib_size, latent_distribution=latent_distribution)
        self.init_params_ = {"non_kwargs": params, "kwargs": {"kwargs": _storable_priors(kwargs)}}
        self.module = self._module_cls(**self._data_arguments(use_observed_lib_size), **params, **kwargs)
        if model_fn is not None:
            self.module.model_fn = model_fn
        if guide_fn is not None:
            self.module.guide_fn = guide_fn
        self.module.n_train_cells = self.registry_.n_cells  # train() sets the size of the training split
        if adata is not None:
            self._init_priors_from_data()

    def _data_arguments(self, use_observed_lib_size: bool) -> dict:
        """What the module needs from the registry: sizes, covariates and the per-batch library prior."""
        return module_data_arguments(self.registry_, self.adata, use_observed_lib_size)

    @classmethod
    def setup_anndata(
        cls,
        adata: anndata.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register the fields of ``adata`` that scVI uses (counts, batch, labels, covariates).

        Writes the category codes into ``adata.obs``/``obsm`` (``_scvi_*`` columns) and records the
        registry, which every model built on this AnnData stores and saves.
        """
        if kwargs and "source_registry" not in kwargs:
            raise TypeError(f"setup_anndata got unexpected keyword argument(s) {sorted(kwargs)}.")
        registry = setup_registry(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            model_name=cls.__name__,
            **kwargs,
        )
        cls.register_manager(AnnDataManager(adata, registry))

    def _init_priors_from_data(self) -> None:
        """Give priors with an ``init_from_data`` hook (VampPrior) a minibatch of random cells."""
        priors = [
            p
            for p in (getattr(self.module, "z_prior", None), getattr(self.module, "library_prior", None))
            if hasattr(p, "init_from_data")
        ]
        if not priors or self.adata.uns.get(MINIFY_TYPE_KEY) == "latent_posterior_parameters":
            return
        _, data = self.registered_data()
        size = min(data.n_obs, max(getattr(p, "n_components", 1) for p in priors))
        cells = np.sort(np.random.default_rng(settings.seed).choice(data.n_obs, size, replace=False))
        batch = data.minibatch(cells, device=self.device)
        for prior in priors:
            prior.init_from_data(batch)


def module_data_arguments(registry, adata, use_observed_lib_size: bool) -> dict:
    """The arguments of :class:`~pyro_scvi.models.module.SCVIModule` that come from the data: sizes,
    covariates and, for a latent library, the per-batch prior (placeholders without ``adata``: a
    loaded model's saved buffers replace them)."""
    library_log_means = library_log_vars = None
    if not use_observed_lib_size and not registry.has_size_factor:
        if adata is not None:
            library_log_means, library_log_vars = library_size_prior(adata, registry)
        else:
            shape = (1, registry.n_batch)
            library_log_means, library_log_vars = np.zeros(shape), np.ones(shape)
    return dict(
        n_input=registry.n_vars, n_batch=registry.n_batch, n_labels=registry.n_labels,
        n_continuous_cov=registry.summary_stats.get("n_extra_continuous_covs", 0),
        n_cats_per_cov=registry.n_cats_per_covariate or None,
        use_size_factor_key=registry.has_size_factor,
        library_log_means=library_log_means, library_log_vars=library_log_vars,
    )


#: how init_params_ records a prior object, which the file cannot hold
_CUSTOM_PRIOR = "custom:"


def _storable_priors(kwargs: dict) -> dict:
    """``kwargs`` for ``init_params_``: prior objects become ``"custom:<class>"``; such a marker passed
    back (a load without the object) is an error that says what to pass."""
    stored = dict(kwargs)
    for name in ("z_prior", "library_prior"):
        value = kwargs.get(name)
        if isinstance(value, str) and value.startswith(_CUSTOM_PRIOR):
            raise ValueError(
                f"This model was built with a custom {name} object ({value[len(_CUSTOM_PRIOR) :]}), which a "
                f"saved file cannot hold: pass a new instance again, e.g. SCVI.load(dir_path, adata, "
                f"{name}={value[len(_CUSTOM_PRIOR) :]}(...)); its parameters are restored from the file."
            )
        if isinstance(value, torch.nn.Module):
            stored[name] = _CUSTOM_PRIOR + type(value).__qualname__
    return stored
