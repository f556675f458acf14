"""Model criticism for a trained :class:`~pyro_scvi.SCVI`: ArviZ conversion, Pareto-smoothed
importance sampling (PSIS) diagnostics and posterior-predictive checks.

* :func:`to_arviz` (also the method :meth:`SCVI.to_arviz <pyro_scvi.SCVI.to_arviz>`): posterior
  draws of the latent variables, posterior-predictive counts, the observed counts, the per-cell
  log-likelihood and the batch/label of each cell as an :class:`arviz.InferenceData`, so that
  ``az.loo``, ``az.plot_ppc``, ``az.summary`` ... work with the cell as the observation.
* :func:`psis_diagnostics` and :func:`effective_sample_size`: the Pareto shape k̂ and the effective
  sample size of importance weights, e.g. those of the marginal-likelihood estimator
  (:meth:`SCVI.get_marginal_ll(..., return_diagnostics=True) <pyro_scvi.SCVI.get_marginal_ll>`).
* :func:`posterior_predictive_check` / :class:`PosteriorPredictiveCheck`: observed against
  generated coefficient of variation (per cell and per gene), fraction of zeros per gene and the
  calibration of the predictive intervals, with agreement metrics and plots. The array functions
  :func:`coefficient_of_variation`, :func:`zero_fraction`, :func:`agreement`,
  :func:`predictive_pit`, :func:`calibration_coverage` and :func:`calibration_error` compute each
  statistic on their own.

Every posterior quantity comes from traces of ``model.module.guide`` and ``model.module.model``:
the guide is traced under a ``"particles"`` plate and the model, its observation site
unconditioned, is replayed on those draws (what ``pyro.infer.Predictive`` does in
:meth:`~pyro_scvi.SCVI.posterior_predictive_sample`). Custom models and guides therefore work as
long as the counts are the sample site ``"x"`` inside the ``"cells"`` plate. The "posterior" is the
variational posterior q(z, l | x): PSIS-LOO computed from it treats the guide's draws as posterior
draws.

ArviZ is imported only when a function needs it (it is a dependency of the package).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from pyro import plate, poutine
from pyro.poutine.util import prune_subsample_sites

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
    "to_arviz",
    "zero_fraction",
]

#: nominal levels of the central predictive intervals checked by :func:`calibration_coverage`
CALIBRATION_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: draws × cells × genes above which :func:`to_arviz` warns about the size of posterior_predictive
LARGE_PREDICTIVE_ELEMENTS = 2.5e8
OBSERVED_SITE = "x"
CELL_PLATE = "cells"


def _arviz():
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


# ---------------------------------------------------------------------------- posterior draws
def _predictive_traces(model, guide, batch, n_samples: int, global_trace=None):
    """``(model_trace, guide_trace)``: ``n_samples`` guide draws per cell (``"particles"`` plate)
    and the model replayed on them with its observation sampled rather than observed.

    ``global_trace``: a trace of the guide's global sites whose draws this minibatch reuses (so
    that draw ``s`` of a global latent is one value for every cell)."""
    if global_trace is not None:
        guide = poutine.replay(guide, trace=global_trace)
    with plate("particles", n_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(poutine.uncondition(model), trace=guide_trace)).get_trace(batch)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def _latent_values(guide_trace, n_samples: int, n_cells: int) -> dict[str, tuple[torch.Tensor, list[str] | None]]:
    """Values of the guide's latent sample sites: ``(S, n, ·)`` for sites in the ``"cells"``
    plate (dims ``None``); for global sites (e.g. a latent dispersion) ``(S, ·)`` with the names
    of the dimensions after the draw axis (``"gene"`` for the axis of a ``"genes"`` plate)."""
    out = {}
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site["infer"].get("_deterministic", False):
            continue
        value, event_dim = site["value"], site["fn"].event_dim
        frames = {frame.name: frame.dim for frame in site["cond_indep_stack"]}
        if CELL_PLATE in frames:
            event = tuple(value.shape[value.dim() - event_dim:]) if event_dim else ()
            out[name] = (value.expand(n_samples, n_cells, *event), None)
            continue
        # a global site: drop the singleton axes the particles plate left between draws and values
        axis_names = {value.dim() - event_dim + dim: "gene" for plate_name, dim in frames.items() if plate_name == "genes"}
        keep = [i for i in range(1, value.dim()) if value.shape[i] != 1 or i in axis_names]
        value = value.expand(n_samples, *value.shape[1:]) if value.shape[0] == 1 else value
        value = value.reshape(n_samples, *[value.shape[i] for i in keep])
        out[name] = (value, [axis_names.get(i, f"{name}_dim_{j}") for j, i in enumerate(keep)])
    return out


def _observation(model_trace, x: torch.Tensor, n_samples: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Predictive draws ``(S, n, G)``, per-cell log-likelihood of ``x`` ``(S, n)`` (summed over
    genes) and whether the likelihood is discrete."""
    if OBSERVED_SITE not in model_trace.nodes:
        raise KeyError(f"The model has no observation site {OBSERVED_SITE!r}.")
    site = model_trace.nodes[OBSERVED_SITE]
    log_lik = site["fn"].log_prob(x)
    while log_lik.dim() > 2:
        log_lik = log_lik.sum(-1)
    draws = site["value"]
    discrete = bool(getattr(site["fn"].support, "is_discrete", False))
    return draws.expand(n_samples, *x.shape), log_lik.expand(n_samples, x.shape[0]), discrete


def _category_names(model, key: str, codes: np.ndarray) -> np.ndarray:
    """Category of each code of the registered field ``key``; the codes when there is no mapping."""
    try:
        mapping = np.asarray(model.registry_["field_registries"][key]["state_registry"]["categorical_mapping"])
    except (KeyError, TypeError):
        return codes
    return mapping[codes].astype(str)


def to_arviz(model, adata=None, indices=None, n_samples: int = 100, batch_size: int | None = None, *,
             posterior_predictive: bool = True):
    """The posterior of a trained model as an :class:`arviz.InferenceData` (one chain of
    ``n_samples`` draws of the variational posterior per cell).

    Groups (``cell`` coordinates are the cell names, ``gene`` the gene names):

    * ``posterior``: ``z`` ``(chain, draw, cell, latent_dim)`` (the Gaussian variable, before the
      softmax of ``latent_distribution="ln"``) and, when the library is latent, ``library``
      ``(chain, draw, cell)``, the log-library; any other latent site of a custom guide likewise.
      A global latent site (outside the ``"cells"`` plate, e.g. ``inverse_dispersion`` with a
      ``dispersion_prior``) has dims ``(chain, draw, gene, ...)``; draw ``s`` is one value for all
      cells (every minibatch reuses the draws made with the first).
    * ``posterior_predictive``: counts ``x`` ``(chain, draw, cell, gene)`` drawn from p(x̃ | z, l)
      at the same draws (int32 for count likelihoods, float32 otherwise).
    * ``log_likelihood``: ``x`` ``(chain, draw, cell)``: log p(x_n | z, l) summed over genes, so
      that ``az.loo(idata)`` and ``az.waic(idata)`` treat each cell as one observation.
    * ``observed_data``: the counts ``x`` ``(cell, gene)``.
    * ``constant_data``: ``batch`` and ``labels`` ``(cell,)``, the category of each cell.

    **Memory**: ``posterior_predictive`` holds ``n_samples × cells × genes`` numbers (4 bytes
    each: 100 draws of 10,000 cells × 2,000 genes are 8 GB). Pass ``indices`` to check a subset
    of cells, lower ``n_samples``, or ``posterior_predictive=False`` to leave that group out (the
    other groups are small). A warning is issued above 2.5·10⁸ elements.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be ≥ 1, got {n_samples}.")
    az = _arviz()
    model.check_trained()
    model.check_not_minified("to_arviz", adata)
    module = model.module
    module.eval()
    cells = np.asarray(model.cell_names(adata, indices)).astype(str)
    genes = np.asarray(model.var_names).astype(str)
    n_cells, n_genes = len(cells), len(genes)
    if n_cells == 0:
        raise ValueError("to_arviz: no cells selected.")
    if posterior_predictive and n_samples * n_cells * n_genes > LARGE_PREDICTIVE_ELEMENTS:
        warnings.warn(
            f"to_arviz: posterior_predictive holds {n_samples} × {n_cells} × {n_genes} values "
            f"(~{4 * n_samples * n_cells * n_genes / 1e9:.1f} GB); pass indices=, a smaller n_samples or "
            "posterior_predictive=False.", UserWarning, stacklevel=2)

    latent: dict[str, np.ndarray] = {}
    dims = {"x": ["cell", "gene"], "batch": ["cell"], "labels": ["cell"]}
    global_sites: set[str] = set()
    log_lik = np.empty((n_samples, n_cells), dtype=np.float64)
    observed = predictive = None
    batch_codes = np.empty(n_cells, dtype=np.int64)
    label_codes = np.empty(n_cells, dtype=np.int64)
    offset = 0
    global_trace = None  # the first minibatch's draws of the global latents, reused by the others
    with model.pyro_scope(), torch.no_grad():
        for batch in model.minibatches(adata, indices, batch_size):
            m = batch.n_cells
            rows = slice(offset, offset + m)
            model_trace, guide_trace = _predictive_traces(module.model, module.guide, batch, n_samples, global_trace)
            for name, (value, global_dims) in _latent_values(guide_trace, n_samples, m).items():
                if global_dims is not None:
                    if name not in latent:
                        latent[name] = value.cpu().numpy().astype(np.float32)
                        dims[name] = global_dims
                        global_sites.add(name)
                    continue
                if name not in latent:
                    latent[name] = np.empty((n_samples, n_cells, *value.shape[2:]), dtype=np.float32)
                latent[name][:, rows] = value.cpu().numpy()
            if global_trace is None and global_sites:
                global_trace = poutine.Trace()
                for name in global_sites:
                    global_trace.add_node(name, **guide_trace.nodes[name])
            draws, cell_log_lik, discrete = _observation(model_trace, batch.x, n_samples)
            dtype = np.int32 if discrete else np.float32
            if observed is None:
                observed = np.empty((n_cells, n_genes), dtype=dtype)
                if posterior_predictive:
                    predictive = np.empty((n_samples, n_cells, n_genes), dtype=dtype)
            observed[rows] = batch.x.cpu().numpy()
            if posterior_predictive:
                predictive[:, rows] = draws.cpu().numpy()
            log_lik[:, rows] = cell_log_lik.double().cpu().numpy()
            batch_codes[rows] = batch.batch_index.reshape(-1).cpu().numpy()
            label_codes[rows] = batch.labels.reshape(-1).cpu().numpy()
            offset += m
    if offset != n_cells:
        raise RuntimeError(f"Expected {n_cells} cells, got {offset} from the minibatches.")

    coords = {"cell": cells, "gene": genes}
    posterior = {}
    for name, value in latent.items():
        if name in global_sites:
            posterior[name] = value[None]
            continue
        if name == "library" and value.ndim == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        if name == "z":
            dims[name] = ["cell", "latent_dim"]
            coords["latent_dim"] = np.arange(value.shape[-1])
        else:
            dims[name] = ["cell"] + [f"{name}_dim_{i}" for i in range(value.ndim - 2)]
        posterior[name] = value[None]
    attrs = {"inference_library": "pyro_scvi", "posterior": "variational (amortised guide)", "n_samples": n_samples}

    def dataset(data, dims_, sample_dims=True):
        kwargs = {} if sample_dims else {"default_dims": []}
        return az.dict_to_dataset(data, coords=coords, dims=dims_, attrs=attrs, library=None, **kwargs)

    groups = {
        "posterior": dataset(posterior, dims),
        "log_likelihood": dataset({"x": log_lik[None]}, {"x": ["cell"]}),
        "observed_data": dataset({"x": observed}, dims, sample_dims=False),
        "constant_data": dataset({"batch": _category_names(model, "batch", batch_codes),
                                  "labels": _category_names(model, "labels", label_codes)}, dims, sample_dims=False),
    }
    if posterior_predictive:
        groups["posterior_predictive"] = dataset({"x": predictive[None]}, dims)
    return az.InferenceData(**groups)


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
    az = _arviz()
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


def calibration_coverage(observed, samples, levels: Sequence[float] = CALIBRATION_LEVELS, sample_axis: int = 0,
                         seed: int | None = 0) -> np.ndarray:
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
            "observed": observed.sum(0), "observed_sq": (observed**2).sum(0), "observed_zeros": (observed == 0).sum(0),
            "generated": samples.sum(1), "generated_sq": (samples**2).sum(1), "generated_zeros": (samples == 0).sum(1),
        }
        self.sums = sums if self.sums is None else {key: self.sums[key] + value for key, value in sums.items()}
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
    def from_arrays(cls, observed, samples, sample_axis: int = 0, cell_names=None, gene_names=None,
                    levels: Sequence[float] = CALIBRATION_LEVELS, seed: int | None = 0) -> "PosteriorPredictiveCheck":
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

        return plot_calibration(self.calibration.index.to_numpy(), self.calibration["coverage"].to_numpy(), ax=ax)


def posterior_predictive_check(model, adata=None, indices=None, n_samples: int = 25, batch_size: int | None = None,
                               levels: Sequence[float] = CALIBRATION_LEVELS, seed: int | None = 0
                               ) -> PosteriorPredictiveCheck:
    """Posterior-predictive check of a trained model on its cells (or ``indices`` of ``adata``):
    ``n_samples`` predictive count matrices are drawn minibatch by minibatch and summarised on
    the fly (memory ``n_samples × batch_size × genes``, never the whole matrix of draws).

    ``seed`` seeds the randomised PIT of the calibration; the predictive draws use Pyro's global
    RNG (``pyro_scvi.settings.seed``). Returns a :class:`PosteriorPredictiveCheck`::

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
            model_trace, _ = _predictive_traces(module.model, module.guide, batch, n_samples)
            draws, _, _ = _observation(model_trace, batch.x, n_samples)
            accumulator.add(batch.x.double().cpu().numpy(), draws.double().cpu().numpy())
    cells = np.asarray(model.cell_names(adata, indices)).astype(str)
    return accumulator.result(n_samples, cells, np.asarray(model.var_names).astype(str))
