"""How good are the marginal likelihood's proposals on a trained default scVI? (issue 15)

Trains the default model once (CellBench 5cl, top 2000 genes, 200 epochs, seed 0) and scores its
validation cells with ``get_marginal_ll(return_diagnostics=True)`` under each proposal variant:
the defensive mixture, and the refined proposal with a diagonal or full covariance, several step
counts, learning rates, draws per step and widenings. Prints the mean log p(x), the median Pareto
k̂, the share of cells with k̂ below 0.7 and 0.5, the median ESS and the time. Usage::

    .venv/bin/python benchmarks/bench_refined_proposal.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_posteriors import DEFAULT_DATA, dataset  # noqa: E402
from bench_real import cpu_details, machine_line  # noqa: E402

#: name → get_marginal_ll options
VARIANTS = {
    "defensive": {"proposal": "defensive"},
    "refined, diagonal, 20 steps, rate 0.1, 8 draws": {
        "proposal": "refined", "refine_covariance": "diagonal", "refine_steps": 20, "refine_lr": 0.1,
        "refine_particles": 8},
    "refined, full, 20 steps, rate 0.1, 8 draws": {
        "proposal": "refined", "refine_steps": 20, "refine_lr": 0.1, "refine_particles": 8},
    "refined, diagonal (defaults otherwise)": {"proposal": "refined", "refine_covariance": "diagonal"},
    "refined, full, widening 1.0": {"proposal": "refined", "refine_widening": 1.0},
    "refined, full, Student-t ν = 5": {"proposal": "refined", "refine_df": 5.0},
    "refined (the defaults: full, 50 steps, rate 0.05, 16 draws)": {"proposal": "refined"},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mc-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = parser.parse_args(argv)
    a.label_key = "cell_line"
    warnings.filterwarnings("ignore")
    import torch

    from pyro_scvi import SCVI, settings

    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_line(cpu_details()))
    adata, described = dataset(a)
    SCVI.setup_anndata(adata, batch_key="batch")
    settings.seed = a.seed
    model = SCVI(adata)
    model.train(max_epochs=a.epochs, enable_progress_bar=False)
    cells = np.asarray(model.validation_indices)
    print(f"Data: {described}; {a.epochs} epochs, seed {a.seed}; {len(cells)} validation cells, "
          f"{a.mc_samples} draws each")
    print("| proposal | log p(x) | median k̂ | k̂ < 0.7 | k̂ < 0.5 | median ESS | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, options in VARIANTS.items():
        settings.seed = a.seed
        start = time.perf_counter()
        table = model.get_marginal_ll(indices=cells, n_mc_samples=a.mc_samples, return_diagnostics=True,
                                      **options)
        k = table["pareto_k"].to_numpy()
        seconds = time.perf_counter() - start
        print(f"| {name} | {table['marginal_ll'].mean():.2f} | {np.median(k):.2f} | "
              f"{100 * (k < 0.7).mean():.0f} % | {100 * (k < 0.5).mean():.0f} % | "
              f"{table['ess'].median():.0f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
