"""What the reusable parts of :mod:`pyro_scvi.api` need from a model class.

Every part (training, queries, evaluation, saving, reference mapping, minification,
differential expression, criticism) is written against :class:`ModelProtocol` only. A model
class gets all of them by deriving from :class:`~pyro_scvi.api.base.BaseModel`, which implements
the protocol, and from the parts' mixins. Nothing here is private: a new model class or a
user's extension may call these methods too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ContextManager, Iterator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import anndata
    import numpy as np
    import pandas as pd
    import torch

    from ..data.loader import RegisteredData
    from ..data.minibatch import Minibatch
    from ..data.registry import Registry

__all__ = ["ModelProtocol"]


@runtime_checkable
class ModelProtocol(Protocol):
    """The interface a model offers to the parts.

    Attributes
    ----------
    module
        The ``nn.Module`` that owns the networks and binds ``model(batch, transform_batch=None)``
        and ``guide(batch, transform_batch=None)``, the Pyro functions (e.g.
        :class:`~pyro_scvi.models.module.SCVIModule`).
    registry_
        The :class:`~pyro_scvi.data.registry.Registry` of the model's AnnData.
    init_params_
        The constructor arguments, ``{"non_kwargs": {...}, "kwargs": {"kwargs": {...}}}``.
    is_trained_, history_, train_indices_, validation_indices_, test_indices_
        Training state, saved with the model.
    """

    module: torch.nn.Module
    registry_: Registry
    init_params_: dict
    is_trained_: bool
    history_: dict[str, pd.DataFrame] | None

    @property
    def adata(self) -> anndata.AnnData | None:
        """The AnnData the model was built on (``None`` when loaded without one)."""

    @property
    def device(self) -> torch.device:
        """The device of the module's parameters."""

    @property
    def var_names(self) -> np.ndarray:
        """The model's genes, ``(G,)``, in the order of the count matrix."""

    def pyro_scope(self) -> ContextManager[None]:
        """A context in which Pyro's parameter store is this model's own."""

    def registered_data(self, adata: anndata.AnnData | None = None) -> tuple[anndata.AnnData, RegisteredData]:
        """``adata`` (default: the model's) and its tensors; a new AnnData gets the setup transferred."""

    def minibatches(self, adata: anndata.AnnData | None = None, indices: Sequence[int] | None = None,
                    batch_size: int | None = None, dataloader=None) -> Iterator[Minibatch]:
        """Minibatches of the selected cells, in order, on :attr:`device`."""

    def cell_names(
        self, adata: anndata.AnnData | None = None, indices: Sequence[int] | None = None
    ) -> pd.Index:
        """Names of the selected cells (``obs_names``), in the order of :meth:`minibatches`."""

    def batch_codes(self, transform_batch) -> list[int | None]:
        """Batch categories → integer codes; ``None`` → ``[None]`` (each cell's own batch)."""

    def check_trained(self) -> None:
        """Raise ``RuntimeError`` if the model has not been trained."""

    def check_not_minified(self, method: str, adata: anndata.AnnData | None = None) -> None:
        """Raise ``ValueError`` if ``method`` needs counts that a minified AnnData no longer has."""

    def transfer_setup(self, adata: anndata.AnnData) -> Registry:
        """Register ``adata`` with the model's setup (same categories and genes) and return its registry."""

    @classmethod
    def register_manager(cls, adata_manager) -> None:
        """Record an :class:`~pyro_scvi.data.manager.AnnDataManager` in this class's store of set-up
        AnnData."""
