"""Model-agnostic statistics for criticising a fitted model: Pareto-smoothed importance sampling
(PSIS) diagnostics, effective sample sizes and posterior-predictive checks.

* :func:`psis_diagnostics` and :func:`effective_sample_size`: the Pareto shape k̂ and the effective
  sample size of importance weights, e.g. those of the marginal-likelihood estimator
  (:meth:`SCVI.get_marginal_ll(..., return_diagnostics=True) <pyro_scvi.SCVI.get_marginal_ll>`).
* :func:`posterior_predictive_check` / :class:`PosteriorPredictiveCheck`: observed against
  generated coefficient of variation (per cell and per gene), fraction of zeros per gene and the
  calibration of the predictive intervals, with agreement metrics and plots. The array functions
  :func:`coefficient_of_variation`, :func:`zero_fraction`, :func:`agreement`,
  :func:`predictive_pit`, :func:`calibration_coverage` and :func:`calibration_error` compute each
  statistic on their own.

The ArviZ conversion is the model method :meth:`SCVI.to_arviz <pyro_scvi.SCVI.to_arviz>`
(:mod:`pyro_scvi.api.criticism`). :func:`posterior_predictive_check` takes any model that follows
:class:`~pyro_scvi.api.protocol.ModelProtocol`; its draws come from
:func:`pyro_scvi.infer.posterior.posterior_traces` (the guide traced under a ``"particles"``
plate, the model replayed on the draws with its observation site ``"x"`` unconditioned), so
custom models and guides work as long as the counts are the sample site ``"x"`` inside the
``"cells"`` plate. The "posterior" is the variational posterior q(z, l | x).

This module imports neither the user classes nor :mod:`pyro_scvi.plotting` at import time; the
plot methods of :class:`PosteriorPredictiveCheck` call :mod:`pyro_scvi.plotting`, which does not
import this module. ArviZ is imported only when a function needs it (it is a dependency).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from .infer import posterior

__all__ = [
    "CALIBRATION_LEVELS",
    "PSISDiagnostics",
    "PosteriorPredictiveCheck",
    "agreement",
    "calibration_coverage",
    "calibration_error",
    "coefficient_of_variation",
    "effective_sample_size",
    "posterior_predictive_check",
    "predictive_pit",
    "psis_diagnostics",
    "smoothed_weights",
    "zero_fraction",
]

#: nominal levels of the central predictive intervals checked by :func:`calibration_coverage`
CALIBRATION_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def import_arviz():
    """``arviz``, without its import-time FutureWarning about the coming refactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _numpy(array, dtype=np.float64) -> np.ndarray:
    """A dense NumPy array from a tensor, NumPy, SciPy sparse or ``sparse`` (pydata) array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    elif not isinstance(array, np.ndarray):
        if hasattr(array, "todense"):
            array = array.todense()
        if hasattr(array, "toarray"):
            array = array.toarray()
    return np.asarray(array, dtype=dtype)


# ---------------------------------------------------------------------------- importance-sampling diagnostics
class PSISDiagnostics(NamedTuple):
    """Pareto-smoothed importance sampling of ``n`` sets of ``S`` log-weights."""

    #: normalised (``logsumexp`` = 0 per set) smoothed log-weights ``(S, n)``
    smoothed_log_weights: np.ndarray
    #: Pareto shape estimate k̂ of the upper tail of the weights ``(n,)``
    pareto_k: np.ndarray
    #: effective sample size ``1 / Σ_s w̃_s²`` of the smoothed normalised weights ``(n,)``
    ess: np.ndarray


def effective_sample_size(log_weights, axis: int = 0) -> np.ndarray:
    """Kish's effective sample size ``(Σ w)² / Σ w² = 1 / Σ w̃²`` (``w̃`` the normalised weights)
    of unnormalised log-weights along ``axis``: between 1 (one draw carries all the weight) and
    the number of draws (equal weights)."""
    lw = _numpy(log_weights)
    lw = lw - lw.max(axis=axis, keepdims=True)
    w = np.exp(lw)
    w /= w.sum(axis=axis, keepdims=True)
    return 1.0 / (w**2).sum(axis=axis)


def psis_diagnostics(log_weights) -> PSISDiagnostics:
    """Pareto-smoothed importance sampling (Vehtari et al. 2024, with ``arviz.psislw``) of
    log-weights ``(S, n)``: ``S`` draws (first axis) for each of ``n`` cells; a 1-D array is one
    set of draws.

    The Pareto shape k̂ of the largest weights says how far the estimate can be trusted: below 0.5
    (or ``1 − 1/log10 S`` for small ``S``) good, 0.5–0.7 usable, above 0.7 the proposal (the
    guide) misses mass of the target, and importance-sampling estimates such as the marginal
    likelihood are unreliable. Sets of exactly equal weights (a proposal equal to the target)
    have no tail: k̂ = −inf and ESS = S. k̂ needs a few hundred draws to be stable (with fewer
    than ~25 draws the tail is too short and ArviZ reports inf).
    """
    az = import_arviz()
    lw = _numpy(log_weights)
    one_set = lw.ndim == 1
    if one_set:
        lw = lw[:, None]
    if lw.ndim != 2:
        raise ValueError(f"log_weights must be (S, n) or (S,), got shape {lw.shape}.")
    n_draws = lw.shape[0]
    smoothed, pareto_k = az.psislw(np.ascontiguousarray(lw.T), reff=1.0)
    smoothed = np.asarray(smoothed, dtype=np.float64).T
    pareto_k = np.asarray(pareto_k, dtype=np.float64).reshape(-1)
    constant = np.ptp(lw, axis=0) == 0
    if constant.any():
        pareto_k[constant] = -np.inf
        smoothed[:, constant] = -math.log(n_draws)
    ess = effective_sample_size(smoothed, axis=0)
    if one_set:
        return PSISDiagnostics(smoothed[:, 0], pareto_k[0], ess[0])
    return PSISDiagnostics(smoothed, pareto_k, ess)


def smoothed_weights(log_weights, method: str = "psis") -> tuple[np.ndarray, float]:
    """Normalised importance weights ``(S,)`` of one set of log-weights ``(S,)`` and the PSIS k̂ of
    the raw weights.

    ``method``: ``"psis"`` Pareto-smooths the largest weights (:func:`psis_diagnostics`);
    ``"truncation"`` raises every log-weight to at least the log of the mean weight (scvi-tools'
    truncated importance sampling); ``"none"`` normalises the raw weights. k̂ needs a few hundred
    draws (see :func:`psis_diagnostics`).
    """
    if method not in ("psis", "truncation", "none"):
        raise ValueError(f"method must be 'psis', 'truncation' or 'none', got {method!r}.")
    lw = _numpy(log_weights).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ArviZ on sets with (nearly) equal weights
        psis = psis_diagnostics(lw)
    if method == "psis":
        lw = psis.smoothed_log_weights
    elif method == "truncation":
        floor = np.logaddexp.reduce(lw) - math.log(len(lw))
        lw = np.maximum(lw, floor)
    weights = np.exp(lw - lw.max())
    return weights / weights.sum(), float(psis.pareto_k)


# ---------------------------------------------------------------------------- posterior-predictive statistics
def coefficient_of_variation(counts, axis: int = -1) -> np.ndarray:
    """Standard deviation (ddof = 0) over mean along ``axis``; NaN where the mean is 0.

    On counts ``(cells, genes)``: ``axis=-1`` (over genes) gives one CV per cell, ``axis=-2``
    (over cells) one per gene. Leading axes (e.g. draws) are kept.
    """
    counts = _numpy(counts)
    mean = counts.mean(axis=axis)
    std = counts.std(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), np.nan)


def zero_fraction(counts, axis: int = -2) -> np.ndarray:
    """Fraction of zero entries along ``axis`` (default: over cells, one value per gene)."""
    return (_numpy(counts) == 0).mean(axis=axis)


def agreement(observed, generated) -> dict[str, float]:
    """Pearson and Spearman correlation and mean absolute error between two vectors of a
    statistic, over the entries where both are finite (NaN when fewer than two)."""
    from scipy import stats

    observed, generated = _numpy(observed).ravel(), _numpy(generated).ravel()
    finite = np.isfinite(observed) & np.isfinite(generated)
    observed, generated = observed[finite], generated[finite]
    if observed.size < 2:
        mae = float(np.abs(observed - generated).mean()) if observed.size else np.nan
        return {"pearson": np.nan, "spearman": np.nan, "mae": mae}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input → NaN correlation
        pearson = float(stats.pearsonr(observed, generated)[0])
        spearman = float(stats.spearmanr(observed, generated)[0])
    return {"pearson": pearson, "spearman": spearman, "mae": float(np.abs(observed - generated).mean())}


def _samples_first(samples, sample_axis: int) -> np.ndarray:
    samples = _numpy(samples)
    return np.moveaxis(samples, sample_axis, 0)


def predictive_pit(observed, samples, sample_axis: int = 0, seed: int | None = 0) -> np.ndarray:
    """Randomised probability integral transform of each observed count under its predictive.

    With ``F`` the empirical CDF of the ``S`` draws of an entry, ``u = F(y⁻) + V·(F(y) − F(y⁻))``,
    ``V ~ Uniform(0, 1)``: uniform on [0, 1] when ``y`` comes from the predictive, also for
    discrete counts (the ties are spread at random). ``observed`` ``(…)``; ``samples`` the same
    shape with one more axis of draws at ``sample_axis``. Returns ``u`` with ``observed``'s shape.
    """
    observed = _numpy(observed)
    samples = _samples_first(samples, sample_axis)
    if samples.shape[1:] != observed.shape:
        raise ValueError(f"samples {samples.shape} (draws first) do not match observed {observed.shape}.")
    below = (samples < observed).mean(axis=0)
    at_or_below = (samples <= observed).mean(axis=0)
    rng = np.random.default_rng(seed)
    return below + rng.random(observed.shape) * (at_or_below - below)


def _coverage_from_pit(pit: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    distance = np.abs(pit.ravel() - 0.5)
    return np.array([(distance <= level / 2).mean() for level in levels])


def calibration_coverage(
    observed,
    samples,
    levels: Sequence[float] = CALIBRATION_LEVELS,
    sample_axis: int = 0,
    seed: int | None = 0,
) -> np.ndarray:
    """Fraction of observed entries inside the central predictive interval of each nominal
    ``level`` (``|u − 0.5| ≤ level / 2`` for the randomised PIT ``u`` of :func:`predictive_pit`).
    A calibrated predictive covers a fraction ``level``. Returns ``(len(levels),)``."""
    return _coverage_from_pit(predictive_pit(observed, samples, sample_axis, seed), levels)


def calibration_error(coverage, levels: Sequence[float] = CALIBRATION_LEVELS) -> float:
    """Mean squared difference between the observed coverage and the nominal levels (0: perfect)."""
    coverage, levels = _numpy(coverage), _numpy(levels)
    return float(np.mean((coverage - levels) ** 2))


class _Accumulator:
    """Posterior-predictive statistics summed over minibatches of cells (no draws kept)."""

    def __init__(self, levels: Sequence[float], seed: int | None) -> None:
        self.levels = tuple(float(level) for level in levels)
        self.rng = np.random.default_rng(seed)
        self.cell_observed, self.cell_generated = [], []
        self.n_cells = 0
        self.sums = None
        self.inside = np.zeros(len(self.levels))
        self.n_entries = 0

    def add(self, observed: np.ndarray, samples: np.ndarray) -> None:
        """``observed`` ``(m, G)``, ``samples`` ``(S, m, G)``, both float64."""
        self.cell_observed.append(coefficient_of_variation(observed, axis=-1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # cells with zero counts in every draw
            self.cell_generated.append(np.nanmean(coefficient_of_variation(samples, axis=-1), axis=0))
        sums = {
            "observed": observed.sum(0),
            "observed_sq": (observed**2).sum(0),
            "observed_zeros": (observed == 0).sum(0),
            "generated": samples.sum(1),
            "generated_sq": (samples**2).sum(1),
            "generated_zeros": (samples == 0).sum(1),
        }
        self.sums = (
            sums if self.sums is None else {key: self.sums[key] + value for key, value in sums.items()}
        )
        self.n_cells += observed.shape[0]
        below = (samples < observed).mean(axis=0)
        at_or_below = (samples <= observed).mean(axis=0)
        pit = below + self.rng.random(observed.shape) * (at_or_below - below)
        self.inside += _coverage_from_pit(pit, self.levels) * pit.size
        self.n_entries += pit.size

    @staticmethod
    def _cv(total, squares, n):
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), np.nan)

    def result(self, n_samples: int, cell_names=None, gene_names=None) -> "PosteriorPredictiveCheck":
        s, n = self.sums, self.n_cells
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gene_generated = np.nanmean(self._cv(s["generated"], s["generated_sq"], n), axis=0)
        n_genes = s["observed"].shape[0]
        cells = pd.Index(cell_names if cell_names is not None else np.arange(n), name="cell")
        genes = pd.Index(gene_names if gene_names is not None else np.arange(n_genes), name="gene")
        return PosteriorPredictiveCheck(
            cv_cell=pd.DataFrame({"observed": np.concatenate(self.cell_observed),
                                  "generated": np.concatenate(self.cell_generated)}, index=cells),
            cv_gene=pd.DataFrame({"observed": self._cv(s["observed"], s["observed_sq"], n),
                                  "generated": gene_generated}, index=genes),
            zero_fraction=pd.DataFrame({"observed": s["observed_zeros"] / n,
                                        "generated": (s["generated_zeros"] / n).mean(0)}, index=genes),
            calibration=pd.DataFrame({"coverage": self.inside / self.n_entries},
                                     index=pd.Index(self.levels, name="level")),
            n_samples=n_samples,
        )


@dataclass
class PosteriorPredictiveCheck:
    """Observed against posterior-predictive statistics of a count matrix.

    Attributes
    ----------
    cv_cell
        Per cell: coefficient of variation of the counts over genes, ``observed`` and
        ``generated`` (the CV of each predictive draw, averaged over draws).
    cv_gene
        Per gene: CV over cells, ``observed`` and ``generated`` (averaged over draws).
    zero_fraction
        Per gene: fraction of cells with a zero count, ``observed`` and ``generated``.
    calibration
        Per nominal level (index ``level``): ``coverage``, the fraction of observed counts inside
        the central predictive interval of that level (see :func:`calibration_coverage`).
    n_samples
        Number of predictive draws.
    """

    cv_cell: pd.DataFrame
    cv_gene: pd.DataFrame
    zero_fraction: pd.DataFrame
    calibration: pd.DataFrame
    n_samples: int

    @classmethod
    def from_arrays(
        cls,
        observed,
        samples,
        sample_axis: int = 0,
        cell_names=None,
        gene_names=None,
        levels: Sequence[float] = CALIBRATION_LEVELS,
        seed: int | None = 0,
    ) -> "PosteriorPredictiveCheck":
        """The check from observed counts ``(cells, genes)`` and predictive draws with the draws
        at ``sample_axis`` (``(S, cells, genes)`` by default; ``sample_axis=-1`` for the
        ``(cells, genes, S)`` arrays of :meth:`~pyro_scvi.SCVI.posterior_predictive_sample`)."""
        observed = _numpy(observed)
        samples = _samples_first(samples, sample_axis)
        if observed.ndim != 2 or samples.shape[1:] != observed.shape:
            raise ValueError(f"observed {observed.shape} must be (cells, genes) and samples {samples.shape} "
                             "(draws first) (S, cells, genes).")
        accumulator = _Accumulator(levels, seed)
        accumulator.add(observed, samples)
        return accumulator.result(samples.shape[0], cell_names, gene_names)

    @property
    def calibration_error(self) -> float:
        """Mean squared difference between coverage and nominal level (0 for a calibrated model)."""
        return calibration_error(self.calibration["coverage"].to_numpy(), self.calibration.index.to_numpy())

    @property
    def metrics(self) -> pd.DataFrame:
        """Agreement of observed and generated statistics: rows ``cv_cell``, ``cv_gene``,
        ``zero_fraction``; columns ``pearson``, ``spearman``, ``mae`` (mean absolute error)."""
        rows = {name: agreement(table["observed"], table["generated"])
                for name, table in (("cv_cell", self.cv_cell), ("cv_gene", self.cv_gene),
                                    ("zero_fraction", self.zero_fraction))}
        return pd.DataFrame.from_dict(rows, orient="index")[["pearson", "spearman", "mae"]]

    def plot_cv(self, kind: str = "cell", ax=None):
        """Observed against generated coefficient of variation per cell (``kind="cell"``) or per
        gene (``kind="gene"``); see :func:`pyro_scvi.plotting.plot_coefficient_of_variation`."""
        from .plotting import plot_coefficient_of_variation

        if kind not in ("cell", "gene"):
            raise ValueError(f"kind must be 'cell' or 'gene', got {kind!r}.")
        table = self.cv_cell if kind == "cell" else self.cv_gene
        return plot_coefficient_of_variation(table["observed"], table["generated"], kind=kind, ax=ax)

    def plot_zero_fraction(self, ax=None):
        """Observed against generated fraction of zeros per gene."""
        from .plotting import plot_zero_fraction

        return plot_zero_fraction(self.zero_fraction["observed"], self.zero_fraction["generated"], ax=ax)

    def plot_calibration(self, ax=None):
        """Coverage of the central predictive intervals against their nominal level."""
        from .plotting import plot_calibration

        return plot_calibration(
            self.calibration.index.to_numpy(), self.calibration["coverage"].to_numpy(), ax=ax
        )


def posterior_predictive_check(
    model,
    adata=None,
    indices=None,
    n_samples: int = 25,
    batch_size: int | None = None,
    levels: Sequence[float] = CALIBRATION_LEVELS,
    seed: int | None = 0,
) -> PosteriorPredictiveCheck:
    """Posterior-predictive check of a trained model on its cells (or ``indices`` of ``adata``):
    ``n_samples`` predictive count matrices are drawn minibatch by minibatch and summarised on
    the fly (memory ``n_samples × batch_size × genes``, never the whole matrix of draws).

    ``model``: any object following :class:`~pyro_scvi.api.protocol.ModelProtocol` (e.g. a
    trained :class:`~pyro_scvi.SCVI`). ``seed`` seeds the randomised PIT of the calibration; the
    predictive draws use Pyro's global RNG (``pyro_scvi.settings.seed``). Returns a
    :class:`PosteriorPredictiveCheck`::

        ppc = posterior_predictive_check(model, n_samples=25)
        ppc.metrics              # pearson / spearman / mae of CV per cell, CV per gene, zeros per gene
        ppc.calibration_error    # 0 for a calibrated predictive
        ppc.plot_cv("gene"); ppc.plot_zero_fraction(); ppc.plot_calibration()
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be ≥ 1, got {n_samples}.")
    model.check_trained()
    model.check_not_minified("posterior_predictive_check", adata)
    module = model.module
    module.eval()
    accumulator = _Accumulator(levels, seed)
    with model.pyro_scope(), torch.no_grad():
        for batch in model.minibatches(adata, indices, batch_size):
            _, (model_trace,) = posterior.posterior_traces(module.model, module.guide, batch, n_samples,
                                                           sample_observed=True)
            draws, _, _ = posterior.predictive_observation(model_trace, batch.x, n_samples)
            accumulator.add(batch.x.double().cpu().numpy(), draws.double().cpu().numpy())
    cells = np.asarray(model.cell_names(adata, indices)).astype(str)
    return accumulator.result(n_samples, cells, np.asarray(model.var_names).astype(str))
