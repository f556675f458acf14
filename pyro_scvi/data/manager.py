"""``AnnDataManager``: one AnnData together with the registry that describes its scVI fields."""

from __future__ import annotations

from .registry import format_registry, get_from_registry, setup_registry, summary_stats

__all__ = ["AnnDataManager"]


class AnnDataManager:
    """An AnnData registered for a model class, and its registry (scvi-tools' layout).

    Parameters
    ----------
    adata
        The registered AnnData (its ``uns["_scvi_uuid"]`` names it).
    registry
        The dict :func:`~pyro_scvi.data.registry.setup_registry` returned for it.
    """

    def __init__(self, adata, registry: dict) -> None:
        self.adata = adata
        self.registry = registry

    @property
    def adata_uuid(self) -> str:
        return self.registry["_scvi_uuid"]

    @property
    def summary_stats(self) -> dict:
        return summary_stats(self.registry)

    def get_from_registry(self, registry_key: str):
        """The registered field ``registry_key`` (``"X"``, ``"batch"``, ``"labels"``, ...) of the AnnData."""
        return get_from_registry(self.adata, self.registry, registry_key)

    def view_registry(self, hide_state_registries: bool = False) -> None:
        print(format_registry(self.registry, hide_state_registries=hide_state_registries))

    def transfer_fields(self, adata_target, extend_categories: bool = False) -> "AnnDataManager":
        """Register ``adata_target`` with this setup (same category codes; unseen categories are an
        error unless ``extend_categories``) and return its manager."""
        registry = setup_registry(adata_target, source_registry=self.registry, extend_categories=extend_categories,
                                  model_name=self.registry.get("model_name", "SCVI"))
        return AnnDataManager(adata_target, registry)

    def __repr__(self) -> str:
        stats = self.summary_stats
        return f"AnnDataManager(uuid={self.adata_uuid!r}, n_cells={stats.get('n_cells')}, n_vars={stats.get('n_vars')})"
