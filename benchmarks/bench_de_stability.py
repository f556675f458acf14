"""Is importance-weighted differential expression stable across seeds? (issue 15)

Trains the default scVI once (CellBench 5cl, top 2000 genes, 200 epochs, seed 0), then runs
``differential_expression(groupby="cell_line", group1=GROUP)`` once per DE seed for each weighting:

* ``uniform``: ``weights="uniform"`` (the Monte-Carlo noise alone);
* ``importance``: ``weights="importance"`` with ``importance_weighting_kwargs={"proposal": "guide"}``,
  draws from the guide (scvi-tools' weighting);
* ``refined``: ``weights="importance"`` with ``{"proposal": "refined"}``, the package's default.

For each run it takes the top ``--n-top`` genes by Bayes factor (ties broken by |log2 fold change|)
and scores their *marker precision*: the share that is also in the top ``--n-top`` of a Welch t-test
of the group against the rest on log1p counts per 10,000 (a reference that does not use the model).
It prints, per weighting, the precision of each seed with its mean and 95 % interval over seeds,
the mean and smallest Jaccard overlap of the top sets between seeds, and how many runs warned that
the importance weights had k̂ > 0.7. Usage::

    .venv/bin/python benchmarks/bench_de_stability.py --seeds 0,1,2 --group H1975
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_cellbench import load_data  # noqa: E402
from bench_real import cpu_details, machine_line  # noqa: E402

DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cellbench_5cl.h5ad"
WEIGHTINGS = {
    "uniform": {"weights": "uniform"},
    "importance": {"weights": "importance", "importance_weighting_kwargs": {"proposal": "guide"}},
    "refined": {"weights": "importance", "importance_weighting_kwargs": {"proposal": "refined"}},
}


def dataset(a: argparse.Namespace):
    """``(adata, description)``: CellBench when present, else generated data with 5 labels."""
    from pyro_scvi.data import synthetic_iid

    if Path(a.data).exists():
        adata = load_data(str(a.data), a.n_genes)
        return adata, f"{Path(a.data).name}, top {a.n_genes} genes: {adata.n_obs} cells"
    adata = synthetic_iid(batch_size=300, n_genes=a.n_genes or 2000, n_batches=3, n_labels=5, seed=0)
    adata.obs["cell_line"] = adata.obs["labels"].astype(str)
    return adata, f"generated (no {a.data}): {adata.n_obs} cells x {adata.n_vars} genes"


def reference_markers(adata, group: str, n_top: int) -> set:
    """The ``n_top`` genes most up in ``group`` by a Welch t-test on log1p counts per 10,000."""
    import scipy.sparse as sp
    from scipy import stats

    counts = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    logged = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    inside = (adata.obs["cell_line"].astype(str) == group).to_numpy()
    t = stats.ttest_ind(logged[inside], logged[~inside], equal_var=False).statistic
    return set(adata.var_names[np.argsort(-np.nan_to_num(t, nan=-np.inf))[:n_top]])


def top_by_bayes_factor(de, n_top: int) -> set:
    log_ratio = np.abs(np.log2(de["scale1"] / de["scale2"])).to_numpy()
    order = np.lexsort((-log_ratio, -de["bayes_factor"].to_numpy()))
    return set(de.index[order[:n_top]])


def mean_ci(values) -> str:
    """Mean ± half-width of the 95 % t interval over seeds."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    n = len(values)
    half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    return f"{values.mean():.3f} ± {half:.3f}"


def run(model, group: str, weighting: str, seeds: list[int], a: argparse.Namespace, reference: set) -> dict:
    from pyro_scvi import settings

    tops, precision, warned, seconds = [], [], 0, []
    for seed in seeds:
        settings.seed = seed
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            de = model.differential_expression(groupby="cell_line", group1=group, n_samples_overall=a.samples,
                                               silent=True, **WEIGHTINGS[weighting])
        seconds.append(time.perf_counter() - start)
        warned += any("Pareto k" in str(w.message) for w in caught)
        tops.append(top_by_bayes_factor(de, a.n_top))
        precision.append(len(tops[-1] & reference) / a.n_top)
    jaccard = [len(x & y) / len(x | y) for x, y in itertools.combinations(tops, 2)]
    return {"precision": precision, "jaccard_mean": float(np.mean(jaccard)) if jaccard else float("nan"),
            "jaccard_min": float(np.min(jaccard)) if jaccard else float("nan"), "warned": warned,
            "seconds": float(np.mean(seconds))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--group", default="H1975", help="the cell_line compared with the rest")
    parser.add_argument("--seeds", default="0,1,2", help="DE seeds, comma-separated")
    parser.add_argument("--weightings", default="uniform,importance,refined")
    parser.add_argument("--samples", type=int, default=1000, help="n_samples_overall per group")
    parser.add_argument("--n-top", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from pyro_scvi import SCVI, settings

    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_line(cpu_details()))
    adata, described = dataset(a)
    SCVI.setup_anndata(adata, batch_key="batch")
    lines = set(adata.obs["cell_line"].astype(str))
    group = a.group if a.group in lines else sorted(lines)[0]
    seeds = [int(s) for s in a.seeds.split(",")]
    print(f"Data: {described}; {a.epochs} epochs (seed 0); {group} vs rest, {a.samples} draws per group, "
          f"top {a.n_top} genes, DE seeds {seeds}", flush=True)
    settings.seed = 0
    model = SCVI(adata)
    model.train(max_epochs=a.epochs, enable_progress_bar=False)
    reference = reference_markers(adata, group, a.n_top)
    print("| weights | marker precision per seed | mean ± 95 % CI | mean Jaccard | min Jaccard | "
          "runs warning k̂ > 0.7 | s per DE |")
    print("|---|---|---|---|---|---|---|")
    for weighting in a.weightings.split(","):
        r = run(model, group, weighting, seeds, a, reference)
        print(f"| {weighting} | {' '.join(f'{p:.2f}' for p in r['precision'])} | {mean_ci(r['precision'])} | "
              f"{r['jaccard_mean']:.2f} | {r['jaccard_min']:.2f} | {r['warned']}/{len(seeds)} | "
              f"{r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
