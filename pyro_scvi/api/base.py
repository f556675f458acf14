"""``BaseModel``: what every model class shares, and the implementation of :class:`ModelProtocol`.

A model class holds a registry (how its AnnData is laid out), a module (the networks and the
Pyro model and guide), a private Pyro parameter store and its training state. This module keeps
that state and the AnnData bookkeeping around it; the user-facing methods come from the parts'
mixins (:mod:`.training`, :mod:`.queries`, :mod:`.evaluation`, :mod:`.saving`, ...).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import anndata
import numpy as np
import pandas as pd
import pyro
import torch

from ..data.loader import RegisteredData, minibatch_from_dict
from ..data.manager import AnnDataManager
from ..data.minibatch import Minibatch
from ..data.registry import MINIFY_TYPE_KEY, Registry, format_registry, setup_registry, validate_registered
from ..settings import settings

__all__ = ["BaseModel"]


class BaseModel:
    """State and AnnData bookkeeping shared by the model classes (implements ``ModelProtocol``).

    Subclasses set ``_module_cls`` and call :meth:`_init_state` from their constructor, then
    build ``self.module`` and ``self.init_params_``. Each subclass has its own store of set-up
    AnnData (:meth:`register_manager`), so ``SCVI.setup_anndata`` and another class's setup
    never see each other's registries.
    """

    #: the ``nn.Module`` class built for each model (a subclass may override it)
    _module_cls: type[torch.nn.Module]
    #: ``init_params_["non_kwargs"]`` entries shown by :attr:`summary_string`
    _summary_params: tuple[str, ...] = ()
    #: registries of AnnData objects set up for this class, by ``uns["_scvi_uuid"]`` (one per class)
    _setup_registries: dict[str, Registry] = {}
    #: their managers (the AnnData object with its registry), by the same key (one per class)
    _setup_managers: dict[str, AnnDataManager] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._setup_registries = {}
        cls._setup_managers = {}

    def _init_state(self, adata: anndata.AnnData | None, registry: Registry | dict | None) -> None:
        """Set the registry (from ``adata``'s setup, or a saved one), the AnnData and an untrained state."""
        if adata is not None:
            registry = self._registry_of(adata)
        elif registry is None:
            raise ValueError(f"{type(self).__name__} needs an AnnData registered with "
                             f"{type(self).__name__}.setup_anndata (or a saved registry).")
        self.registry_ = Registry.coerce(registry)
        self._adata = adata
        self._data_cache: RegisteredData | None = None
        self._instance_managers: dict[str, AnnDataManager] = {}
        if adata is not None:
            self._remember(AnnDataManager(adata, self.registry_))
        #: this model's Pyro parameter-store state (see :meth:`pyro_scope`); saved with the model
        self.param_store_state: dict = {"params": {}, "constraints": {}}
        self.is_trained_ = False
        self.history_: dict[str, pd.DataFrame] | None = None
        self.train_indices_ = self.validation_indices_ = self.test_indices_ = None

    # ------------------------------------------------------------------ set-up AnnData
    @classmethod
    def register_manager(cls, adata_manager: AnnDataManager) -> None:
        """Record ``adata_manager`` in this class's store (a later setup of the same AnnData replaces it)."""
        cls._setup_managers[adata_manager.adata_uuid] = adata_manager
        cls._setup_registries[adata_manager.adata_uuid] = adata_manager.registry

    @classmethod
    def _registry_of(cls, adata: anndata.AnnData) -> Registry:
        """The registry ``cls.setup_anndata`` recorded for ``adata``, checked against its current state."""
        registry = cls._setup_registries.get(adata.uns.get("_scvi_uuid"))
        if registry is None:
            raise ValueError(f"Please set up your AnnData with {cls.__name__}.setup_anndata first.")
        if registry.model_name != cls.__name__:
            raise ValueError(
                f"Please set up your AnnData with {cls.__name__}.setup_anndata first. It appears the "
                "AnnData object has been setup with a different model."
            )
        validate_registered(adata, registry)
        return registry

    def _remember(self, manager: AnnDataManager) -> None:
        """Record ``manager`` for this model and its class."""
        type(self).register_manager(manager)
        self._instance_managers[manager.adata_uuid] = manager

    def deregister_manager(self, adata: anndata.AnnData | None = None) -> None:
        """Forget the manager of ``adata`` (class and instance stores), or with ``None`` every
        manager except the one of the model's own AnnData."""
        own = self.registry_.uuid
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
            return self.adata_manager
        manager = self._instance_managers.get(adata.uns.get("_scvi_uuid"))
        if manager is None:
            if required:
                raise ValueError(
                    f"This AnnData has not been registered with this model: pass it to a model method "
                    f"(which transfers the setup) or call {type(self).__name__}.setup_anndata."
                )
            return None
        if manager.adata is not adata:  # a copy: transfer the setup onto this object
            self.transfer_setup(adata)
            manager = self._instance_managers[adata.uns["_scvi_uuid"]]
        return manager

    @property
    def adata_manager(self) -> AnnDataManager | None:
        """The manager of the model's AnnData."""
        if self._adata is None:
            return None
        manager = self._instance_managers.get(self.registry_.uuid)
        if manager is None or manager.adata is not self._adata or manager.registry is not self.registry_:
            manager = AnnDataManager(self._adata, self.registry_)
            self._instance_managers[manager.adata_uuid] = manager
        return manager

    def get_from_registry(self, adata: anndata.AnnData, registry_key: str):
        """The registered field ``registry_key`` of ``adata`` (e.g. ``"X"``, ``"batch"`` codes ``(n, 1)``)."""
        return self.get_anndata_manager(adata, required=True).get_from_registry(registry_key)

    def view_anndata_setup(
        self, adata: anndata.AnnData | None = None, hide_state_registries: bool = False
    ) -> None:
        """Print the registry of ``adata`` (default: the model's AnnData)."""
        registry = self.registry_ if adata is None else self.transfer_setup(adata)
        print(format_registry(registry, hide_state_registries=hide_state_registries))

    @property
    def summary_stats(self) -> dict:
        """Counts of the registered fields: ``n_vars``, ``n_cells``, ``n_batch``, ``n_labels``, ..."""
        return self.registry_.summary_stats

    @property
    def registry(self) -> Registry:
        """The model's registry (same as ``registry_``)."""
        return self.registry_

    @property
    def adata(self) -> anndata.AnnData | None:
        """The AnnData the model was built on (or ``None`` when loaded without one)."""
        return self._adata

    @adata.setter
    def adata(self, adata: anndata.AnnData) -> None:
        """Swap the model's AnnData: the setup is transferred to it (same categories) and becomes the
        model's registry."""
        self.registry_ = self.transfer_setup(adata)
        self._adata = adata
        self._data_cache = None

    def transfer_setup(self, adata: anndata.AnnData) -> Registry:
        """Register ``adata`` with the model's setup (same mappings and genes; new categories are an error)
        and return its registry."""
        if adata is self._adata:
            return self.registry_
        if adata.is_view:
            adata._init_as_actual(adata.copy())
        registry = setup_registry(
            adata, source_registry=self.registry_, model_name=type(self).__name__, check_var_names=True
        )  # same genes in the same order, or a clear error
        self._remember(AnnDataManager(adata, registry))
        return registry

    # ------------------------------------------------------------------ data for the parts
    def registered_data(self, adata: anndata.AnnData | None = None) -> tuple[anndata.AnnData, RegisteredData]:
        """``adata`` (default: the model's) and its registered tensors."""
        if adata is None or adata is self._adata:
            if self._adata is None:
                raise ValueError("This model has no AnnData (it was loaded without one): pass adata=.")
            if self._data_cache is None:
                self._data_cache = RegisteredData(self._adata, self.registry_)
            return self._adata, self._data_cache
        return adata, RegisteredData(adata, self.transfer_setup(adata))

    def minibatches(self, adata=None, indices=None, batch_size=None, dataloader=None) -> Iterator[Minibatch]:
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

    @property
    def var_names(self) -> np.ndarray:
        """The model's genes ``(G,)``, in the order of the count matrix."""
        return np.asarray(self.registry_.var_names)

    def batch_codes(self, transform_batch) -> list[int | None]:
        """Category values of the batch column → codes; ``None`` → ``[None]`` (the cells' own batches)."""
        if transform_batch is None:
            return [None]
        many = isinstance(transform_batch, (list, tuple, np.ndarray, pd.Index))
        values = transform_batch if many else [transform_batch]
        mapping = list(self.registry_.batch_categories)
        codes = []
        for value in values:
            if value not in mapping:
                raise ValueError(f'"{value}" not a valid batch category.')
            codes.append(mapping.index(value))
        return codes

    def check_trained(self) -> None:
        """Raise ``RuntimeError`` if the model has not been trained."""
        if not self.is_trained_:
            raise RuntimeError(
                "Trying to query inferred values from an untrained model. Please train the model first."
            )

    def check_not_minified(self, method: str, adata=None) -> None:
        """Raise ``ValueError`` if ``method`` needs counts that a minified AnnData no longer has."""
        adata = self._adata if adata is None else adata
        if adata is not None and adata.uns.get(MINIFY_TYPE_KEY) == "latent_posterior_parameters":
            raise ValueError(
                f"The {type(self).__name__}.{method} function currently does not support minified data."
            )

    # ------------------------------------------------------------------ parameters and device
    @contextlib.contextmanager
    def pyro_scope(self):
        """Run Pyro code with this model's private parameter store."""
        with pyro.get_param_store().scope(self.param_store_state):
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

    # ------------------------------------------------------------------ training state
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
    def minified_data_type(self) -> str | None:
        """``None``, or how :meth:`minify_adata` reduced the model's AnnData."""
        return None if self._adata is None else self._adata.uns.get(MINIFY_TYPE_KEY)

    @property
    def summary_string(self) -> str:
        params = self.init_params_["non_kwargs"]
        shown = ", ".join(f"{name}: {params[name]}" for name in self._summary_params)
        return (
            f"{type(self).__name__} model with the following parameters: \n{shown}."
            f"\nTraining status: {'Trained' if self.is_trained_ else 'Not Trained'}"
            f"\nModel's adata is minified?: {self.minified_data_type is not None}"
        )

    def __repr__(self) -> str:
        return self.summary_string
