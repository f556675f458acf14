"""Diagnostic plots for a trained :class:`~pyro_scvi.SCVI` model (matplotlib, an optional extra).

Every function draws into ``ax`` (or a new figure when ``ax`` is ``None``) and returns the
matplotlib :class:`~matplotlib.figure.Figure`; :func:`save_figure` writes it to a file (PNG, PDF,
SVG, ... by the file's suffix)::

    from pyro_scvi import plotting
    fig = plotting.plot_training_history(model.history)
    plotting.save_figure(fig, "training.png")

* :func:`plot_training_history`: train and validation negative ELBO per epoch, KL weight on a
  second axis.
* :func:`plot_latent`: a 2-D embedding of the latent space (UMAP when ``umap-learn`` is
  installed, PCA otherwise) coloured by a column of ``obs``.
* :func:`plot_volcano`: log fold change against Bayes factor (or ``proba_de``) from a
  :meth:`~pyro_scvi.SCVI.differential_expression` table.
* :func:`plot_posterior_predictive`: observed against posterior-predictive per-gene mean and
  fraction of zeros, with 90% intervals over the predictive draws.
* :func:`plot_coefficient_of_variation`, :func:`plot_zero_fraction`, :func:`plot_calibration`:
  the panels of a :class:`pyro_scvi.diagnostics.PosteriorPredictiveCheck` (observed against
  generated CV per cell or gene and zeros per gene; coverage of the predictive intervals).

matplotlib is imported only when a function is called: ``pip install 'pyro-scvi[plot]'``.
Without a display (no ``DISPLAY``/``WAYLAND_DISPLAY`` and no ``MPLBACKEND``) the non-interactive
``Agg`` backend is selected.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "embed_latent",
    "plot_calibration",
    "plot_coefficient_of_variation",
    "plot_latent",
    "plot_posterior_predictive",
    "plot_training_history",
    "plot_volcano",
    "plot_zero_fraction",
    "posterior_predictive_summary",
    "save_figure",
    "volcano_coordinates",
]

_INSTALL_HINT = "pyro_scvi.plotting needs matplotlib: pip install 'pyro-scvi[plot]'"


def _pyplot():
    """``matplotlib.pyplot``, with the Agg backend when there is no display."""
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from error
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        headless = sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        )
        if headless:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_and_axes(ax, figsize=(6.0, 4.5)):
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    return ax.figure, ax


def save_figure(fig, path: str | Path, dpi: int = 120, close: bool = True) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, parent folders created); close it unless
    ``close=False``. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    if close:
        _pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------- training history
def _series(history: dict, key: str) -> pd.Series | None:
    frame = history.get(key)
    if frame is None:
        return None
    series = frame.iloc[:, 0] if isinstance(frame, pd.DataFrame) else pd.Series(frame)
    series = pd.to_numeric(series, errors="coerce").dropna()
    return series if len(series) else None


def plot_training_history(history, ax=None, keys: Sequence[str] = ("elbo_train", "elbo_validation"),
                          show_kl_weight: bool = True, title: str | None = "Training history"):
    """Negative ELBO per cell against epoch for each of ``keys`` present in ``history`` (train
    and validation by default) and, with ``show_kl_weight``, the KL weight on a twin y axis.

    ``history`` is ``model.history`` (``{key: one-column DataFrame indexed by epoch}``) or the
    model itself. Returns the Figure.
    """
    if hasattr(history, "history") and not isinstance(history, dict):
        history = history.history
    if not history:
        raise ValueError("No training history to plot: train the model first.")
    curves = [(key, s) for key in keys if (s := _series(history, key)) is not None]
    if not curves:
        raise ValueError(f"The history has none of {list(keys)}; it has {sorted(history)}.")
    fig, ax = _figure_and_axes(ax)
    handles = []
    for key, series in curves:
        style = (
            dict(marker="o", markersize=3)
            if len(series) < 0.5 * max(len(s) for _, s in curves) or len(series) == 1
            else {}
        )
        (line,) = ax.plot(series.index.to_numpy(), series.to_numpy(), label=key.replace("_", " "), **style)
        handles.append(line)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell")
    kl = _series(history, "kl_weight") if show_kl_weight else None
    if kl is not None:
        twin = ax.twinx()
        (line,) = twin.plot(
            kl.index.to_numpy(), kl.to_numpy(), color="0.4", linestyle="--", label="KL weight"
        )
        twin.set_ylabel("KL weight")
        twin.set_ylim(0, max(1.05, float(kl.max()) * 1.05))
        handles.append(line)
    ax.legend(handles=handles, loc="upper right")
    if title:
        ax.set_title(title)
    return fig


# ---------------------------------------------------------------------------- latent space
def _umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def embed_latent(latent, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """Two coordinates per cell from ``latent`` ``(n_cells, d)`` and the method used.

    ``method``: ``"umap"`` (needs ``umap-learn``), ``"pca"`` (NumPy SVD of the centred latent) or
    ``"auto"`` (UMAP when ``umap-learn`` is installed, PCA otherwise).
    """
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 2 or latent.shape[0] < 2:
        raise ValueError(f"latent must be (n_cells >= 2, d), got shape {latent.shape}.")
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"method must be 'auto', 'umap' or 'pca', got {method!r}.")
    if method == "auto":
        method = "umap" if _umap_available() else "pca"
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise ImportError(
                "method='umap' needs umap-learn: pip install umap-learn (or use method='pca')."
            ) from error
        n_neighbors = max(2, min(15, latent.shape[0] - 1))
        coords = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed).fit_transform(latent)
        return np.asarray(coords), "umap"
    centred = latent - latent.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    coords = u[:, :2] * s[:2]
    if coords.shape[1] < 2:  # a 1-D latent: second coordinate zero
        coords = np.column_stack([coords, np.zeros(len(coords))])
    # a deterministic sign: the largest |loading| of each component is positive
    signs = np.sign(coords[np.abs(coords).argmax(0), np.arange(2)])
    return coords * np.where(signs == 0, 1.0, signs), "pca"


def _colour_values(color, n: int) -> tuple[pd.Series, bool]:
    """``color`` ``(n,)`` as a Series (categories kept) and whether it is numeric (a colour bar)."""
    values = pd.Series(np.asarray(color) if not isinstance(color, pd.Series) else color.to_numpy())
    if len(values) != n:
        raise ValueError(f"color has {len(values)} values for {n} cells.")
    if isinstance(color, pd.Series) and isinstance(color.dtype, pd.CategoricalDtype):
        values = pd.Series(pd.Categorical(color.to_numpy(), categories=color.cat.categories))
    categorical = isinstance(values.dtype, pd.CategoricalDtype)
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    return values, numeric and not categorical


def _scatter_categories(ax, coords: np.ndarray, values: pd.Series, size: float, color_name,
                        max_legend: int) -> None:
    """One scatter collection (colour and legend entry) per category of ``values``."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        categories = values.cat.categories
    else:
        categories = pd.unique(values.astype(str))
    labels = values.astype(str).to_numpy()
    cmap = _pyplot().get_cmap("tab20" if len(categories) > 10 else "tab10")
    for i, category in enumerate(categories):
        mask = labels == str(category)
        if mask.any():
            ax.scatter(coords[mask, 0], coords[mask, 1], s=size, linewidths=0, color=cmap(i % cmap.N),
                       label=str(category))
    if len(categories) <= max_legend:
        ax.legend(title=color_name, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  markerscale=max(1.0, 6.0 / np.sqrt(size)), frameon=False)


def plot_latent(latent, color=None, method: str = "auto", ax=None, color_name: str | None = None,
                point_size: float | None = None, title: str | None = None, seed: int = 0,
                max_legend: int = 30):
    """Scatter plot of a 2-D embedding of ``latent`` (see :func:`embed_latent`), one point per cell.

    ``color``: values per cell (an ``obs`` column): categorical or text values get one colour and
    legend entry per category (one scatter collection each), numbers a colour bar. The title says
    which embedding was used. Returns the Figure.
    """
    coords, used = embed_latent(latent, method, seed)
    n = coords.shape[0]
    fig, ax = _figure_and_axes(ax, figsize=(6.5, 5.0))
    size = point_size if point_size is not None else float(np.clip(3000.0 / n, 1.0, 30.0))
    if color_name is None and isinstance(color, pd.Series):
        color_name = None if color.name is None else str(color.name)
    if color is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, linewidths=0)
    else:
        values, numeric = _colour_values(color, n)
        if numeric:
            points = ax.scatter(coords[:, 0], coords[:, 1], c=values.to_numpy(dtype=float), s=size,
                                linewidths=0, cmap="viridis")
            fig.colorbar(points, ax=ax, label=color_name or "")
        else:
            _scatter_categories(ax, coords, values, size, color_name, max_legend)
    name = "UMAP" if used == "umap" else "PCA"
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is None:
        title = f"{name} of the scVI latent space" + (f", coloured by {color_name}" if color_name else "")
        if used == "pca" and method == "auto":
            title += "\n(PCA: umap-learn is not installed)"
    ax.set_title(title)
    return fig


# ---------------------------------------------------------------------------- differential expression
def volcano_coordinates(
    de_table: pd.DataFrame, x: str | None = None, y: str | None = None
) -> tuple[pd.Series, pd.Series, str, str]:
    """The (x, y) values of a volcano plot of ``de_table`` and their axis labels.

    x: ``lfc_mean`` (change mode) or else ``log2(scale1 / scale2)`` (vanilla mode). y:
    ``bayes_factor`` (its absolute value in vanilla mode, where its sign is the direction) or
    else ``proba_de``.
    """
    table = de_table
    if x is None:
        x = "lfc_mean" if "lfc_mean" in table else None
    if x is None:
        if not {"scale1", "scale2"} <= set(table.columns):
            raise ValueError("The DE table has neither lfc_mean nor scale1/scale2 for the x axis.")
        tiny = 1e-12
        xs = np.log2((table["scale1"].astype(float) + tiny) / (table["scale2"].astype(float) + tiny))
        x_label = "log2(scale1 / scale2)"
    else:
        if x not in table:
            raise KeyError(f"Column {x!r} is not in the DE table (columns: {list(table.columns)}).")
        xs = table[x].astype(float)
        x_label = "mean log fold change" if x == "lfc_mean" else x
    if y is None:
        y = "bayes_factor" if "bayes_factor" in table else "proba_de"
    if y not in table:
        raise KeyError(f"Column {y!r} is not in the DE table (columns: {list(table.columns)}).")
    ys = table[y].astype(float)
    y_label = "log Bayes factor" if y == "bayes_factor" else y
    if y == "bayes_factor" and "lfc_mean" not in table:  # vanilla: signed log(p(m1)/p(m2))
        ys = ys.abs()
        y_label = "|log Bayes factor|"
    return xs, ys, x_label, y_label


def plot_volcano(de_table: pd.DataFrame, x: str | None = None, y: str | None = None, ax=None,
                 comparison: str | None = None, threshold: float | None = None, top_n: int = 10,
                 point_size: float = 8.0, title: str | None = None):
    """Volcano plot of a :meth:`~pyro_scvi.SCVI.differential_expression` table (see
    :func:`volcano_coordinates` for the axes). Genes above ``threshold`` (default: log Bayes
    factor 3, or ``proba_de`` 0.9) are highlighted, the ``top_n`` highest labelled.

    A table with several comparisons (``groupby`` without a single ``group1``) gives one colour
    per comparison; ``comparison`` selects one. Returns the Figure.
    """
    if not isinstance(de_table, pd.DataFrame) or de_table.empty:
        raise ValueError("plot_volcano needs a non-empty DataFrame from differential_expression.")
    table = de_table
    if comparison is not None:
        if "comparison" not in table or comparison not in set(table["comparison"]):
            raise ValueError(f"No comparison {comparison!r} in the DE table.")
        table = table[table["comparison"] == comparison]
    xs, ys, x_label, y_label = volcano_coordinates(table, x, y)
    if threshold is None:
        threshold = 0.9 if y_label == "proba_de" or (y is not None and y.startswith("proba")) else 3.0
    fig, ax = _figure_and_axes(ax)
    groups = (
        table["comparison"].astype(str)
        if "comparison" in table and table["comparison"].nunique() > 1
        else None
    )
    if groups is None:
        significant = (ys >= threshold).to_numpy()
        ax.scatter(
            xs[~significant], ys[~significant], s=point_size, color="0.6", linewidths=0, label="not DE"
        )
        ax.scatter(xs[significant], ys[significant], s=point_size, color="tab:red", linewidths=0,
                   label=f"{y_label} ≥ {threshold:g}")
    else:
        for name in pd.unique(groups):
            mask = (groups == name).to_numpy()
            ax.scatter(xs[mask], ys[mask], s=point_size, linewidths=0, alpha=0.7, label=name)
    ax.axhline(threshold, color="0.3", linestyle=":", linewidth=1)
    ax.axvline(0.0, color="0.3", linestyle=":", linewidth=1)
    if top_n:
        order = np.argsort(-ys.to_numpy(), kind="stable")[:top_n]
        for i in order:
            ax.annotate(
                str(table.index[i]),
                (xs.iloc[i], ys.iloc[i]),
                fontsize=7,
                xytext=(2, 2),
                textcoords="offset points",
            )
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.legend(loc="best", fontsize=8)
    if title is None:
        names = pd.unique(table["comparison"].astype(str)) if "comparison" in table else []
        title = f"Differential expression: {names[0]}" if len(names) == 1 else "Differential expression"
    ax.set_title(title)
    return fig


# ---------------------------------------------------------------------------- posterior predictive checks
def _dense(array) -> np.ndarray:
    if hasattr(array, "todense") and not isinstance(array, np.ndarray):
        array = array.todense()
    if hasattr(array, "toarray") and not isinstance(array, np.ndarray):
        array = array.toarray()
    return np.asarray(array, dtype=np.float64)


def posterior_predictive_summary(observed, samples) -> dict[str, np.ndarray]:
    """Per-gene mean and fraction of zeros of the observed counts ``(cells, genes)`` and of each
    posterior-predictive draw ``(cells, genes, S)`` (NumPy, SciPy sparse or ``sparse.GCXS``).

    Returns ``observed_mean``, ``observed_zeros`` ``(genes,)`` and ``predicted_mean``,
    ``predicted_zeros`` ``(genes, S)``.
    """
    observed = _dense(observed)
    samples = _dense(samples)
    if samples.ndim == 2:
        samples = samples[..., None]
    if observed.ndim != 2 or samples.shape[:2] != observed.shape:
        raise ValueError(
            f"observed {observed.shape} and samples {samples.shape} must be (cells, genes) "
            "and (cells, genes, S)."
        )
    return {
        "observed_mean": observed.mean(0),
        "observed_zeros": (observed == 0).mean(0),
        "predicted_mean": samples.mean(0),
        "predicted_zeros": (samples == 0).mean(0),
    }


def plot_posterior_predictive(observed, samples, ax=None, interval: float = 0.9, title: str | None = None):
    """Posterior predictive check: per gene, the observed mean count and fraction of zero counts
    (x) against the same statistics of the predictive draws (y: median over the ``S`` draws with
    a ``interval`` band), on two panels with the identity line.

    ``observed``: counts ``(cells, genes)``; ``samples``: ``model.posterior_predictive_sample(
    adata, n_samples=S)`` ``(cells, genes, S)``. ``ax``: two axes, or ``None`` for a new figure.
    Returns the Figure.
    """
    stats = posterior_predictive_summary(observed, samples)
    if ax is None:
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.5), layout="constrained")
    else:
        axes = list(np.ravel(ax))
        if len(axes) != 2:
            raise ValueError("plot_posterior_predictive draws two panels: pass ax as a pair of axes.")
        fig = axes[0].figure
    lo_q, hi_q = (1 - interval) / 2, 1 - (1 - interval) / 2
    panels = [
        ("observed_mean", "predicted_mean", "mean count per gene", True),
        ("observed_zeros", "predicted_zeros", "fraction of zeros per gene", False),
    ]
    for axis, (obs_key, pred_key, label, log) in zip(axes, panels):
        x = stats[obs_key]
        draws = stats[pred_key]
        mid = np.median(draws, axis=1)
        lo, hi = np.quantile(draws, lo_q, axis=1), np.quantile(draws, hi_q, axis=1)
        axis.errorbar(x, mid, yerr=np.vstack([mid - lo, hi - mid]), fmt="o", markersize=3, elinewidth=0.8,
                      alpha=0.7, label=f"median, {interval:.0%} interval")
        if log:
            positive = np.concatenate([x[x > 0], lo[lo > 0], hi[hi > 0]])
            bounds = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
            axis.set_xscale("symlog", linthresh=max(bounds[0], 1e-3))
            axis.set_yscale("symlog", linthresh=max(bounds[0], 1e-3))
        else:
            bounds = (0.0, 1.0)
        axis.plot(bounds, bounds, color="0.3", linestyle="--", linewidth=1, label="y = x")
        axis.set_xlabel(f"observed {label}")
        axis.set_ylabel(f"predicted {label}")
        axis.legend(loc="upper left", fontsize=8)
    fig.suptitle(
        title or f"Posterior predictive check ({np.asarray(stats['predicted_mean']).shape[1]} draws)"
    )
    return fig


# -------------------------------------------------------------- criticism panels (PosteriorPredictiveCheck)
def _pearson_and_mae(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson correlation (NaN for fewer than two points or constant input) and mean absolute
    error of two finite vectors ``(n,)``."""
    from scipy import stats

    mae = float(np.abs(x - y).mean()) if x.size else np.nan
    if x.size < 2:
        return np.nan, mae
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input → NaN correlation
        return float(stats.pearsonr(x, y)[0]), mae


def _observed_vs_generated(observed, generated, ax, label: str, log: bool, title: str | None):
    """Scatter of one statistic, observed (x) against generated (y), with y = x and the agreement
    (Pearson r, mean absolute error; the values of :func:`pyro_scvi.diagnostics.agreement`) in
    the legend."""
    fig, ax = _figure_and_axes(ax, figsize=(4.8, 4.5))
    x, y = np.asarray(observed, dtype=float), np.asarray(generated, dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    if log:
        finite &= (x > 0) & (y > 0)
    x, y = x[finite], y[finite]
    pearson, mae = _pearson_and_mae(x, y)
    ax.scatter(x, y, s=6, alpha=0.5, linewidths=0,
               label=f"Pearson r = {pearson:.3f}, MAE = {mae:.3g} (n = {x.size})")
    both = np.concatenate([x, y])
    bounds = (both.min(), both.max()) if both.size else ((1e-2, 1.0) if log else (0.0, 1.0))
    ax.plot(bounds, bounds, color="0.3", linestyle="--", linewidth=1, label="y = x")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"observed {label}")
    ax.set_ylabel(f"generated {label}")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"Posterior predictive check: {label}")
    return fig


def plot_coefficient_of_variation(observed, generated, kind: str = "cell", ax=None, title: str | None = None):
    """Observed against generated coefficient of variation, one point per cell (``kind="cell"``,
    CV over genes) or per gene (``kind="gene"``, CV over cells), log axes; NaN entries (zero
    mean) are left out. Returns the Figure."""
    return _observed_vs_generated(observed, generated, ax, f"CV per {kind}", log=True, title=title)


def plot_zero_fraction(observed, generated, ax=None, title: str | None = None):
    """Observed against generated fraction of zero counts, one point per gene. Returns the Figure."""
    return _observed_vs_generated(
        observed, generated, ax, "fraction of zeros per gene", log=False, title=title
    )


def plot_calibration(levels, coverage, ax=None, title: str | None = None):
    """Coverage of the central posterior-predictive intervals against their nominal level, with
    the diagonal of a calibrated model and the calibration error (mean squared gap) in the
    legend. Returns the Figure."""
    fig, ax = _figure_and_axes(ax, figsize=(4.8, 4.5))
    levels, coverage = np.asarray(levels, dtype=float), np.asarray(coverage, dtype=float)
    error = float(np.mean((coverage - levels) ** 2))
    ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="calibrated")
    ax.plot(levels, coverage, marker="o", label=f"model (calibration error {error:.2g})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal level of the central interval")
    ax.set_ylabel("fraction of observed counts inside")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "Posterior predictive calibration")
    return fig
