"""The minification part: keep each cell's posterior of z instead of its counts.

A minified AnnData (scvi-tools' "latent_posterior_parameters" types) stores the guide's
``(loc, variance)`` of z in ``obsm`` and the library size in ``obs``; the built-in guide then
reads the stored posterior instead of encoding counts (see ``Minibatch.latent_loc``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..data.registry import MINIFY_TYPE_KEY, minified_fields

__all__ = ["MinificationMixin", "MINIFIED_TYPES"]

MINIFIED_TYPES = ("latent_posterior_parameters", "latent_posterior_parameters_with_counts")


class MinificationMixin:
    """``minify_adata`` for a model following :class:`~pyro_scvi.api.protocol.ModelProtocol` whose module
    has ``latent_library`` and ``has_custom_guide``."""

    def minify_adata(
        self,
        minified_data_type: str = "latent_posterior_parameters",
        use_latent_qzm_key: str = "X_latent_qzm",
        use_latent_qzv_key: str = "X_latent_qzv",
    ) -> None:
        """Replace the model's AnnData by a copy that keeps each cell's posterior of z instead of its counts.

        Store the posterior first, e.g. ``adata.obsm["X_latent_qzm"], adata.obsm["X_latent_qzv"] =
        model.get_latent_representation(return_dist=True)``. With ``"latent_posterior_parameters"``
        X and every layer become all-zero sparse matrices; with
        ``"latent_posterior_parameters_with_counts"`` the counts stay. The total counts are kept in
        ``obs["observed_lib_size"]``, the posterior in ``obsm["scvi_latent_qzm"/"scvi_latent_qzv"]``
        (``"scanvi_latent_qzm"/"scanvi_latent_qzv"`` for SCANVI, as in scvi-tools). Latent
        representation, normalized expression, likelihood parameters, posterior predictive samples
        and differential expression then work from the stored posterior; methods that need the
        counts raise ``ValueError``. The original AnnData is not modified.
        """
        if minified_data_type not in MINIFIED_TYPES:
            raise ValueError(
                f"minified_data_type must be one of {MINIFIED_TYPES}, got {minified_data_type!r}."
            )
        if self.module.latent_library:
            raise ValueError(
                "Minification is not supported for models that do not use observed library size."
            )
        guide = getattr(self.module, "guide_family", "normal")
        if guide != "normal":
            raise ValueError(
                f"minify_adata stores a diagonal Gaussian posterior of z per cell, which cannot stand for "
                f"the guide={guide!r} posterior; keep the counts (no minification) or use guide='normal'."
            )
        if self.module.has_custom_guide:
            raise ValueError(
                "minify_adata needs the built-in guide, which reads the stored posterior "
                "(batch.latent_loc/latent_scale); this model has a custom guide."
            )
        adata = self.adata
        if adata is None:
            raise ValueError("This model has no AnnData to minify.")
        for key in (use_latent_qzm_key, use_latent_qzv_key):
            if key not in adata.obsm:
                raise ValueError(
                    f"adata.obsm[{key!r}] is missing: store the posterior first with "
                    "model.get_latent_representation(return_dist=True)."
                )
        _, data = self.registered_data()
        minified = adata.copy()
        if minified_data_type == "latent_posterior_parameters":
            minified.X = sp.csr_matrix(adata.shape, dtype=np.float32)
            for layer in list(minified.layers):
                minified.layers[layer] = sp.csr_matrix(adata.shape, dtype=np.float32)
            minified.raw = None
        minified.uns.pop("_scvi_uuid", None)
        minified.uns[MINIFY_TYPE_KEY] = minified_data_type
        keys = {name: key for name, (_, key) in minified_fields(type(self).__name__).items()}
        minified.obsm[keys["latent_qzm"]] = np.asarray(adata.obsm[use_latent_qzm_key], dtype=np.float32)
        minified.obsm[keys["latent_qzv"]] = np.asarray(adata.obsm[use_latent_qzv_key], dtype=np.float32)
        minified.obs[keys["observed_lib_size"]] = data.log_library.exp().numpy().ravel()
        self.adata = minified  # registers it with the model's setup and makes it the model's AnnData
