"""``SCVI``: scvi-tools' ``scvi.model.SCVI`` API on top of the Pyro model and guide.

The class orchestrates: it registers AnnData, cuts it into minibatches, runs SVI and the posterior
queries of :mod:`pyro_scvi.infer`, and turns tensors into NumPy arrays and DataFrames. The
statistics live in :mod:`pyro_scvi.models` (model), :mod:`pyro_scvi.guides` (guide) and
:mod:`pyro_scvi.infer` (ELBO, training loop).
"""

from __future__ import annotations

import contextlib
import urllib.request
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import anndata
import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch

from ..data.loader import RegisteredData, minibatch_from_dict, split_indices
from ..data.manager import AnnDataManager
from ..data.minibatch import Minibatch
from ..data.registry import (
    MINIFY_TYPE_KEY,
    REGISTRY_KEYS,
    format_registry,
    library_size_prior,
    setup_registry,
    summary_stats,
    validate_registered,
)
from ..infer.elbo import elbo_parts
from ..infer.importance import aggregate_posterior_log_weights, log_importance_weights_in_passes, marginal_log_likelihood
from ..infer.posterior import observation_distribution, posterior_model_traces, posterior_sites, variational_posterior
from ..models.contract import check_model_guide, param_store_from_safe, param_store_to_safe
from ..models.likelihoods import BUILTIN_LIKELIHOODS, LIKELIHOODS, likelihood_parameters, unknown_likelihood_message
from ..infer.training import EarlyStopping, TrainingPlan, append_history, max_epochs_heuristic, run_training
from .. import diagnostics
from ..io import scvi_tools as io_scvi_tools
from .criticism import CriticismMixin
from .differential import DifferentialExpressionMixin
from .reference_mapping import ReferenceMappingMixin
from ..io.native import FORMAT, FORMAT_VERSION, history_to_safe, to_safe, write_model_dir
from ..io.scvi_tools import read_model_dir, write_scvi_tools_model
from ..models.module import SCVIModule
from ..models.networks import resolve_activation
from ..settings import settings

__all__ = ["SCVI"]

_MODULE_KWARGS = (
    "log_variational", "encode_covariates", "deeply_inject_covariates", "use_batch_norm", "use_layer_norm", "var_activation",
    "batch_representation", "batch_embedding_kwargs", "z_prior", "n_prior_components", "library_prior", "dispersion_prior",
)
MINIFIED_TYPES = ("latent_posterior_parameters", "latent_posterior_parameters_with_counts")
_TRAINER_KWARGS = (
    "check_val_every_n_epoch", "enable_progress_bar", "early_stopping_monitor", "early_stopping_patience",
    "early_stopping_min_delta", "early_stopping_mode", "early_stopping_warmup_epochs", "strategy",
)


class SCVI(ReferenceMappingMixin, DifferentialExpressionMixin, CriticismMixin):
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
    model_fn, guide_fn
        Optional Pyro functions ``fn(module, batch, transform_batch=None)`` that replace the built-in
        model / guide (they reuse the networks of :attr:`module`; the contract is in
        docs/custom_models.md). They are not saved: pass them again to :meth:`load`. To add
        networks or parameters, subclass :class:`~pyro_scvi.SCVIModule` and set ``_module_cls``
        on a subclass of this class instead.
    """

    #: the module class built for each model (a subclass may override it)
    _module_cls = SCVIModule

    #: registries of AnnData objects set up for this class, by ``uns["_scvi_uuid"]``
    _setup_registries: dict[str, dict] = {}
    #: their managers (the AnnData object with its registry), by the same key
    _setup_managers: dict[str, AnnDataManager] = {}

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
                raise TypeError(f"{name} must be a function fn(module, batch, transform_batch=None), got {fn!r}.")
        unknown = sorted(set(kwargs) - set(_MODULE_KWARGS))
        if unknown:
            raise TypeError(f"SCVI got unexpected keyword argument(s) {unknown}; accepted extra arguments: {list(_MODULE_KWARGS)}.")
        if "var_activation" in kwargs:
            kwargs["var_activation"] = resolve_activation(kwargs["var_activation"])[0]
        if adata is not None:
            registry = self._registry_of(adata)
        elif registry is None:
            raise ValueError("SCVI needs an AnnData registered with SCVI.setup_anndata (or a saved registry).")
        self.registry_ = registry
        self._adata = adata
        self._data_cache: RegisteredData | None = None
        self.init_params_ = {
            "non_kwargs": dict(n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
                               dispersion=dispersion, gene_likelihood=gene_likelihood,
                               use_observed_lib_size=use_observed_lib_size, latent_distribution=latent_distribution),
            "kwargs": {"kwargs": _storable_priors(kwargs)},
        }
        stats = self.summary_stats
        size_factor_registered = bool(registry["field_registries"][REGISTRY_KEYS.SIZE_FACTOR]["data_registry"])
        library_log_means = library_log_vars = None
        if not use_observed_lib_size and not size_factor_registered:
            if adata is not None:
                library_log_means, library_log_vars = library_size_prior(adata, registry)
            else:  # rebuilt from a file: the saved buffers replace these placeholders
                library_log_means, library_log_vars = np.zeros((1, stats["n_batch"])), np.ones((1, stats["n_batch"]))
        cat_state = registry["field_registries"][REGISTRY_KEYS.CAT_COVS]["state_registry"]
        self.module = self._module_cls(
            n_input=stats["n_vars"], n_batch=stats["n_batch"], n_labels=stats["n_labels"],
            n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers,
            n_continuous_cov=stats.get("n_extra_continuous_covs", 0),
            n_cats_per_cov=list(cat_state.get("n_cats_per_key", [])) or None,
            dropout_rate=dropout_rate, dispersion=dispersion, gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution, use_size_factor_key=size_factor_registered,
            use_observed_lib_size=use_observed_lib_size,
            library_log_means=library_log_means, library_log_vars=library_log_vars, **kwargs,
        )
        if model_fn is not None:
            self.module.model_fn = model_fn
        if guide_fn is not None:
            self.module.guide_fn = guide_fn
        self.module.n_train_cells = int(stats["n_cells"])  # train() sets the size of the training split
        if adata is not None:
            self._init_priors_from_data()
        self._instance_managers: dict[str, AnnDataManager] = {}
        if adata is not None:
            self._instance_managers[registry["_scvi_uuid"]] = AnnDataManager(adata, registry)
        # Pyro parameters of this model live in their own param-store state (see pyro_scope)
        self._param_store_state = {"params": {}, "constraints": {}}
        self.is_trained_ = False
        self.history_: dict[str, pd.DataFrame] | None = None
        self.train_indices_ = self.validation_indices_ = self.test_indices_ = None

    # ------------------------------------------------------------------ registration
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
            adata, layer=layer, batch_key=batch_key, labels_key=labels_key, size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys, continuous_covariate_keys=continuous_covariate_keys,
            model_name=cls.__name__, **kwargs,
        )
        cls.register_manager(AnnDataManager(adata, registry))

    @classmethod
    def register_manager(cls, adata_manager: AnnDataManager) -> None:
        """Record ``adata_manager`` in the class-level store (a later setup of the same AnnData replaces it)."""
        cls._setup_managers[adata_manager.adata_uuid] = adata_manager
        cls._setup_registries[adata_manager.adata_uuid] = adata_manager.registry

    def deregister_manager(self, adata: anndata.AnnData | None = None) -> None:
        """Forget the manager of ``adata`` (class and instance stores), or with ``None`` every
        manager except the one of the model's own AnnData."""
        own = self.registry_.get("_scvi_uuid")
        if adata is None:
            uuids = [u for u in {*self._instance_managers, *type(self)._setup_managers} if u != own]
        else:
            uuid = adata.uns.get("_scvi_uuid")
            if uuid == own and adata is self._adata:
                raise ValueError("Cannot deregister the manager of the model's own AnnData.")
            uuids = [uuid]
        for uuid in uuids:
            self._instance_managers.pop(uuid, None)
            type(self)._setup_managers.pop(uuid, None)
            type(self)._setup_registries.pop(uuid, None)

    def get_anndata_manager(self, adata: anndata.AnnData, required: bool = False) -> AnnDataManager | None:
        """The manager this model uses for ``adata``: ``None`` (or ``ValueError`` when ``required``)
        if the model has not seen it; a copy of a registered AnnData gets the setup transferred."""
        if adata is self._adata and self._adata is not None:
            return AnnDataManager(self._adata, self.registry_)
        manager = self._instance_managers.get(adata.uns.get("_scvi_uuid"))
        if manager is None:
            if required:
                raise ValueError("This AnnData has not been registered with this model: pass it to a model method "
                                 "(which transfers the setup) or call SCVI.setup_anndata.")
            return None
        if manager.adata is not adata:  # a copy: transfer the setup onto this object
            manager = AnnDataManager(adata, self.transfer_setup(adata))
        return manager

    @property
    def adata_manager(self) -> AnnDataManager | None:
        """The manager of the model's AnnData."""
        return None if self._adata is None else AnnDataManager(self._adata, self.registry_)

    def get_from_registry(self, adata: anndata.AnnData, registry_key: str):
        """The registered field ``registry_key`` of ``adata`` (e.g. ``"X"``, ``"batch"`` codes ``(n, 1)``)."""
        return self.get_anndata_manager(adata, required=True).get_from_registry(registry_key)

    @classmethod
    def _registry_of(cls, adata: anndata.AnnData) -> dict:
        registry = cls._setup_registries.get(adata.uns.get("_scvi_uuid"))
        if registry is None:
            raise ValueError("Please set up your AnnData with SCVI.setup_anndata first.")
        if registry.get("model_name") != cls.__name__:
            raise ValueError("Please set up your AnnData with SCVI.setup_anndata first. It appears the AnnData object has been setup with a different model.")
        validate_registered(adata, registry)
        return registry

    def view_anndata_setup(self, adata: anndata.AnnData | None = None, hide_state_registries: bool = False) -> None:
        """Print the registry of ``adata`` (default: the model's AnnData)."""
        registry = self.registry_ if adata is None else self.transfer_setup(adata)
        print(format_registry(registry, hide_state_registries=hide_state_registries))

    @property
    def summary_stats(self) -> dict:
        """Counts of the registered fields: ``n_vars``, ``n_cells``, ``n_batch``, ``n_labels``, ..."""
        return summary_stats(self.registry_)

    @property
    def registry(self) -> dict:
        return self.registry_

    @property
    def adata(self) -> anndata.AnnData | None:
        """The AnnData the model was built on (or ``None`` when loaded without one)."""
        return self._adata

    @adata.setter
    def adata(self, adata: anndata.AnnData) -> None:
        """Swap the model's AnnData: the setup is transferred to it (same categories) and becomes the model's registry."""
        self.registry_ = self.transfer_setup(adata)
        self._adata = adata
        self._data_cache = None

    def transfer_setup(self, adata: anndata.AnnData) -> dict:
        """Register ``adata`` with the model's setup (same mappings and genes; new categories are an error)
        and return its registry."""
        if adata is self._adata:
            return self.registry_
        if adata.is_view:
            adata._init_as_actual(adata.copy())
        registry = setup_registry(adata, source_registry=self.registry_, model_name=type(self).__name__,
                                  check_var_names=True)  # same genes in the same order, or a clear error
        manager = AnnDataManager(adata, registry)
        type(self).register_manager(manager)
        self._instance_managers[manager.adata_uuid] = manager
        return registry

    def registered_data(self, adata: anndata.AnnData | None = None) -> tuple[anndata.AnnData, RegisteredData]:
        """``adata`` (default: the model's) and its registered tensors."""
        if adata is None or adata is self._adata:
            if self._adata is None:
                raise ValueError("This model has no AnnData (it was loaded without one): pass adata=.")
            if self._data_cache is None:
                self._data_cache = RegisteredData(self._adata, self.registry_)
            return self._adata, self._data_cache
        return adata, RegisteredData(adata, self.transfer_setup(adata))

    # ------------------------------------------------------------------ minified data
    @property
    def minified_data_type(self) -> str | None:
        """``None``, or how :meth:`minify_adata` reduced the model's AnnData."""
        if self._adata is None:
            return None
        return self._adata.uns.get(MINIFY_TYPE_KEY)

    def minify_adata(self, minified_data_type: str = "latent_posterior_parameters",
                     use_latent_qzm_key: str = "X_latent_qzm", use_latent_qzv_key: str = "X_latent_qzv") -> None:
        """Replace the model's AnnData by a copy that keeps each cell's posterior of z instead of its counts.

        Store the posterior first, e.g. ``adata.obsm["X_latent_qzm"], adata.obsm["X_latent_qzv"] =
        model.get_latent_representation(return_dist=True)``. With ``"latent_posterior_parameters"``
        X and every layer become all-zero sparse matrices; with
        ``"latent_posterior_parameters_with_counts"`` the counts stay. The total counts are kept in
        ``obs["observed_lib_size"]``. Latent representation, normalized expression, likelihood
        parameters, posterior predictive samples and differential expression then work from the
        stored posterior; methods that need the counts raise ``ValueError``. The original AnnData
        is not modified.
        """
        if minified_data_type not in MINIFIED_TYPES:
            raise ValueError(f"minified_data_type must be one of {MINIFIED_TYPES}, got {minified_data_type!r}.")
        if self.module.latent_library:
            raise ValueError("Minification is not supported for models that do not use observed library size.")
        if self.module.has_custom_guide:
            raise ValueError("minify_adata needs the built-in guide, which reads the stored posterior "
                             "(batch.latent_loc/latent_scale); this model has a custom guide.")
        adata = self._adata
        if adata is None:
            raise ValueError("This model has no AnnData to minify.")
        for key in (use_latent_qzm_key, use_latent_qzv_key):
            if key not in adata.obsm:
                raise ValueError(f"adata.obsm[{key!r}] is missing: store the posterior first with "
                                 "model.get_latent_representation(return_dist=True).")
        _, data = self.registered_data(None)
        minified = adata.copy()
        if minified_data_type == "latent_posterior_parameters":
            minified.X = sp.csr_matrix(adata.shape, dtype=np.float32)
            for layer in list(minified.layers):
                minified.layers[layer] = sp.csr_matrix(adata.shape, dtype=np.float32)
            minified.raw = None
        minified.uns.pop("_scvi_uuid", None)
        minified.uns[MINIFY_TYPE_KEY] = minified_data_type
        minified.obsm["scvi_latent_qzm"] = np.asarray(adata.obsm[use_latent_qzm_key], dtype=np.float32)
        minified.obsm["scvi_latent_qzv"] = np.asarray(adata.obsm[use_latent_qzv_key], dtype=np.float32)
        minified.obs["observed_lib_size"] = data.log_library.exp().numpy().ravel()
        registry = setup_registry(minified, source_registry=self.registry_, model_name=type(self).__name__)
        type(self).register_manager(AnnDataManager(minified, registry))
        self._instance_managers[registry["_scvi_uuid"]] = AnnDataManager(minified, registry)
        self._adata, self.registry_, self._data_cache = minified, registry, None

    def _init_priors_from_data(self) -> None:
        """Give priors with an ``init_from_data`` hook (VampPrior) a minibatch of random cells."""
        priors = [p for p in (getattr(self.module, "z_prior", None), getattr(self.module, "library_prior", None))
                  if hasattr(p, "init_from_data")]
        if not priors or self._adata.uns.get(MINIFY_TYPE_KEY) == "latent_posterior_parameters":
            return
        _, data = self.registered_data(None)
        size = min(data.n_obs, max(getattr(p, "n_components", 1) for p in priors))
        cells = np.sort(np.random.default_rng(settings.seed).choice(data.n_obs, size, replace=False))
        batch = data.minibatch(cells, device=self.device)
        for prior in priors:
            prior.init_from_data(batch)

    def check_not_minified(self, method: str, adata=None) -> None:
        """Raise ``ValueError`` if ``method`` needs counts that a minified AnnData no longer has."""
        adata = self._adata if adata is None else adata
        if adata is not None and adata.uns.get(MINIFY_TYPE_KEY) == "latent_posterior_parameters":
            raise ValueError(f"The {type(self).__name__}.{method} function currently does not support minified data.")

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def pyro_scope(self):
        """Run Pyro code with this model's private parameter store."""
        with pyro.get_param_store().scope(self._param_store_state):
            yield

    def get_pyro_params(self) -> dict[str, torch.Tensor]:
        """The plain ``pyro.param`` values of this model (e.g. of a custom ``model_fn``), constrained,
        by name. They live in the model's private parameter-store scope and are saved with it; the
        weights of :attr:`module` are not listed (see ``module.state_dict()``)."""
        with self.pyro_scope():
            store = pyro.get_param_store()
            return {name: store[name].detach() for name in list(store.keys()) if "$$$" not in name}

    @property
    def device(self) -> torch.device:
        """The device of the module's parameters."""
        devices = {p.device for p in self.module.parameters()}
        if len(devices) > 1:
            raise RuntimeError(f"The model's parameters are on several devices: {sorted(map(str, devices))}.")
        return devices.pop()

    def to_device(self, device: str | int | torch.device) -> None:
        """Move the model to ``device`` (``"cpu"``, a GPU index, ``"cuda:0"`` or a ``torch.device``)."""
        if isinstance(device, int):
            device = f"cuda:{device}"
        self.module.to(torch.device(device))

    def _custom_parts(self) -> dict:
        """Names of the user code this model runs (saved so that :meth:`load` can ask for it)."""
        return {"model_fn": _function_name(self.module.model_fn), "guide_fn": _function_name(self.module.guide_fn),
                "module_class": type(self.module).__qualname__}

    def _check_custom_functions(self, batch: Minibatch | None) -> None:
        """Trace a custom model/guide once on ``batch`` and raise ``ValueError`` naming a missing site."""
        if batch is None:
            return
        self.module.eval()
        with self.pyro_scope(), torch.no_grad():
            check_model_guide(self.module, batch)

    def check_trained(self) -> None:
        """Raise ``RuntimeError`` if the model has not been trained."""
        if not self.is_trained_:
            raise RuntimeError("Trying to query inferred values from an untrained model. Please train the model first.")

    def minibatches(self, adata=None, indices=None, batch_size=None, dataloader=None) -> Iterable[Minibatch]:
        """Minibatches of the selected cells (default: all), in order, on the model's device."""
        device = self.device
        if dataloader is not None:
            if adata is not None:
                raise ValueError("Pass either adata or dataloader, not both.")
            for tensors in dataloader:
                yield tensors if isinstance(tensors, Minibatch) else minibatch_from_dict(tensors, device)
            return
        _, data = self.registered_data(adata)
        indices = np.arange(data.n_obs) if indices is None else np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        for _, batch in data.iterate(indices, batch_size or settings.batch_size, device=device):
            yield batch

    def cell_names(self, adata=None, indices=None) -> pd.Index:
        """Names of the selected cells, in the order of :meth:`minibatches`."""
        adata = self._adata if adata is None else adata
        names = adata.obs_names
        return names if indices is None else names[np.asarray(indices)]

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        **trainer_kwargs,
    ) -> None:
        """Fit the model by stochastic variational inference (Adam, per-cell-mean ELBO, KL warm-up).

        ``plan_kwargs``: ``lr`` (1e-3), ``weight_decay`` (1e-6), ``eps`` (0.01), ``optimizer``
        (``"Adam"``/``"AdamW"``), ``n_epochs_kl_warmup`` (400), ``n_steps_kl_warmup``,
        ``min_kl_weight``/``max_kl_weight``, ``reduce_lr_on_plateau`` and its ``lr_*`` settings.
        ``trainer_kwargs``: ``check_val_every_n_epoch``, ``enable_progress_bar``,
        ``early_stopping_monitor`` ("elbo_validation"), ``early_stopping_patience`` (45),
        ``early_stopping_min_delta``, ``early_stopping_mode``, ``early_stopping_warmup_epochs``.
        ``datamodule``: an object with ``train_dataloader()`` (and optionally ``val_dataloader()``)
        yielding dicts with scvi-tools' keys (``"X"``, ``"batch"``, ``"labels"``, ...).

        Data-parallel training: ``devices=N, strategy="ddp"`` (``devices=N > 1`` alone also means
        DDP, as in scvi-tools) in a script started with ``torchrun --nproc_per_node=N script.py``;
        each process trains on its shard of the cells (``batch_size`` cells per process and step)
        with gradients averaged before every optimiser step, and ends with the same weights and
        history (see :mod:`pyro_scvi.infer.distributed`). Without torchrun this raises
        ``ValueError`` with the command to use. Only rank 0 shows progress; save from rank 0 only.
        """
        if datamodule is None:
            self.check_not_minified("train")
        unknown = sorted(set(trainer_kwargs) - set(_TRAINER_KWARGS))
        if unknown:
            raise TypeError(f"train got unexpected keyword argument(s) {unknown}; accepted: {list(_TRAINER_KWARGS)}.")
        from ..infer.distributed import data_parallel_for

        parallel = data_parallel_for(accelerator, devices, trainer_kwargs.get("strategy"))  # None: one device
        if parallel is not None and datamodule is not None:
            raise ValueError("A datamodule cannot be sharded across data-parallel processes; train on the registered AnnData.")
        plan = TrainingPlan(**(plan_kwargs or {}))
        device = _resolve_device(accelerator, devices) if parallel is None else parallel.device
        self.module.to(device)
        splitter = dict(datasplitter_kwargs or {})
        drop_last = bool(splitter.pop("drop_last", False))
        external = splitter.pop("external_indexing", None)
        if splitter:
            raise TypeError(f"Unknown datasplitter_kwargs {sorted(splitter)}; accepted: drop_last, external_indexing.")
        progress = trainer_kwargs.get("enable_progress_bar", settings.progress_bar) and (parallel is None or parallel.is_main)
        check_val = trainer_kwargs.get("check_val_every_n_epoch")
        if check_val is None and (early_stopping or plan.reduce_lr_on_plateau):
            check_val = 1
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")

        if datamodule is not None:
            train_batches = lambda: (minibatch_from_dict(t, device) for t in datamodule.train_dataloader())  # noqa: E731
            val_loader = getattr(datamodule, "val_dataloader", None)
            val_batches = None if val_loader is None else (lambda: (minibatch_from_dict(t, device) for t in val_loader()))  # noqa: E731
            train_idx = val_idx = test_idx = None
            n_train_cells = None
        else:
            _, data = self.registered_data(None)
            if external is not None:
                train_idx, val_idx, test_idx = (np.asarray(i, dtype=np.int64) for i in external)
            else:
                split_seed = settings.seed if parallel is None or settings.seed is not None else parallel.shared_seed()
                train_idx, val_idx, test_idx = split_indices(
                    data.n_obs, train_size, validation_size, batch_size, shuffle_set_split, split_seed, drop_last)
            n_shard = len(train_idx) if parallel is None else parallel.shard_length(len(train_idx))
            _check_training_minibatches(self.module, n_shard, batch_size, drop_last)
            train_batches = lambda: (b for _, b in data.iterate(train_idx, batch_size, True, drop_last, device, load_sparse_tensor))  # noqa: E731
            val_cells = val_idx if parallel is None else parallel.validation_shard(val_idx)
            val_batches = None if len(val_idx) == 0 else (lambda: (b for _, b in data.iterate(val_cells, batch_size, device=device, sparse=load_sparse_tensor)))  # noqa: E731
            if parallel is not None:  # this process's shard of a fresh permutation each epoch
                train_batches = parallel.epoch_batches(train_idx, lambda order: (
                    b for _, b in data.iterate(order, batch_size, False, drop_last, device, load_sparse_tensor)))
            n_train_cells = data.n_obs
        if early_stopping and val_batches is None:
            raise ValueError("Can't run Early Stopping with validation monitor with no validation set")
        if max_epochs is None:
            max_epochs = max_epochs_heuristic(n_train_cells or self.summary_stats["n_cells"])
        stopper = None
        if early_stopping:
            stopper = EarlyStopping(
                monitor=trainer_kwargs.get("early_stopping_monitor", "elbo_validation"),
                patience=trainer_kwargs.get("early_stopping_patience", 45),
                min_delta=trainer_kwargs.get("early_stopping_min_delta", 0.0),
                mode=trainer_kwargs.get("early_stopping_mode", "min"),
                warmup_epochs=trainer_kwargs.get("early_stopping_warmup_epochs", 0),
            )
        if self.module.has_custom_model or self.module.has_custom_guide:
            self._check_custom_functions(next(iter(train_batches()), None))
        self.train_indices_, self.validation_indices_, self.test_indices_ = train_idx, val_idx, test_idx
        if train_idx is not None:
            self.module.n_train_cells = _count_cells(train_idx)
        hooks = {}
        if parallel is not None:
            parallel.prepare(self.module)  # rank 0's weights everywhere, shared permutation seed
            hooks = dict(gradient_hook=parallel.average_gradients, reduce_sums=parallel.sum_across_ranks,
                         epoch_end_hook=parallel.sync_buffers)
        try:
            with self.pyro_scope():
                records, stop_reason = run_training(
                    self.module, train_batches, val_batches, max_epochs, plan,
                    check_val_every_n_epoch=check_val, early_stopping=stopper, progress_bar=progress, **hooks,
                )
            if parallel is not None:
                parallel.finish()
        except BaseException as error:
            partial = getattr(error, "partial_history", None)
            if partial:
                self.history_ = append_history(self.history_, partial)
                self.is_trained_ = True
            raise
        self.history_ = append_history(self.history_, records)
        self.is_trained_ = True
        if stop_reason and (parallel is None or parallel.is_main):
            print(stop_reason)

    # ------------------------------------------------------------------ queries
    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: anndata.AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        dataloader=None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Posterior of z for each cell: its mean ``(n, d)`` (default), one sample, or
        ``(mean, variance)`` with ``return_dist=True``.

        For the logistic-normal latent the mean is the Monte-Carlo mean of ``softmax(z)`` over
        ``mc_samples`` draws, and ``return_dist`` gives the pre-softmax Gaussian.
        """
        self.check_trained()
        self.module.eval()
        locs, variances, values = [], [], []
        with self.pyro_scope():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                qz = variational_posterior(self.module.guide, batch, "z")
                if not (hasattr(qz, "loc") and hasattr(qz, "scale")):
                    raise TypeError(f"get_latent_representation needs a guide site 'z' with a loc and scale "
                                    f"(e.g. Normal); the guide's is {type(qz).__name__}.")
                locs.append(qz.loc.cpu())
                variances.append(qz.scale.pow(2).cpu())
                if return_dist:
                    continue
                if give_mean and self.module.latent_distribution == "ln":
                    value = torch.softmax(qz.sample((mc_samples,)), dim=-1).mean(0)
                elif give_mean:
                    value = qz.loc
                else:
                    value = self.module.latent_transform(qz.sample())
                values.append(value.cpu())
        if return_dist:
            return torch.cat(locs).numpy(), torch.cat(variances).numpy()
        return torch.cat(values).numpy()

    @torch.no_grad()
    def get_latent_library_size(
        self,
        adata: anndata.AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
        dataloader=None,
    ) -> np.ndarray:
        """Library size per cell on the count scale, ``(n, 1)``.

        With the observed library (the default model) this is the total count of each cell, for
        both values of ``give_mean`` (scvi-tools raises for ``give_mean=True`` there). With a latent
        library, ``give_mean=True`` returns the log-normal posterior mean ``exp(μ + σ²/2)`` and
        ``give_mean=False`` ``exp`` of one posterior draw.
        """
        self.check_trained()
        self.check_not_minified("get_latent_library_size", adata)
        self.module.eval()
        out = []
        with self.pyro_scope():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                if not self.module.latent_library and not self.module.has_custom_guide:
                    out.append(batch.log_library.exp().cpu())
                    continue
                try:
                    ql = variational_posterior(self.module.guide, batch, "library")
                except KeyError:
                    if self.module.latent_library:
                        raise
                    out.append(batch.log_library.exp().cpu())  # a custom guide without a latent library
                    continue
                log_library = ql.loc + ql.scale.pow(2) / 2 if give_mean else ql.sample()
                out.append(log_library.exp().cpu())
        return torch.cat(out).numpy()

    def batch_codes(self, transform_batch) -> list[int | None]:
        """Category values of the batch column → codes; ``None`` → the cells' own batches."""
        if transform_batch is None:
            return [None]
        values = transform_batch if isinstance(transform_batch, (list, tuple, np.ndarray, pd.Index)) else [transform_batch]
        mapping = list(self.registry_["field_registries"][REGISTRY_KEYS.BATCH]["state_registry"]["categorical_mapping"])
        codes = []
        for value in values:
            if value not in mapping:
                raise ValueError(f'"{value}" not a valid batch category.')
            codes.append(mapping.index(value))
        return codes

    def _gene_mask(self, gene_list) -> np.ndarray:
        var_names = self.var_names
        if gene_list is None:
            return np.ones(len(var_names), dtype=bool)
        mask = np.asarray(pd.Index(var_names).isin(list(gene_list)))
        if not mask.any():
            raise ValueError("None of the genes in gene_list are in the model's var_names.")
        return mask

    @property
    def var_names(self) -> np.ndarray:
        """The model's genes ``(G,)``, in the order of the count matrix."""
        return np.asarray(self.registry_["field_registries"][REGISTRY_KEYS.X]["state_registry"]["column_names"])

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: anndata.AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch=None,
        gene_list: Sequence[str] | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: str | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        dataloader=None,
        **importance_weighting_kwargs,
    ) -> np.ndarray | pd.DataFrame:
        """Denoised expression: ``library_size · ρ`` (``ρ`` sums to 1 over genes), or with
        ``library_size="latent"`` the NB mean ``exp(l)·ρ`` (ignoring zero-inflation).

        ``transform_batch``: batch category (or list, averaged) to decode every cell in.
        Shapes: ``(n, G')`` (mean over ``n_samples`` when ``return_mean``), ``(S, n, G')`` for
        ``n_samples > 1`` and ``return_mean=False`` (NumPy), ``(K, G')`` for
        ``n_samples_overall=K`` (rows resampled uniformly over cells and samples, NumPy).
        A DataFrame (cells × genes) unless ``return_numpy=True``.

        ``weights="importance"`` (with ``n_samples_overall`` and one transform batch) resamples the
        draws with importance weights that correct the aggregate variational posterior of the
        selected cells towards their aggregate posterior (see :meth:`get_importance_weights`;
        ``importance_weighting_kwargs`` go there).
        """
        self.check_trained()
        if weights not in (None, "uniform", "importance"):
            raise ValueError(f"weights must be None, 'uniform' or 'importance', got {weights!r}.")
        if weights == "importance" and (n_samples_overall is None or dataloader is not None):
            raise ValueError("weights='importance' needs n_samples_overall and adata/indices (not a dataloader).")
        if weights == "importance" and transform_batch is not None and len(self.batch_codes(transform_batch)) > 1:
            raise ValueError("weights='importance' works with a single transform_batch.")
        if library_size != "latent" and not isinstance(library_size, (int, float)):
            raise ValueError(f"library_size must be a number or 'latent', got {library_size!r}.")
        if n_samples_overall is not None:
            if n_samples != 1:
                raise ValueError("Pass either n_samples or n_samples_overall, not both.")
            n_cells = _count_cells(indices) if indices is not None else (self.registered_data(adata)[1].n_obs if dataloader is None else None)
            if n_cells is None:
                raise ValueError("n_samples_overall needs adata/indices, not a dataloader.")
            n_samples = n_samples_overall // n_cells + 1
        site = "mean" if library_size == "latent" else "normalized_expression"
        factor = 1.0 if library_size == "latent" else float(library_size)
        codes = self.batch_codes(transform_batch)
        mask = torch.as_tensor(self._gene_mask(gene_list))
        self.module.eval()
        chunks, latents = [], []
        with self.pyro_scope():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                draws = posterior_sites(self.module.model, self.module.guide, batch, n_samples, [site, "z"], codes)
                value = draws[0][site] if len(draws) == 1 else torch.stack([d[site] for d in draws]).mean(0)
                if gene_list is not None:
                    value = value[..., mask.to(value.device)]
                chunks.append((value * factor if factor != 1.0 else value).cpu())
                latents.append(draws[0]["z"].cpu())
        samples = torch.cat(chunks, dim=1).numpy()  # (S, n, G')

        if n_samples_overall is not None:
            flat = samples.reshape(-1, samples.shape[-1])
            probabilities = None
            if weights == "importance":
                z = torch.cat(latents, dim=1).reshape(-1, self.module.n_latent)  # same (S, n) order as flat
                probabilities = self.get_importance_weights(adata, indices, z, **importance_weighting_kwargs)
            rows = np.random.choice(flat.shape[0], n_samples_overall, replace=True, p=probabilities)
            return flat[rows]
        if n_samples > 1 and not return_mean:
            if return_numpy is False:
                warnings.warn("return_numpy must be True when n_samples > 1 and return_mean is False; returning an array.", UserWarning, stacklevel=2)
            return samples
        result = samples.mean(0)
        if return_numpy or dataloader is not None:
            return result
        return pd.DataFrame(result, index=self.cell_names(adata, indices), columns=self.var_names[mask.numpy()])

    @torch.no_grad()
    def get_importance_weights(self, adata, indices, z: torch.Tensor, max_cells: int = 1024, truncation: bool = False,
                               n_mc_samples: int = 500, n_mc_samples_per_pass: int = 250) -> np.ndarray:
        """Normalised importance weights ``(M,)`` of latent draws ``z`` ``(M, d)`` taken from the
        variational posteriors of the cells ``indices``.

        Up to ``max_cells`` random cells of the selection are anchors ``a``;
        ``w(z) ∝ Σ_a p(z | x_a) / Σ_a q(z | x_a)`` with ``p(z | x_a) = p(x_a | z) p(z) / p(x_a)`` and
        ``p(x_a)`` from :meth:`get_marginal_ll` (``n_mc_samples`` draws). ``truncation=True`` raises
        every log-weight to at least the log of the mean weight, as scvi-tools does.
        """
        self.check_not_minified("get_importance_weights", adata)
        _, data = self.registered_data(adata)
        selection = np.arange(data.n_obs) if indices is None else np.asarray(indices)
        anchors_idx = np.sort(np.random.choice(selection, min(max_cells, len(selection)), replace=False))
        anchors = data.minibatch(anchors_idx, device=self.device)
        self.module.eval()
        with self.pyro_scope():
            log_evidence = marginal_log_likelihood(self.module.model, self.module.guide, anchors, n_mc_samples,
                                                   n_mc_samples_per_pass)
            log_w = aggregate_posterior_log_weights(self.module.model, self.module.guide, z.to(self.device), anchors,
                                                    log_evidence, latent_library=self.module.latent_library)
        if truncation:
            log_w = log_w.clamp(min=float(torch.logsumexp(log_w, 0) - np.log(len(log_w))))
        weights = torch.softmax(log_w.double(), dim=0).cpu().numpy()
        return weights / weights.sum()

    @torch.no_grad()
    def get_likelihood_parameters(self, adata=None, indices=None, n_samples: int = 1, give_mean: bool = False,
                                  batch_size=None, dataloader=None) -> dict[str, np.ndarray]:
        """Parameters of p(x | z, l) at posterior draws of z (and l).

        Keys: ``"mean"`` (NB mean μ; Poisson rate; Normal location), ``"dispersions"`` (θ for
        zinb/nb, the standard deviation for normal; absent for poisson), ``"dropout"`` (zero-
        inflation probability π, zinb only). Shapes ``(n, G)``, or ``(S, n, G)`` for
        ``n_samples > 1`` unless ``give_mean=True``.
        """
        self.check_trained()
        self.module.eval()
        chunks: dict[str, list] = {}
        with self.pyro_scope():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                (trace,) = posterior_model_traces(self.module.model, self.module.guide, batch, n_samples)
                distribution = observation_distribution(trace)
                for key, value in likelihood_parameters(distribution, self.module.gene_likelihood).items():
                    value = value.expand(n_samples, batch.n_cells, value.shape[-1])
                    chunks.setdefault(key, []).append(value.cpu())
        out = {}
        for key, parts in chunks.items():
            value = torch.cat(parts, dim=1).numpy()
            out[key] = value.mean(0) if give_mean or n_samples == 1 else value
        return out

    @torch.no_grad()
    def posterior_predictive_sample(self, adata=None, indices=None, transform_batch=None, n_samples: int = 1,
                                    gene_list=None, batch_size=None, dataloader=None, silent: bool = True):
        """Counts drawn from the posterior predictive p(x̃ | x) with ``pyro.infer.Predictive``.

        Returns a ``sparse.GCXS`` array of shape ``(n, G')``, or ``(n, G', S)`` for
        ``n_samples > 1``. A list of ``transform_batch`` values averages the draws over batches.
        Needs the ``sparse`` package (``pip install pyro-scvi[sparse]``).
        """
        try:
            import sparse
        except ImportError as error:
            raise ImportError("posterior_predictive_sample returns sparse.GCXS arrays: pip install 'pyro-scvi[sparse]'.") from error
        self.check_trained()
        self.module.eval()
        codes = self.batch_codes(transform_batch)
        mask = torch.as_tensor(self._gene_mask(gene_list))
        predictive_model = pyro.poutine.uncondition(self.module.model)  # sample x instead of observing it
        blocks = []
        with self.pyro_scope():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                draws = []
                for code in codes:
                    predictive = pyro.infer.Predictive(predictive_model, guide=self.module.guide, num_samples=n_samples,
                                                       parallel=True, return_sites=["x"])
                    draws.append(predictive(batch, transform_batch=code)["x"].reshape(n_samples, batch.n_cells, -1))
                x = torch.stack(draws).mean(0)[..., mask.to(batch.x.device)]  # (S, n, G')
                x = x.permute(1, 2, 0).cpu().numpy()  # (n, G', S)
                blocks.append(sparse.GCXS.from_numpy(x[..., 0] if n_samples == 1 else x))
        return sparse.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]

    @torch.no_grad()
    def get_feature_correlation_matrix(self, adata=None, indices=None, n_samples: int = 10, batch_size: int = 64,
                                       rna_size_factor: int = 1000, transform_batch=None,
                                       correlation_type: str = "spearman", silent: bool = True) -> pd.DataFrame:
        """Gene-gene correlation of denoised expression, ``(G, G)`` with var names.

        For each batch in ``transform_batch`` (default: the cells' own), draws
        ``Gamma(θ, θ / (rna_size_factor · ρ))`` (mean ``rna_size_factor · ρ``; for the poisson and
        normal likelihoods the rate itself) at ``n_samples`` posterior draws per cell, stacks the
        draws as rows and correlates the genes (``"spearman"`` or ``"pearson"``); the matrices of
        several batches are averaged.
        """
        if correlation_type not in ("spearman", "pearson"):
            raise ValueError(f"correlation_type must be 'spearman' or 'pearson', got {correlation_type!r}.")
        self.check_trained()
        self.module.eval()
        matrices = []
        for code in self.batch_codes(transform_batch):
            rows = []
            with self.pyro_scope():
                for batch in self.minibatches(adata, indices, batch_size):
                    (trace,) = posterior_model_traces(self.module.model, self.module.guide, batch, n_samples, [code])
                    rate = rna_size_factor * trace.nodes["normalized_expression"]["value"]
                    rate = rate.expand(n_samples, batch.n_cells, rate.shape[-1])
                    params = likelihood_parameters(observation_distribution(trace), self.module.gene_likelihood)
                    if self.module.gene_likelihood in ("zinb", "nb"):
                        theta = params["dispersions"].expand_as(rate)
                        rate = torch.distributions.Gamma(theta, theta / rate).sample()
                    rows.append(rate.reshape(-1, rate.shape[-1]).cpu())
            data = torch.cat(rows).numpy()
            if correlation_type == "pearson":
                matrices.append(np.corrcoef(data, rowvar=False))
            else:
                from scipy.stats import spearmanr

                matrices.append(np.atleast_2d(spearmanr(data).statistic))
        names = self.var_names
        return pd.DataFrame(np.mean(matrices, axis=0), index=names, columns=names)

    @torch.no_grad()
    def get_batch_representation(self, adata=None, indices=None, batch_size=None) -> np.ndarray:
        """The learned batch embedding of each cell's batch, ``(n, embedding_dim)``.

        Only for models built with ``batch_representation="embedding"``.
        """
        if not self.module.uses_batch_embedding:
            raise KeyError("Embedding batch not found: this model represents batches as one-hot vectors; "
                           "build it with SCVI(adata, batch_representation='embedding') to learn one.")
        rows = [self.module.batch_embedding(batch.batch_index.reshape(-1)).cpu()
                for batch in self.minibatches(adata, indices, batch_size)]
        return torch.cat(rows).numpy()

    # ------------------------------------------------------------------ evaluation
    def _elbo_terms_per_cell(self, adata, indices, batch_size, dataloader, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell reconstruction loss −log p(x | z, l) and summed KL (weight 1), one draw each."""
        self.check_not_minified(method, adata)
        self.module.eval()
        reconstruction, kl = [], []
        with self.pyro_scope(), torch.no_grad():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                parts = elbo_parts(self.module.model, self.module.guide, batch)
                reconstruction.append(sum(parts.reconstruction.values()))
                kl.append(sum(parts.kl.values(), torch.zeros_like(reconstruction[-1])) + parts.kl_global_per_cell)
        return torch.cat(reconstruction), torch.cat(kl)

    def get_elbo(self, adata=None, indices=None, batch_size=None, dataloader=None, return_mean: bool = True) -> torch.Tensor:
        """The evidence lower bound per cell, ``E_q[log p(x | z, l)] − KL(q(z, l | x) ‖ p(z, l))``.

        Returns the ELBO itself (a negative number, higher is better), as a 0-d tensor averaged over
        cells, or per cell ``(n,)`` with ``return_mean=False``; on the model's device. (The
        ``elbo_*`` entries of :attr:`history` are its negation.) One Monte-Carlo draw per cell.
        """
        self.check_trained()
        reconstruction, kl = self._elbo_terms_per_cell(adata, indices, batch_size, dataloader, "get_elbo")
        elbo = -(reconstruction + kl)
        return elbo.mean() if return_mean else elbo

    def get_reconstruction_error(self, adata=None, indices=None, batch_size=None, dataloader=None,
                                 return_mean: bool = True) -> dict[str, torch.Tensor]:
        """``{"reconstruction_loss": −E_q log p(x | z, l)}``: a positive negative log-likelihood
        (lower is better), averaged over cells or per cell ``(n,)``; one draw per cell."""
        self.check_trained()
        reconstruction, _ = self._elbo_terms_per_cell(adata, indices, batch_size, dataloader, "get_reconstruction_error")
        return {"reconstruction_loss": reconstruction.mean() if return_mean else reconstruction}

    def get_marginal_ll(self, adata=None, indices=None, n_mc_samples: int = 1000, batch_size=None,
                        return_mean: bool = True, dataloader=None, n_mc_samples_per_pass: int | None = None,
                        return_diagnostics: bool = False):
        """Importance-sampling estimate of the marginal log-likelihood ``log p(x_n)`` (negative,
        higher is better) with ``n_mc_samples`` guide draws per cell.

        Returns the mean over cells as a float, or a CPU tensor ``(n,)`` with ``return_mean=False``.
        Densities of the logistic-normal latent are evaluated on the Gaussian (pre-softmax) variable.

        With ``return_diagnostics=True`` it returns instead a ``pandas.DataFrame`` with one row per
        cell (index: cell names; a range with ``dataloader``) and columns ``marginal_ll`` (the same
        estimate, from the same draws), ``pareto_k`` (PSIS k̂ of the importance weights; above 0.7
        the estimate of that cell is unreliable) and ``ess`` (effective sample size
        ``1 / Σ w̃²`` of the Pareto-smoothed normalised weights, out of ``n_mc_samples``);
        ``return_mean`` is then ignored. See :func:`pyro_scvi.diagnostics.psis_diagnostics`.
        """
        self.check_trained()
        self.check_not_minified("get_marginal_ll", adata)
        self.module.eval()
        values, pareto_k, ess = [], [], []
        with self.pyro_scope(), torch.no_grad():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                if not return_diagnostics:
                    values.append(marginal_log_likelihood(self.module.model, self.module.guide, batch, n_mc_samples,
                                                          n_mc_samples_per_pass).cpu())
                    continue
                log_weights = log_importance_weights_in_passes(self.module.model, self.module.guide, batch,
                                                               n_mc_samples, n_mc_samples_per_pass).cpu()
                values.append(torch.logsumexp(log_weights, dim=0) - np.log(n_mc_samples))
                psis = diagnostics.psis_diagnostics(log_weights)
                pareto_k.append(psis.pareto_k)
                ess.append(psis.ess)
        values = torch.cat(values)
        if return_diagnostics:
            index = pd.RangeIndex(len(values), name="cell") if dataloader is not None else self.cell_names(adata, indices)
            return pd.DataFrame({"marginal_ll": values.double().numpy(), "pareto_k": np.concatenate(pareto_k),
                                 "ess": np.concatenate(ess)}, index=index)
        return float(values.mean()) if return_mean else values

    # ------------------------------------------------------------------ state
    @property
    def is_trained(self) -> bool:
        return self.is_trained_

    @is_trained.setter
    def is_trained(self, value: bool) -> None:
        self.is_trained_ = bool(value)

    @property
    def history(self) -> dict[str, pd.DataFrame] | None:
        """Per-epoch training metrics: ``{key: DataFrame}`` indexed by ``epoch`` (None before training).

        Keys: ``train_loss``, ``elbo_train``, ``reconstruction_loss_train``, ``kl_local_train``,
        ``kl_global_train``, ``kl_weight`` and, when validation ran, the ``*_validation`` keys.
        ``elbo_*`` values are negative ELBOs per cell (lower is better).
        """
        return self.history_

    @property
    def train_indices(self):
        return self.train_indices_

    @property
    def validation_indices(self):
        return self.validation_indices_

    @property
    def test_indices(self):
        return self.test_indices_

    @property
    def summary_string(self) -> str:
        p = self.init_params_["non_kwargs"]
        return (
            f"{type(self).__name__} model with the following parameters: \n"
            f"n_hidden: {p['n_hidden']}, n_latent: {p['n_latent']}, n_layers: {p['n_layers']}, "
            f"dropout_rate: {p['dropout_rate']}, dispersion: {p['dispersion']}, gene_likelihood: "
            f"{p['gene_likelihood']}, latent_distribution: {p['latent_distribution']}."
            f"\nTraining status: {'Trained' if self.is_trained_ else 'Not Trained'}"
            f"\nModel's adata is minified?: {self.minified_data_type is not None}"
        )

    def __repr__(self) -> str:
        return self.summary_string

    # ------------------------------------------------------------------ files
    def save(
        self,
        dir_path: str | Path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        datamodule=None,
        scvi_tools_format: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to ``dir_path/<prefix>model.pt`` (and the AnnData with ``save_anndata``).

        The file holds only tensors and plain data, so :meth:`load` never unpickles code. The
        directory is replaced atomically; an existing one needs ``overwrite=True``.
        ``scvi_tools_format=True`` writes scvi-tools 1.x's layout instead, which
        ``scvi.model.SCVI.load`` reads (it is a pickle: scvi-tools loads it with
        ``weights_only=False``).
        """
        if save_anndata and self._adata is None:
            raise ValueError("save_anndata=True but this model has no AnnData.")
        custom = self._custom_parts()
        if scvi_tools_format and (custom["model_fn"] or custom["guide_fn"] or custom["module_class"] != "SCVIModule"
                                  or self.module.gene_likelihood not in BUILTIN_LIKELIHOODS):
            raise ValueError("scvi_tools_format=True needs the built-in scVI (module, model, guide and a built-in "
                             "gene_likelihood); save this model in pyro-scvi's format instead.")
        if scvi_tools_format and _nondefault_priors(self.module):
            raise ValueError(f"scvi_tools_format=True cannot hold {', '.join(_nondefault_priors(self.module))}: scvi-tools' "
                             "SCVI has only the normal z prior, the per-batch library prior and a point-estimated θ. "
                             "Save this model in pyro-scvi's format instead (scvi_tools_format=False).")
        if scvi_tools_format:
            write_scvi_tools_model(dir_path, self.module.state_dict(), self.var_names, {
                "registry_": self.registry_, "init_params_": self.init_params_, "is_trained_": self.is_trained_,
                "history_": self.history_, "train_indices_": self.train_indices_,
                "validation_indices_": self.validation_indices_, "test_indices_": self.test_indices_,
            }, prefix=prefix, overwrite=overwrite)
            if save_anndata:
                target = Path(dir_path) / f"{prefix or ''}adata.h5ad"
                staging = target.with_name(f".{target.name}.partial")
                self._adata.write_h5ad(staging, **anndata_write_kwargs)
                staging.replace(target)
            return
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "var_names": [str(v) for v in self.var_names],
            "attr_dict": {
                "registry_": to_safe(self.registry_),
                "init_params_": to_safe(self.init_params_),
                "is_trained_": bool(self.is_trained_),
                "history_": history_to_safe(self.history_),
                "train_indices_": to_safe(self.train_indices_),
                "validation_indices_": to_safe(self.validation_indices_),
                "test_indices_": to_safe(self.test_indices_),
                "freezing_": _freezing_state(self.module),
                "custom_model_": custom,
                "pyro_params_": param_store_to_safe(self._param_store_state),
            },
        }
        write_model_dir(dir_path, payload, prefix=prefix, overwrite=overwrite,
                        adata=self._adata if save_anndata else None, **anndata_write_kwargs)

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: anndata.AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        datamodule=None,
        allowed_classes_names_list: list[str] | None = None,
        model_fn=None,
        guide_fn=None,
        z_prior=None,
        library_prior=None,
    ) -> "SCVI":
        """Load a model saved by :meth:`save` or by scvi-tools 1.x (``adata`` defaults to the saved
        AnnData, if any). Nothing in the file is executed: see :mod:`pyro_scvi.io.scvi_tools`.

        A model saved with ``model_fn``/``guide_fn`` needs them passed again, and one saved with a
        registered ``gene_likelihood`` needs it registered again (both are code, which the file
        does not hold); a custom module class needs the class whose ``_module_cls`` it is. Likewise a
        model built with a prior *object* needs a new instance of it, ``z_prior=MyPrior(...)`` or
        ``library_prior=...``; its learnt parameters come from the file."""
        dir_path = Path(dir_path)
        model_file = dir_path / f"{prefix or ''}model.pt"
        if backup_url is not None and not model_file.exists():
            dir_path.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(backup_url, model_file)
        saved = read_model_dir(dir_path, prefix, map_location="cpu")
        attrs = saved["attr_dict"]
        registry = attrs["registry_"]
        allowed = set(allowed_classes_names_list or []) | {cls.__name__}
        if registry.get("model_name") not in allowed:
            raise ValueError("It appears you are loading a model from a different class.")
        if adata is None:
            saved_adata = dir_path / f"{prefix or ''}adata.h5ad"
            if saved_adata.exists():
                adata = anndata.read_h5ad(saved_adata)
            else:
                warnings.warn("Save path contains no saved anndata and no adata was passed. Model will be loaded without anndata.", UserWarning, stacklevel=2)
        if adata is not None:
            names = np.asarray(saved["var_names"], dtype=object)
            if len(names) != adata.n_vars or not np.array_equal(names, np.asarray(adata.var_names, dtype=object)):
                warnings.warn("`var_names` for the loaded `model` does not match those used to train the model; results may be wrong.", UserWarning, stacklevel=2)
            if adata.is_view:
                adata._init_as_actual(adata.copy())
            transferred = setup_registry(adata, source_registry=registry, model_name=registry["model_name"])
            cls.register_manager(AnnDataManager(adata, transferred))
        init = dict(attrs["init_params_"]["non_kwargs"])
        init.update(attrs["init_params_"].get("kwargs", {}).get("kwargs", {}))
        _check_loadable(cls, init, attrs.get("custom_model_") or {}, model_fn, guide_fn)
        init.update({name: value for name, value in (("z_prior", z_prior), ("library_prior", library_prior)) if value is not None})
        model = cls(adata, registry=None if adata is not None else registry, model_fn=model_fn, guide_fn=guide_fn, **init)
        model.module.load_state_dict(saved["model_state_dict"], strict=True)
        model.is_trained_ = bool(attrs.get("is_trained_", False))
        model.history_ = attrs.get("history_")
        model.train_indices_ = attrs.get("train_indices_")
        model.validation_indices_ = attrs.get("validation_indices_")
        model.test_indices_ = attrs.get("test_indices_")
        if model.train_indices_ is not None:
            model.module.n_train_cells = _count_cells(model.train_indices_)
        _restore_freezing(model.module, attrs.get("freezing_"))
        model.module.to(_resolve_device(accelerator, device))
        model._param_store_state = param_store_from_safe(attrs.get("pyro_params_"), model.device)
        model.module.eval()
        return model

    @staticmethod
    def load_registry(dir_path: str | Path, prefix: str | None = None) -> dict:
        """The registry saved with a model (ours or scvi-tools 1.x)."""
        return io_scvi_tools.load_registry(dir_path, prefix)

    @staticmethod
    def view_setup_args(dir_path: str | Path, prefix: str | None = None) -> None:
        """Print the ``setup_anndata`` arguments of a saved model (ours or scvi-tools 1.x)."""
        io_scvi_tools.view_setup_args(dir_path, prefix)

    @staticmethod
    def convert_legacy_save(dir_path: str | Path, output_dir_path: str | Path, overwrite: bool = False,
                            prefix: str | None = None, **save_kwargs) -> None:
        """Rewrite a scvi-tools < 0.15 save (``model_params.pt``, ``attr.pkl``, ``var_names.csv``)
        in the current layout, readable by :meth:`load` and by scvi-tools 1.x."""
        if save_kwargs:
            raise TypeError(f"convert_legacy_save got unexpected keyword argument(s) {sorted(save_kwargs)}.")
        io_scvi_tools.convert_legacy_save(dir_path, output_dir_path, overwrite=overwrite, prefix=prefix)


def _check_training_minibatches(module, n_train: int, batch_size: int, drop_last: bool) -> None:
    """Raise ``ValueError`` when training would see no minibatch, or one cell alone in a BatchNorm minibatch."""
    if drop_last and n_train < batch_size:
        raise ValueError(
            f"drop_last=True with {n_train} training cells and batch_size={batch_size} leaves no training "
            "minibatch: lower batch_size or drop datasplitter_kwargs={'drop_last': True}."
        )
    if not any(isinstance(layer, torch.nn.BatchNorm1d) for layer in module.modules()):
        return
    last = n_train % batch_size if not drop_last else 0
    if batch_size == 1 or last == 1 or n_train == 1:
        raise ValueError(
            f"{n_train} training cells in minibatches of {batch_size} give a minibatch of 1 cell, on which "
            "BatchNorm cannot train: use batch_size >= 2, other training indices, more cells, or "
            "datasplitter_kwargs={'drop_last': True} (or use_batch_norm='none')."
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
            raise ValueError(f"This model was built with a custom {name} object ({value[len(_CUSTOM_PRIOR):]}), which a "
                             f"saved file cannot hold: pass a new instance again, e.g. SCVI.load(dir_path, adata, "
                             f"{name}={value[len(_CUSTOM_PRIOR):]}(...)); its parameters are restored from the file.")
        if isinstance(value, torch.nn.Module):
            stored[name] = _CUSTOM_PRIOR + type(value).__qualname__
    return stored


def _nondefault_priors(module) -> list[str]:
    """The priors of ``module`` that scvi-tools' SCVI does not have (empty for the reference model)."""
    from ..models.priors import LogNormalLibraryPrior, NormalPrior

    found = []
    if type(getattr(module, "z_prior", None)) not in (NormalPrior, type(None)):
        found.append(f"z_prior={type(module.z_prior).__name__}")
    library_prior = getattr(module, "library_prior", None)
    if library_prior is not None and (type(library_prior) is not LogNormalLibraryPrior or library_prior.owns_parameters):
        found.append(f"library_prior={type(library_prior).__name__}")
    if getattr(module, "dispersion_prior", None) is not None:
        found.append(f"dispersion_prior={module.dispersion_prior!r}")
    return found


def _function_name(fn) -> str | None:
    return None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _check_loadable(cls, init: dict, custom: dict, model_fn, guide_fn) -> None:
    """Clear errors for the code a saved model needs and the file cannot hold."""
    likelihood = init.get("gene_likelihood", "zinb")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"The saved model uses gene_likelihood={likelihood!r}, which is not registered in this "
                         f"session: call pyro_scvi.models.register_likelihood({likelihood!r}, ...) before "
                         f"{cls.__name__}.load. " + unknown_likelihood_message(likelihood))
    for name, given in (("model_fn", model_fn), ("guide_fn", guide_fn)):
        if custom.get(name) and given is None:
            raise ValueError(f"The model was saved with a custom {name} ({custom[name]}); functions are not saved: "
                             f"pass it again, {cls.__name__}.load(dir_path, adata, {name}=...).")
    saved_class = custom.get("module_class")
    if saved_class and saved_class != cls._module_cls.__qualname__:
        raise ValueError(f"The model was saved with the module class {saved_class!r}, but {cls.__name__} builds "
                         f"{cls._module_cls.__qualname__!r}: load it with the SCVI subclass whose _module_cls is "
                         f"{saved_class}.")


def _freezing_state(module) -> dict:
    """What a query model (``load_query_data``) freezes: entry masks, BatchNorm momenta, dropout rates."""
    return {
        "masks": {name: torch.as_tensor(mask, dtype=torch.bool).cpu() for name, mask in module.frozen_parameters.items()},
        "batchnorm_momentum": {name: float(m.momentum) for name, m in module.named_modules()
                               if isinstance(m, torch.nn.BatchNorm1d) and m.momentum != 0.01},
        "dropout": {name: float(m.p) for name, m in module.named_modules() if isinstance(m, torch.nn.Dropout)},
    }


def _restore_freezing(module, state: dict | None) -> None:
    """Inverse of :func:`_freezing_state` (files without it leave the module as built)."""
    if not state:
        return
    module.frozen_parameters = dict(state.get("masks", {}))
    modules = dict(module.named_modules())
    for name, momentum in state.get("batchnorm_momentum", {}).items():
        modules[name].momentum = momentum
    for name, rate in state.get("dropout", {}).items():
        modules[name].p = rate


def _count_cells(indices) -> int:
    """Number of cells selected by integer positions or a boolean mask."""
    indices = np.asarray(indices)
    return int(indices.sum()) if indices.dtype == bool else len(indices)


def _resolve_device(accelerator: str = "auto", devices="auto") -> torch.device:
    """Pick one torch device from Lightning-style ``accelerator``/``devices`` arguments."""
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"accelerator={accelerator!r} is not one of 'auto', 'cpu', 'gpu', 'cuda'.")
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r} but CUDA is not available; use accelerator='cpu'.")
    if isinstance(devices, (list, tuple)):
        if len(devices) != 1:
            raise ValueError(f"devices={devices!r}: this runs on a single device; pass one index (data-parallel "
                             "training is train(devices=N, strategy='ddp') under torchrun).")
        devices = devices[0]
    if devices in ("auto", 1, None, "1") or devices == -1 and not use_cuda:
        index = 0
    elif isinstance(devices, int) and devices > 1:
        raise ValueError(f"devices={devices}: this runs on a single device (data-parallel training is "
                         "train(devices=N, strategy='ddp') under torchrun).")
    elif isinstance(devices, str) and devices.startswith("cuda"):
        return torch.device(devices)
    else:
        index = int(devices)
    return torch.device(f"cuda:{index}") if use_cuda else torch.device("cpu")
