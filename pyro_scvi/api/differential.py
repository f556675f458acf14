"""Differential expression as a model method: :meth:`DifferentialExpressionMixin.differential_expression`.

The mixin needs :class:`~pyro_scvi.api.protocol.ModelProtocol` (``registered_data``,
``var_names``, ``registry_``) and two queries of the model's public API:
``get_normalized_expression(adata, indices, transform_batch, n_samples_overall, weights,
batch_size, return_numpy, silent, ...)`` for the draws of ρ and ``get_latent_representation(adata,
indices)`` for ``filter_outlier_cells``. The statistics are in :mod:`pyro_scvi.differential`.

Steps of one call: check the options, select the groups (:func:`~pyro_scvi.differential.comparison_masks`),
and for each comparison drop outliers, draw ρ for both groups, pair the draws and build the table
(:func:`~pyro_scvi.differential.comparison_table`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..data import backed
from ..differential import (
    DE_KWARGS,
    DE_MODES,
    PreparedCounts,
    comparison_masks,
    comparison_table,
    pair_samples,
    raw_count_statistics,
    stacked_draws,
)

__all__ = ["DifferentialExpressionMixin"]


@dataclass(frozen=True)
class _Plan:
    """The checked options of one ``differential_expression`` call."""

    mode: str
    delta: float | None
    batch_size: int | None
    all_stats: bool
    batch_correction: bool
    fdr_target: float
    weights: str | None
    filter_outlier_cells: bool
    importance_weighting_kwargs: dict
    options: dict = field(default_factory=dict)  # DE_KWARGS, with the caller's values

    @property
    def n_samples(self) -> int:
        return int(self.options["n_samples_overall"])

    @property
    def needs_counts(self) -> bool:
        return self.all_stats or (self.mode == "change" and self.options["pseudocounts"] is None)


def _check_options(mode, weights, batch_correction, batchid1, batchid2, kwargs: dict) -> dict:
    """``DE_KWARGS`` updated with ``kwargs``; ``TypeError``/``ValueError`` for what is not accepted."""
    unknown = sorted(set(kwargs) - set(DE_KWARGS))
    if unknown:
        raise TypeError(f"differential_expression got unexpected keyword argument(s) {unknown}; "
                        f"accepted: {sorted(DE_KWARGS)}.")
    options = {**DE_KWARGS, **kwargs}
    if mode not in DE_MODES:
        raise ValueError(f"mode must be one of {DE_MODES}, got {mode!r}.")
    if options["test_mode"] not in ("three", "two"):
        raise ValueError(f"test_mode must be 'three' or 'two', got {options['test_mode']!r}.")
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights must be 'uniform' or 'importance', got {weights!r}.")
    if not batch_correction and (batchid1 is not None or batchid2 is not None):
        raise ValueError(
            "Inconsistent batch policy: batchid1/batchid2 choose the batches to decode in, which only "
            "applies with batch_correction=True."
        )
    if int(options["n_samples_overall"]) < 1:
        raise ValueError(f"n_samples_overall must be positive, got {int(options['n_samples_overall'])}.")
    return options


def _batch_list(model, batchid, name: str) -> list:
    """The batch categories to decode a group in: ``batchid`` (one or several) or every batch."""
    categories = list(model.registry_.batch_categories)
    if batchid is None:
        return categories
    values = [batchid] if isinstance(batchid, str) or np.isscalar(batchid) else list(batchid)
    unknown = [b for b in values if b not in categories]
    if unknown or not values:
        raise ValueError(
            f"{name}={batchid!r}: {unknown or 'no batch'} not among the batch categories {categories}."
        )
    return values


def _inliers(model, adata, cells: np.ndarray) -> np.ndarray:
    """The cells of ``cells`` ``(k,)`` that an EllipticEnvelope on their latent means calls inliers."""
    from sklearn.covariance import EllipticEnvelope

    latent = model.get_latent_representation(adata, indices=cells)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            keep = (
                EllipticEnvelope(random_state=np.random.randint(2**31 - 1)).fit(latent).predict(latent) == 1
            )
    except ValueError:
        warnings.warn(
            "Outlier filtering failed (the latent covariance could not be estimated): keeping all cells.",
            UserWarning,
            stacklevel=4,
        )
        return cells
    return cells[keep]


def _draw(model, adata, cells: np.ndarray, batches: list | None, plan: _Plan) -> dict:
    """Draws of ρ for a group: ``{batch category (or None): (K, G)}``, ``n_samples`` in all."""
    n_samples = plan.n_samples
    if batches is None:
        draws_per_batch = {None: n_samples}
    else:
        per_batch = int(n_samples / len(batches))
        if per_batch < 2:
            warnings.warn(
                f"n_samples_overall={n_samples} over {len(batches)} batches leaves fewer than 2 draws per "
                "batch: using 2.",
                UserWarning,
                stacklevel=4,
            )
            per_batch = 2
        draws_per_batch = {b: per_batch for b in batches}
    return {
        b: np.asarray(model.get_normalized_expression(
            adata, indices=cells, transform_batch=b, n_samples_overall=k, weights=plan.weights,
            batch_size=plan.batch_size, return_numpy=True, silent=True, **plan.importance_weighting_kwargs))
        for b, k in draws_per_batch.items()
    }


def _compare(
    model, adata, counts, mask1: np.ndarray, mask2: np.ndarray, batches: tuple, plan: _Plan
) -> pd.DataFrame:
    """The table of one comparison of the cells of ``mask1`` and ``mask2`` (boolean ``(n,)``)."""
    cells1, cells2 = np.flatnonzero(mask1), np.flatnonzero(mask2)
    if plan.filter_outlier_cells:
        cells1, cells2 = _inliers(model, adata, cells1), _inliers(model, adata, cells2)
    draws1 = _draw(model, adata, cells1, batches[0], plan)
    draws2 = _draw(model, adata, cells2, batches[1], plan)
    s1, s2 = pair_samples(draws1, draws2, plan.batch_correction, plan.options["use_permutation"],
                          plan.options["m_permutation"])
    raw = raw_count_statistics(counts, mask1, mask2) if plan.needs_counts else None
    stats_options = {k: v for k, v in plan.options.items()
                     if k not in ("n_samples_overall", "use_permutation", "m_permutation")}
    return comparison_table(
        s1, s2, stacked_draws(draws1), stacked_draws(draws2), pd.Index(model.var_names), plan.mode, raw=raw,
        all_stats=plan.all_stats, delta=plan.delta, fdr_target=plan.fdr_target, **stats_options)


class DifferentialExpressionMixin:
    """Adds :meth:`differential_expression` to a class that follows
    :class:`~pyro_scvi.api.protocol.ModelProtocol` and has ``get_normalized_expression`` and
    ``get_latent_representation``."""

    def differential_expression(
        self,
        adata=None,
        groupby: str | None = None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: str = "vanilla",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1=None,
        batchid2=None,
        fdr_target: float = 0.05,
        silent: bool = False,
        weights: str | None = "uniform",
        filter_outlier_cells: bool = False,
        importance_weighting_kwargs: dict | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """Bayesian differential expression of every gene between groups of cells.

        Groups: ``idx1`` (boolean mask, integer positions or a ``DataFrame.query`` string on
        ``adata.obs``) against ``idx2`` (same forms; default: all other cells), or, with ``groupby``
        (an ``obs`` column), each category in ``group1`` (default: every category) against ``group2``
        (a category; default: all other cells, named ``"Rest"``).

        For each group, ``n_samples_overall`` (5000) draws of ρ are resampled over its cells'
        posterior draws (its own batch per cell, or with ``batch_correction=True`` an equal share
        decoded in each batch of ``batchid1``/``batchid2``, default all batches), optionally
        importance-weighted (``weights="importance"``, with ``importance_weighting_kwargs`` for
        :meth:`get_normalized_expression`: by default the draws come from refined per-cell
        proposals, which gives stable markers where the guide's weights are degenerate;
        ``{"proposal": "guide"}`` is scvi-tools' weighting) and after dropping
        latent-space outliers (``filter_outlier_cells``). The draws are paired and tested
        (:func:`~pyro_scvi.differential.vanilla_statistics`, or
        :func:`~pyro_scvi.differential.change_statistics` with ``delta``, pseudocounts from
        :func:`~pyro_scvi.differential.pseudocounts_from_counts` and
        :func:`~pyro_scvi.differential.fdr_flags` at ``fdr_target``).

        ``kwargs``: ``n_samples_overall``, ``use_permutation``, ``m_permutation``, ``change_fn``,
        ``m1_domain_fn``, ``pseudocounts``, ``threshold_counts``, ``test_mode``, ``cred_interval_lvls``.

        Returns
        -------
        A DataFrame indexed by gene names. ``vanilla``: ``proba_m1, proba_m2, bayes_factor, scale1,
        scale2`` sorted by ``bayes_factor``; ``change``: ``proba_de, proba_not_de, bayes_factor,
        scale1, scale2, pseudocounts, delta, lfc_mean, lfc_median, lfc_std, lfc_min, lfc_max``
        (+ ``lfc_confidence_interval_{lvl}_min/_max``) sorted by ``proba_de``; both descending. Then,
        with ``all_stats``, the count statistics of :func:`~pyro_scvi.differential.raw_count_statistics`;
        in change mode ``is_de_fdr_{fdr_target}``; with ``groupby``, ``comparison`` (``"g1 vs g2"``),
        ``group1`` and ``group2``, the comparisons being stacked in category order.
        """
        options = _check_options(mode, weights, batch_correction, batchid1, batchid2, kwargs)
        plan = _Plan(mode, delta, batch_size, all_stats, batch_correction, fdr_target, weights,
                     filter_outlier_cells, dict(importance_weighting_kwargs or {}), options)
        adata, data = self.registered_data(adata)
        comparisons = comparison_masks(adata.obs, groupby, group1, group2, idx1, idx2)
        batches = ((_batch_list(self, batchid1, "batchid1"), _batch_list(self, batchid2, "batchid2"))
                   if batch_correction else (None, None))
        if not silent and len(comparisons) > 1:
            from tqdm.auto import tqdm

            comparisons = tqdm(comparisons, desc="DE", unit="comparison")
        counts = data.counts
        if plan.needs_counts and not backed.is_backed(counts):  # the cells' scalings etc. once per call
            counts = PreparedCounts.of(counts)
        tables = []
        for mask1, mask2, name1, name2 in comparisons:
            table = _compare(self, adata, counts, mask1, mask2, batches, plan)
            if name1 is not None:
                table["comparison"] = f"{name1} vs {name2}"
                table["group1"] = name1
                table["group2"] = name2
            tables.append(table)
        return pd.concat(tables) if len(tables) > 1 else tables[0]
