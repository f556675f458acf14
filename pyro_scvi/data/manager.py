"""``AnnDataManager``: one AnnData together with the registry that describes its scVI fields."""

from __future__ import annotations

from collections.abc import Mapping

from .registry import Registry, get_from_registry

__all__ = ["AnnDataManager"]


class AnnDataManager:
    """An AnnData registered for a model class, and its :class:`~pyro_scvi.data.registry.Registry`.

    Parameters
    ----------
    adata
        The registered AnnData (its ``uns["_scvi_uuid"]`` names it).
    registry
        The registry :func:`~pyro_scvi.data.registry.setup_registry` returned for it (a
        :class:`~pyro_scvi.data.registry.Registry` or its dict form; kept as a ``Registry``).
    """

    def __init__(self, adata, registry: Registry | Mapping) -> None:
        self.adata = adata
        self.registry = Registry.coerce(registry)

    @property
    def adata_uuid(self) -> str | None:
        """``uns["_scvi_uuid"]`` of the registered AnnData."""
        return self.registry.uuid

    @property
    def summary_stats(self) -> dict:
        """Counts of the registered fields: ``n_vars``, ``n_cells``, ``n_batch``, ``n_labels``, ..."""
        return self.registry.summary_stats

    def get_from_registry(self, registry_key: str):
        """The registered field ``registry_key`` (``"X"``, ``"batch"``, ``"labels"``, ...) of the AnnData."""
        return get_from_registry(self.adata, self.registry, registry_key)

    def __repr__(self) -> str:
        stats = self.summary_stats
        return (
            f"AnnDataManager(uuid={self.adata_uuid!r}, n_cells={stats.get('n_cells')}, "
            f"n_vars={stats.get('n_vars')})"
        )
