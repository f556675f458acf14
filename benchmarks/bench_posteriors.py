"""Guide × objective frontier on CellBench (issue 15): is the posterior good enough to trust?

For each configuration ``guide:objective:K`` the script trains scVI the same way (same seed, data,
split, epochs and KL warm-up), then scores the validation cells with the same estimator:

- held-out marginal log-likelihood per cell (``get_marginal_ll``, ``--mc-samples`` draws, with each
  of ``--proposals``, default ``"defensive"``) — mean and its 95 % interval over cells;
- Pareto k̂ of those importance weights: median, and the share of cells with k̂ < 0.7;
- effective sample size of the smoothed weights (median, out of ``--mc-samples``);
- seconds per training epoch, and the ratio to the first configuration (the default);
- the latent silhouette of the cell labels (``--label-key``).

Usage::

    .venv/bin/python benchmarks/bench_posteriors.py                       # CellBench 5cl, 200 epochs
    .venv/bin/python benchmarks/bench_posteriors.py --epochs 20 --configs normal:elbo:1,normal:iwae:8

One seed: differences between configurations on one seed are quoted with the per-cell interval
only (the spread over cells, not over training seeds). Results go to ``--out`` as JSON and a
Markdown table is printed with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_cellbench import load_data  # noqa: E402
from bench_real import cpu_details, machine_line  # noqa: E402

DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "cellbench_5cl.h5ad"
DEFAULT_CONFIGS = "normal:elbo:1,normal:iwae:16,full_rank:elbo:1,full_rank:iwae:16,flow:elbo:1,flow:iwae:16"


def parse_configs(text: str) -> list[dict]:
    """``guide:objective:K,...`` → ``[{"guide", "objective", "num_particles"}, ...]``."""
    configs = []
    for item in text.split(","):
        guide, objective, particles = item.strip().split(":")
        configs.append({"guide": guide, "objective": objective, "num_particles": int(particles)})
    return configs


def dataset(a: argparse.Namespace):
    """The AnnData to train on, and a line saying which it is."""
    from pyro_scvi.data import synthetic_iid

    if Path(a.data).exists():
        adata = load_data(str(a.data), a.n_genes)
        return adata, f"{Path(a.data).name}, top {a.n_genes} genes: {adata.n_obs} cells"
    adata = synthetic_iid(batch_size=400, n_genes=a.n_genes or 2000, n_batches=2, n_labels=5, seed=a.seed)
    adata.obs[a.label_key] = adata.obs["labels"]
    return adata, f"generated (no {a.data}): {adata.n_obs} cells x {adata.n_vars} genes"


def run_config(adata, config: dict, a: argparse.Namespace) -> list[dict]:
    """Train one configuration and score its validation cells, one row per proposal."""
    from sklearn.metrics import silhouette_score

    from pyro_scvi import SCVI, settings

    settings.seed = a.seed
    kwargs = {} if config["guide"] == "normal" else {"guide": config["guide"]}
    model = SCVI(adata, **kwargs)
    plan = {"objective": config["objective"], "num_particles": config["num_particles"]}
    if a.kl_warmup is not None:
        plan["n_epochs_kl_warmup"] = a.kl_warmup
    start = time.perf_counter()
    model.train(max_epochs=a.epochs, enable_progress_bar=False, plan_kwargs=plan)
    seconds_per_epoch = (time.perf_counter() - start) / a.epochs
    cells = np.asarray(model.validation_indices)
    latent = model.get_latent_representation()
    silhouette = float(silhouette_score(latent, adata.obs[a.label_key].astype(str).to_numpy()))
    rows = []
    for proposal in a.proposals.split(","):
        settings.seed = a.seed
        scores = model.get_marginal_ll(indices=cells, n_mc_samples=a.mc_samples, return_diagnostics=True,
                                       proposal=proposal, batch_size=a.eval_batch_size)
        rows.append(dict(config, proposal=proposal, **_scores(scores), seconds_per_epoch=seconds_per_epoch,
                         silhouette=silhouette, n_validation_cells=int(len(cells))))
    return rows


def _scores(scores) -> dict:
    """Summaries of ``get_marginal_ll(return_diagnostics=True)`` over the cells."""
    ll = scores["marginal_ll"].to_numpy()
    k = scores["pareto_k"].to_numpy()
    return {
        "marginal_ll_cells": ll.tolist(),
        "marginal_ll_mean": float(ll.mean()),
        "marginal_ll_ci95": float(1.96 * ll.std(ddof=1) / np.sqrt(len(ll))),
        "pareto_k_median": float(np.median(k)),
        "share_k_below_0.7": float((k < 0.7).mean()),
        "ess_median": float(np.median(scores["ess"].to_numpy())),
    }


def table(rows: list[dict]) -> str:
    base = {r["proposal"]: r for r in reversed(rows)}  # the first configuration, per proposal
    lines = ["| guide | objective | K | proposal | marginal LL (95% CI over cells) | "
             "Δ vs first (paired CI) | median k̂ | k̂ < 0.7 | median ESS | s/epoch (ratio) | silhouette |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = base[r["proposal"]]
        lines.append(
            f"| {r['guide']} | {r['objective']} | {r['num_particles']} | {r['proposal']} | "
            f"{r['marginal_ll_mean']:.2f} ± {r['marginal_ll_ci95']:.2f} | "
            f"{_paired(r, first)} | "
            f"{r['pareto_k_median']:.2f} | {100 * r['share_k_below_0.7']:.0f} % | {r['ess_median']:.1f} | "
            f"{r['seconds_per_epoch']:.3f} ({r['seconds_per_epoch'] / first['seconds_per_epoch']:.2f}×) | "
            f"{r['silhouette']:.3f} |"
        )
    return "\n".join(lines)


def _paired(row: dict, first: dict) -> str:
    """Mean per-cell difference to the first configuration and its 95 % interval (same cells)."""
    diff = np.asarray(row["marginal_ll_cells"]) - np.asarray(first["marginal_ll_cells"])
    if row is first:
        return "—"
    return f"{diff.mean():+.2f} ± {1.96 * diff.std(ddof=1) / np.sqrt(len(diff)):.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--label-key", default="cell_line")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kl-warmup", type=int, default=None,
                        help="n_epochs_kl_warmup for every configuration (default: the package's, 400)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="guide:objective:K, comma-separated")
    parser.add_argument("--mc-samples", type=int, default=1000)
    parser.add_argument("--proposals", default="defensive", help="comma-separated: guide, defensive, refined")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(HERE / "results" / "posteriors.json"))
    a = parser.parse_args(argv)

    import torch

    from pyro_scvi import SCVI

    if a.threads:
        torch.set_num_threads(a.threads)
    adata, described = dataset(a)
    SCVI.setup_anndata(adata, batch_key="batch" if "batch" in adata.obs else None)
    machine = cpu_details()
    print(machine_line(machine))
    print(f"Data: {described}; {a.epochs} epochs, KL warm-up {a.kl_warmup or 'default'}, seed {a.seed}, "
          f"{a.mc_samples} draws, proposals {a.proposals}")
    rows = []
    for config in parse_configs(a.configs):
        for row in run_config(adata, config, a):
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "marginal_ll_cells"}), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine, "data": described, "args": vars(a), "rows": rows}
    out.write_text(json.dumps(record, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
