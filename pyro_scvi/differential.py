"""Statistics of Bayesian differential expression between two groups of cells.

The posterior of each group's normalized expression ρ (``library_size=1``) is represented by
Monte-Carlo draws from the Pyro model and guide (:meth:`SCVI.get_normalized_expression` with
``n_samples_overall``); the two groups' draws are paired and every statistic is computed for all
genes at once on ``(M, G)`` arrays (``M`` paired draws, ``G`` genes).

Two tests:

* ``mode="vanilla"`` (Lopez et al. 2018): ``P(ρ1 > ρ2)`` per gene and its log Bayes factor.
* ``mode="change"`` (Boyeau et al. 2019): the posterior of the log2 fold change
  ``log2(ρ1 + ψ) − log2(ρ2 + ψ)``; a gene is differentially expressed when ``|lfc| ≥ δ``, up- and
  down-regulation being tested separately (``test_mode="three"``, the default) or together
  (``"two"``); genes are tagged DE at a target posterior expected false discovery rate.

Everything here takes NumPy arrays (or ``adata.obs`` for :func:`comparison_masks`) and returns
arrays or DataFrames, with no model dependency: :func:`vanilla_statistics`,
:func:`change_statistics`, :func:`pseudocounts_from_counts`, :func:`estimate_delta`,
:func:`hpd_interval`, :func:`fdr_flags`, :func:`raw_count_statistics`, :func:`pair_samples` and
:func:`comparison_table`, which assembles the table of one comparison. The model method
:meth:`SCVI.differential_expression <pyro_scvi.SCVI.differential_expression>`
(:mod:`pyro_scvi.api.differential`) selects the groups, draws the samples and calls these.

Column names and order follow scvi-tools 1.4's output (checked against its tables): the credible
intervals are ``lfc_confidence_interval_{lvl}_min/_max`` and ``is_de_fdr_{target}`` comes after the
count statistics.

Differences from scvi-tools (documented choices):

* no side effect on ``adata.obs``: the reference writes a temporary ``_scvi_temp_de`` column and
  caches ``_scvi_raw_norm_scaling``; here groups are boolean masks and the per-cell scaling is
  recomputed on each call;
* cells with zero total counts contribute 0 (not NaN) to ``raw_normalized_mean*``;
* an unknown group name, an empty group or an empty "Rest" raise ``ValueError`` (the reference
  fails with ``ZeroDivisionError``);
* when the two sample sets have different lengths (batch sets of different sizes) the longer one
  is truncated; with ``use_permutation=True`` and batch correction, ``m_permutation`` pairs are
  split evenly across the shared batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

__all__ = [
    "DE_MODES",
    "cells_mask",
    "comparison_masks",
    "comparison_table",
    "vanilla_statistics",
    "change_statistics",
    "pseudocounts_from_counts",
    "estimate_delta",
    "hpd_interval",
    "fdr_flags",
    "raw_count_statistics",
    "PreparedCounts",
    "pair_samples",
    "stacked_draws",
]

EPS = 1e-8
#: ``differential_expression(mode=...)``: posterior probability of a difference, or of a change
DE_MODES = ("vanilla", "change")
#: the extra keyword arguments of ``differential_expression`` and their defaults
DE_KWARGS = {
    "n_samples_overall": 5000,
    "use_permutation": False,
    "m_permutation": 10000,
    "change_fn": None,
    "m1_domain_fn": None,
    "pseudocounts": None,
    "threshold_counts": 0.01,
    "test_mode": "three",
    "cred_interval_lvls": None,
}
RAW_COLUMNS = (
    "raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
    "raw_normalized_mean1", "raw_normalized_mean2",
)


# ============================================================================ pure statistics
def _log_bayes_factor(p: np.ndarray, eps: float = EPS) -> np.ndarray:
    """``log(p + ε) − log(1 − p + ε)``, elementwise."""
    return np.log(p + eps) - np.log(1.0 - p + eps)


def vanilla_statistics(s1: np.ndarray, s2: np.ndarray, eps: float = EPS) -> dict[str, np.ndarray]:
    """Lopez et al. (2018) test of ``ρ1 > ρ2`` from paired posterior draws.

    Parameters
    ----------
    s1, s2
        Paired draws ``(M, G)`` of the normalized expression of group 1 and group 2.

    Returns
    -------
    ``{"proba_m1", "proba_m2", "bayes_factor"}``, each ``(G,)``:
    ``proba_m1 = mean_M[s1 > s2]``, ``proba_m2 = 1 − proba_m1`` and
    ``bayes_factor = log(proba_m1 + ε) − log(proba_m2 + ε)``.
    """
    s1, s2 = np.asarray(s1), np.asarray(s2)
    if s1.shape != s2.shape or s1.ndim != 2:
        raise ValueError(f"s1 and s2 must be paired (M, G) arrays, got {s1.shape} and {s2.shape}.")
    proba_m1 = np.mean(s1 > s2, axis=0)
    proba_m2 = 1.0 - proba_m1
    return {
        "proba_m1": proba_m1,
        "proba_m2": proba_m2,
        "bayes_factor": np.log(proba_m1 + eps) - np.log(proba_m2 + eps),
    }


def _row_blocks(n_rows: int, n_cols: int, values_per_block: int = 1 << 20) -> list[slice]:
    """Consecutive row slices of an ``(n_rows, n_cols)`` array, about ``values_per_block`` values each
    (a block's temporaries stay small and are reused by the allocator instead of mapped afresh)."""
    step = max(1, values_per_block // max(n_cols, 1))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def log_fold_change(s1: np.ndarray, s2: np.ndarray, pseudocounts: float = 0.0) -> np.ndarray:
    """``log2(s1 + ψ) − log2(s2 + ψ)``, elementwise (``(M, G)`` → ``(M, G)``)."""
    # torch's multi-threaded log2 is several times faster than NumPy's on large arrays; whole-array
    # calls (measured): by blocks of rows it was 1.5-4x slower on 2 shared cores
    dtype = torch.float64 if np.result_type(s1, s2, np.float32) == np.float64 else torch.float32
    lfc = torch.as_tensor(s1).to(dtype).add(pseudocounts).log2_()
    lfc -= torch.as_tensor(s2).to(dtype).add(pseudocounts).log2_()
    return lfc.numpy()


def _std_over_draws(values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Standard deviation (ddof 0) over axis 0 of ``values`` ``(M, G)`` given its float64 ``mean``
    ``(G,)``: two passes, the squared deviations summed in float64 by blocks of rows."""
    centre = mean.astype(values.dtype)
    total = np.zeros(values.shape[1:], dtype=np.float64)
    for rows in _row_blocks(values.shape[0], values.shape[1]):
        deviation = values[rows] - centre
        total += np.square(deviation, out=deviation).sum(axis=0, dtype=np.float64)
    return np.sqrt(total / values.shape[0]).astype(values.dtype)


def _median_over_draws(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=0)`` for ``(M, G)``, with the genes split over torch's thread count
    (NumPy's partition releases the GIL; on 12k genes the median is otherwise the slowest statistic)."""
    n_threads = min(torch.get_num_threads(), max(values.shape[1] // 1000, 1))
    if n_threads == 1:
        return np.median(values, axis=0)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n_threads) as pool:
        chunks = pool.map(lambda chunk: np.median(chunk, axis=0), np.array_split(values, n_threads, axis=1))
        return np.concatenate(list(chunks))


def estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """Data-driven LFC threshold δ from the per-gene mean log fold changes ``(G,)``.

    A 3-component Gaussian mixture is fitted to ``lfc_means`` (down-, non- and up-regulated
    genes); ``δ = max(min_thres, coef · (|lowest mean| + |highest mean|) / 2)``. The mixture uses
    NumPy's global random state (seeded by ``pyro_scvi.settings.seed``).
    """
    from sklearn.mixture import GaussianMixture

    lfc_means = np.asarray(lfc_means, dtype=np.float64).reshape(-1, 1)
    if len(lfc_means) < 3:
        raise ValueError(
            "delta=None estimates δ with a 3-component mixture over genes: it needs at least 3 genes."
        )
    mixture = GaussianMixture(n_components=3, random_state=np.random.randint(2**31 - 1)).fit(lfc_means)
    modes = np.sort(mixture.means_.ravel())
    return float(max(min_thres, coef * 0.5 * (abs(modes[0]) + abs(modes[-1]))))


def hpd_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest posterior density interval of each column of ``samples`` ``(M, G)``.

    The shortest interval ``[x_(i), x_(i+k)]`` of the sorted draws with ``k = ⌊level · M⌋``
    (``arviz.hdi``). Returns ``(low, high)``, each ``(G,)``.
    """
    from .diagnostics import import_arviz

    if not 0.0 < level < 1.0:
        raise ValueError(f"credible interval levels must lie in (0, 1), got {level!r}.")
    samples = np.asarray(samples)
    if int(np.floor(level * samples.shape[0])) < 1:
        raise ValueError(f"level {level} with {samples.shape[0]} samples leaves an empty interval.")
    interval = np.asarray(import_arviz().hdi(samples[None], hdi_prob=level))  # one chain: (G, 2)
    return interval[:, 0], interval[:, 1]


def change_statistics(
    s1: np.ndarray,
    s2: np.ndarray,
    delta: float | None = 0.25,
    pseudocounts: float = 0.0,
    change_fn: Callable | str | None = None,
    m1_domain_fn: Callable | None = None,
    test_mode: str = "three",
    cred_interval_lvls: Sequence[float] | None = None,
    eps: float = EPS,
) -> dict[str, np.ndarray | float]:
    """Boyeau et al. (2019) test on the posterior of the log2 fold change, from paired draws.

    Parameters
    ----------
    s1, s2
        Paired draws ``(M, G)`` of the normalized expression of group 1 and group 2.
    delta
        Threshold δ on ``|lfc|``; ``None`` estimates it with :func:`estimate_delta`.
    pseudocounts
        ψ added to both groups before the log (see :func:`pseudocounts_from_counts`).
    change_fn
        ``None``/``"log-fold"`` (:func:`log_fold_change`) or a callable ``(s1, s2, ψ) → (M, G)``.
    m1_domain_fn
        Optional callable ``change (M, G) → bool (M, G)`` defining the DE region; then
        ``proba_de = mean_M[m1_domain_fn(change)]`` and ``delta``/``test_mode`` are not used.
    test_mode
        ``"three"``: ``proba_de = max(P(lfc ≥ δ), P(lfc < −δ))``; ``"two"``: their sum.
    cred_interval_lvls
        Levels of highest-density credible intervals of the summarised lfc.

    Returns
    -------
    ``proba_de``, ``proba_not_de``, ``bayes_factor`` (each ``(G,)``), ``delta`` (float, δ used),
    and the summaries of ``change_fn(s1, s2, 1e-3 · ψ)`` over draws: ``lfc_mean``, ``lfc_median``,
    ``lfc_std`` (ddof 0), ``lfc_min``, ``lfc_max`` and ``lfc_confidence_interval_{lvl}_min/_max``
    (each ``(G,)``).
    """
    s1, s2 = np.asarray(s1), np.asarray(s2)
    if s1.shape != s2.shape or s1.ndim != 2:
        raise ValueError(f"s1 and s2 must be paired (M, G) arrays, got {s1.shape} and {s2.shape}.")
    if test_mode not in ("three", "two"):
        raise ValueError(f"test_mode must be 'three' or 'two', got {test_mode!r}.")
    if change_fn is None or change_fn == "log-fold":
        change_fn = log_fold_change
    elif not callable(change_fn):
        raise ValueError(
            f"change_fn must be None, 'log-fold' or a callable (x, y, pseudocounts), got {change_fn!r}."
        )

    change = np.asarray(change_fn(s1, s2, pseudocounts))
    if m1_domain_fn is not None:
        proba_de = np.mean(np.asarray(m1_domain_fn(change), dtype=bool), axis=0)
        delta = np.nan if delta is None else float(delta)
    else:
        if delta is None:
            delta = estimate_delta(change.mean(axis=0, dtype=np.float64))
        delta = float(delta)
        p_up = np.mean(change >= delta, axis=0)
        p_down = np.mean(change < -delta, axis=0)
        proba_de = np.maximum(p_up, p_down) if test_mode == "three" else p_up + p_down
    del change

    lfc = np.asarray(change_fn(s1, s2, 1e-3 * pseudocounts))
    lfc_mean = lfc.mean(axis=0, dtype=np.float64)
    out: dict[str, np.ndarray | float] = {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": _log_bayes_factor(proba_de, eps),
        "delta": delta,
        "lfc_mean": lfc_mean,
        "lfc_median": _median_over_draws(lfc),
        "lfc_std": _std_over_draws(lfc, lfc_mean),
        "lfc_min": lfc.min(axis=0),
        "lfc_max": lfc.max(axis=0),
    }
    for level in cred_interval_lvls or ():
        low, high = hpd_interval(lfc, level)
        out[f"lfc_confidence_interval_{level}_min"] = low
        out[f"lfc_confidence_interval_{level}_max"] = high
    return out


def pseudocounts_from_counts(
    s1: np.ndarray,
    s2: np.ndarray,
    raw_mean1: np.ndarray,
    raw_mean2: np.ndarray,
    threshold_counts: float = 0.01,
    floor: float = 1e-10,
) -> float:
    """The pseudocount ψ added before taking log fold changes.

    For each group ``k``, the genes whose mean raw count in the group is below
    ``threshold_counts`` are "not expressed"; ``ψ_k`` is the 0.9-quantile over those genes of the
    largest draw ``max_M s_k`` (0 when no gene qualifies). ``ψ = max(ψ_1, ψ_2) / G``, floored at
    ``floor``.

    Parameters
    ----------
    s1, s2
        Draws ``(M1, G)`` and ``(M2, G)`` of each group's normalized expression.
    raw_mean1, raw_mean2
        Mean raw count of each gene in each group, ``(G,)``.
    """
    n_genes = np.shape(s1)[1]

    def per_group(samples, raw_mean):
        quiet = np.asarray(raw_mean) < threshold_counts
        if not quiet.any():
            return 0.0
        return float(np.quantile(np.asarray(samples)[:, quiet].max(axis=0), 0.9))

    return max(max(per_group(s1, raw_mean1), per_group(s2, raw_mean2)) / n_genes, floor)


def fdr_flags(proba_de: np.ndarray, fdr_target: float = 0.05) -> np.ndarray:
    """Genes declared DE at a target posterior expected false discovery rate.

    With genes sorted by ``proba_de`` (descending, stable), the expected FDR of the top ``k`` is
    ``Σ_{i≤k}(1 − p_(i)) / k``; the largest set whose expected FDR is at most ``fdr_target`` is
    declared. Returns a boolean ``(G,)`` in the input order.
    """
    proba_de = np.asarray(proba_de, dtype=np.float64)
    order = np.argsort(-proba_de, kind="stable")
    expected_fdr = np.cumsum(1.0 - proba_de[order]) / np.arange(1, len(order) + 1)
    n_declared = int(np.sum(expected_fdr <= fdr_target))
    flags = np.zeros(len(proba_de), dtype=bool)
    flags[order[:n_declared]] = True
    return flags


@dataclass(frozen=True)
class PreparedCounts:
    """What :func:`raw_count_statistics` needs of an in-memory count matrix, computed once for every
    comparison of a DE call: the counts ``(n, G)`` (CSR or dense), their non-zero indicator (same
    form, float64) and each cell's scaling to 10⁴ counts ``(n,)`` (0 for a cell with no count)."""

    counts: object
    nonzero: object
    scaling: np.ndarray

    @classmethod
    def of(cls, counts) -> "PreparedCounts":
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        scaling = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        if sp.issparse(counts):
            counts = sp.csr_matrix(counts)
            nonzero = counts.copy()
            nonzero.data = (nonzero.data != 0).astype(np.float64)
        else:
            counts = np.asarray(counts)
            nonzero = (counts != 0).astype(np.float64)
        return cls(counts, nonzero, scaling)


def raw_count_statistics(counts, mask1: np.ndarray, mask2: np.ndarray) -> dict[str, np.ndarray]:
    """Count statistics of two groups of cells.

    Parameters
    ----------
    counts
        ``(n, G)`` raw counts, dense or scipy sparse, backed, or a :class:`PreparedCounts` of them.
    mask1, mask2
        Boolean ``(n,)`` masks of the two groups.

    Returns
    -------
    ``raw_mean1/2`` (mean count), ``non_zeros_proportion1/2`` (fraction of cells with a non-zero
    count) and ``raw_normalized_mean1/2`` (mean of the counts scaled to 10⁴ per cell; cells with
    no count contribute 0), each ``(G,)``.
    """
    from .data import backed

    if not isinstance(counts, PreparedCounts):
        if backed.is_backed(counts):  # on disk (backed AnnData): the same sums, streamed over the groups
            return backed.raw_count_statistics(counts, mask1, mask2)
        counts = PreparedCounts.of(counts)
    # one pass over the counts for both groups: columns mean1, mean2, normalized1, normalized2
    weights = np.stack([np.asarray(m, dtype=np.float64) / max(int(np.sum(m)), 1) for m in (mask1, mask2)], 1)
    sums = np.asarray(counts.counts.T @ np.hstack([weights, weights * counts.scaling[:, None]]))  # (G, 4)
    nonzero = np.asarray(counts.nonzero.T @ weights)  # (G, 2)
    return {
        "raw_mean1": sums[:, 0], "raw_mean2": sums[:, 1],
        "non_zeros_proportion1": nonzero[:, 0], "non_zeros_proportion2": nonzero[:, 1],
        "raw_normalized_mean1": sums[:, 2], "raw_normalized_mean2": sums[:, 3],
    }


def pair_samples(
    samples1: dict, samples2: dict, batch_correction: bool, use_permutation: bool = False,
    m_permutation: int = 10000,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair the draws of two groups: ``{batch: (M_b, G)}`` dicts → paired ``(M, G)`` arrays.

    With batch correction and the same batch set on both sides, draws are paired within each
    batch; otherwise the concatenated draws are paired. Pairing is index-wise (the longer side is
    truncated) or, with ``use_permutation``, ``m_permutation`` random pairs (NumPy's global RNG)
    split evenly across the batches.
    """
    def pair(a, b, m):
        if use_permutation:
            return a[np.random.randint(len(a), size=m)], b[np.random.randint(len(b), size=m)]
        n = min(len(a), len(b))
        return a[:n], b[:n]

    if batch_correction and set(samples1) == set(samples2):
        m = max(m_permutation // len(samples1), 1)
        pairs = [pair(samples1[b], samples2[b], m) for b in samples1]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    if batch_correction and set(samples1) & set(samples2):
        warnings.warn("Batches of group 1 and group 2 differ but overlap: draws are paired across batches.",
                      UserWarning, stacklevel=3)
    return pair(stacked_draws(samples1), stacked_draws(samples2), m_permutation)


def stacked_draws(draws: dict) -> np.ndarray:
    """All draws of a group ``{batch: (K_b, G)}`` as one ``(ΣK_b, G)`` array (no copy for one batch)."""
    values = list(draws.values())
    return values[0] if len(values) == 1 else np.concatenate(values)


# ============================================================================ groups
def cells_mask(idx, obs: pd.DataFrame, name: str) -> np.ndarray:
    """A boolean ``(n_obs,)`` mask from a mask, integer positions or a ``DataFrame.query`` string."""
    n_obs = len(obs)
    if isinstance(idx, str):
        try:
            selected = obs.eval(idx)
        except Exception as error:
            raise ValueError(f"{name}={idx!r} is not a valid pandas query on adata.obs: {error}") from error
        mask = np.asarray(selected)
        if mask.dtype != bool or mask.shape != (n_obs,):
            raise ValueError(f"{name}={idx!r} does not evaluate to one boolean per cell on adata.obs.")
    else:
        values = np.asarray(idx)
        if values.dtype == bool:
            if values.shape != (n_obs,):
                raise ValueError(
                    f"{name} is a boolean mask of shape {values.shape}; adata has {n_obs} cells."
                )
            mask = values
        elif values.size == 0 or np.issubdtype(values.dtype, np.integer):
            values = values.astype(np.int64).ravel()
            if values.size and (values.min() < 0 or values.max() >= n_obs):
                raise ValueError(f"{name} holds cell positions outside [0, {n_obs}).")
            mask = np.zeros(n_obs, dtype=bool)
            mask[values] = True
        else:
            raise TypeError(
                f"{name} must be a boolean mask, integer positions or a query string, "
                f"got dtype {values.dtype}."
            )
    if not mask.any():
        raise ValueError(f"{name} selects no cell: each group needs at least one cell.")
    return mask


def comparison_masks(obs: pd.DataFrame, groupby=None, group1=None, group2=None, idx1=None, idx2=None
                     ) -> list[tuple[np.ndarray, np.ndarray, object, object]]:
    """The comparisons of a DE call on cells described by ``obs`` (``n`` rows).

    ``idx1`` against ``idx2`` (default: the other cells), or with ``groupby`` each category in
    ``group1`` (default: all) against ``group2`` (default: the other cells, ``"Rest"``). Returns
    ``[(mask1, mask2, name1, name2)]`` with boolean ``(n,)`` masks; names are ``None`` when the
    groups come from ``idx1``/``idx2``.
    """
    if idx1 is not None:
        mask1 = cells_mask(idx1, obs, "idx1")
        if idx2 is None:
            mask2 = ~mask1
            if not mask2.any():
                raise ValueError("idx1 selects every cell, so group 2 (the other cells) is empty; pass idx2.")
        else:
            mask2 = cells_mask(idx2, obs, "idx2")
        return [(mask1, mask2, None, None)]
    if idx2 is not None:
        raise ValueError("idx2 was given without idx1.")
    if groupby is None:
        raise ValueError(
            "Pass groupby (with optional group1/group2) or idx1 (with optional idx2) to define the groups."
        )
    if groupby not in obs.columns:
        raise ValueError(f"groupby={groupby!r} is not a column of adata.obs (columns: {list(obs.columns)}).")
    column = obs[groupby].astype("category")
    categories = list(column.cat.categories)
    if group1 is None:
        if len(categories) < 2:
            raise ValueError(
                f"adata.obs[{groupby!r}] has a single category {categories}: there is nothing to compare."
            )
        group1 = categories
    elif isinstance(group1, str) or not isinstance(group1, (list, tuple, np.ndarray, pd.Index)):
        group1 = [group1]
    for name, values in (("group1", group1), ("group2", [] if group2 is None else [group2])):
        unknown = [g for g in values if g not in categories]
        if unknown:
            raise ValueError(
                f"{name} {unknown} not found in adata.obs[{groupby!r}] (categories: {categories})."
            )

    def cells_of(g):
        mask = np.asarray(column == g)
        if not mask.any():
            raise ValueError(f"group {g!r} of adata.obs[{groupby!r}] has no cell (an unused category? "
                             "drop it with .cat.remove_unused_categories()).")
        return mask

    comparisons = []
    for g1 in group1:
        mask1 = cells_of(g1)
        if group2 is None:
            mask2 = ~mask1
            if not mask2.any():
                raise ValueError(
                    f"Every cell is in group {g1!r}: the rest of adata.obs[{groupby!r}] is empty."
                )
            comparisons.append((mask1, mask2, g1, "Rest"))
        else:
            comparisons.append((mask1, cells_of(group2), g1, group2))
    return comparisons


# ============================================================================ one comparison
def comparison_table(
    s1: np.ndarray,
    s2: np.ndarray,
    all1: np.ndarray,
    all2: np.ndarray,
    genes: pd.Index,
    mode: str = "vanilla",
    raw: dict[str, np.ndarray] | None = None,
    all_stats: bool = True,
    delta: float | None = 0.25,
    fdr_target: float = 0.05,
    **options,
) -> pd.DataFrame:
    """The DE table of one comparison, indexed by ``genes`` ``(G,)``, sorted by the test statistic.

    Parameters
    ----------
    s1, s2
        Paired draws ``(M, G)`` of each group's normalized expression (see :func:`pair_samples`).
    all1, all2
        All draws of each group ``(M1, G)``, ``(M2, G)``: their means are ``scale1``/``scale2``, and
        they set the pseudocounts (:func:`pseudocounts_from_counts`).
    mode
        ``"vanilla"`` (:func:`vanilla_statistics`, sorted by ``bayes_factor``) or ``"change"``
        (:func:`change_statistics`, sorted by ``proba_de``, with ``is_de_fdr_{fdr_target}`` from
        :func:`fdr_flags`); both descending.
    raw
        The :func:`raw_count_statistics` of the two groups; needed with ``all_stats`` (the count
        columns are added) and in change mode without ``pseudocounts``.
    options
        ``pseudocounts``, ``threshold_counts``, ``change_fn``, ``m1_domain_fn``, ``test_mode``,
        ``cred_interval_lvls`` (defaults in :data:`DE_KWARGS`).
    """
    options = {**DE_KWARGS, **options}
    scales = {"scale1": all1.mean(0), "scale2": all2.mean(0)}
    if mode == "vanilla":
        columns = {**vanilla_statistics(s1, s2), **scales}
        sort_key = "bayes_factor"
    else:
        psi = options["pseudocounts"]
        if psi is None:
            psi = pseudocounts_from_counts(
                all1, all2, raw["raw_mean1"], raw["raw_mean2"], options["threshold_counts"]
            )
        stats = change_statistics(s1, s2, delta=delta, pseudocounts=psi, change_fn=options["change_fn"],
                                  m1_domain_fn=options["m1_domain_fn"], test_mode=options["test_mode"],
                                  cred_interval_lvls=options["cred_interval_lvls"])
        columns = {
            "proba_de": stats.pop("proba_de"), "proba_not_de": stats.pop("proba_not_de"),
            "bayes_factor": stats.pop("bayes_factor"), **scales,
            "pseudocounts": psi, "delta": stats.pop("delta"), **stats,
        }
        sort_key = "proba_de"
    if all_stats:
        columns.update({key: raw[key] for key in RAW_COLUMNS})
    if mode == "change":
        columns[f"is_de_fdr_{fdr_target}"] = fdr_flags(columns["proba_de"], fdr_target)
    return pd.DataFrame(columns, index=genes).sort_values(sort_key, ascending=False, kind="stable")
