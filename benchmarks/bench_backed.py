"""Out-of-core benchmark: train the default ``SCVI`` on a CSR .h5ad opened with ``backed="r"``.

Steps (each in its own child process, so that the training figures do not include the writer):

1. **write** a generated ``--n-cells`` × ``--n-genes`` CSR .h5ad at ``--path``, ``--chunk-cells``
   cells at a time (the whole matrix is never in memory): h5py writes ``X/data``, ``X/indices``
   (appended chunk by chunk to resizable datasets) and ``X/indptr`` with anndata's encoding
   attributes; ``obs`` (a categorical ``batch`` with 4 batches) and ``var`` are written with
   ``anndata.io.write_elem``. Counts are Poisson–gamma (negative binomial with θ = 1): gene means
   log-normal (median 0.37, σ = 1), a log-normal cell factor (σ = 0.3) and a per-batch gene factor
   (σ = 0.2), which gives ~30 % non-zero entries and ~1,200 counts per cell.
2. **train**: ``anndata.read_h5ad(path, backed="r")``; ``SCVI.setup_anndata(adata,
   batch_key="batch")``; ``SCVI(adata)`` (defaults); ``train(max_epochs=1)`` (defaults: 90 % of
   the cells, batch size 128, no validation pass); then, unless ``--no-query``,
   ``get_latent_representation()`` of every cell.

Reported as JSON (stdout, and ``--out`` when given): seconds for setup, model creation, the epoch
and the latent pass; training cells/s (training cells / epoch seconds); the training child's peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after each phase, and the writer's. The goal
for 1,000,000 cells × 2,000 genes is a training peak RSS under 4 GB. The file is removed at the
end unless ``--keep``; ``--reuse`` trains on an existing file of the right shape instead of
writing it again.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_backed.py --n-cells 100000           # quick check
    .venv/bin/python benchmarks/bench_backed.py --n-cells 1000000 --keep   # ~4.8 GB file in /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

N_BATCHES = 4


def _rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def write_h5ad(path: str, n_cells: int, n_genes: int, chunk_cells: int = 10_000, seed: int = 0) -> dict:
    """Write the generated CSR .h5ad chunk by chunk; return its size, density and timing."""
    import anndata
    import h5py
    import numpy as np
    import pandas as pd

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    log_mean = rng.normal(np.log(0.37), 1.0, n_genes)
    batch_factor = rng.normal(0.0, 0.2, (N_BATCHES, n_genes))
    batches = rng.integers(0, N_BATCHES, n_cells)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    element_chunk = 2**16
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32,
                                chunks=(element_chunk,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                                   chunks=(element_chunk,))
        nnz = 0
        for first in range(0, n_cells, chunk_cells):
            last = min(first + chunk_cells, n_cells)
            cell_factor = np.exp(rng.normal(0.0, 0.3, (last - first, 1)))
            mean = cell_factor * np.exp(log_mean + batch_factor[batches[first:last]])
            counts = rng.poisson(rng.gamma(1.0, mean)).astype(np.float32)  # NB(mean, θ=1)
            rows, cols = np.nonzero(counts)
            values = counts[rows, cols]
            data.resize((nnz + len(values),))
            indices.resize((nnz + len(values),))
            data[nnz:] = values
            indices[nnz:] = cols.astype(np.int32)
            indptr[first + 1 : last + 1] = nnz + np.cumsum(np.bincount(rows, minlength=last - first))
            nnz += len(values)
            del counts, mean, rows, cols, values
        x.create_dataset("indptr", data=indptr)
        obs = pd.DataFrame(
            {"batch": pd.Categorical.from_codes(batches, [f"batch_{b}" for b in range(N_BATCHES)])},
            index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
        )
        var = pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(n_genes)]))
        anndata.io.write_elem(f, "obs", obs)
        anndata.io.write_elem(f, "var", var)
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            anndata.io.write_elem(f, name, {})
    return {
        "write_s": time.perf_counter() - start,
        "file_gb": os.path.getsize(path) / 1e9,
        "nnz": int(nnz),
        "density": nnz / (n_cells * n_genes),
        "writer_peak_rss_mb": _rss_mb(),
    }


# --------------------------------------------------------------------------------------------
# Training child
# --------------------------------------------------------------------------------------------


def train(path: str, threads: int, query: bool) -> dict:
    start = time.perf_counter()
    import anndata
    import numpy as np
    import torch

    from pyro_scvi import SCVI, settings

    torch.set_num_threads(threads)
    settings.seed = 0
    out: dict = {"import_s": time.perf_counter() - start, "peak_rss_mb": {"after_import": _rss_mb()}}

    adata = anndata.read_h5ad(path, backed="r")
    out["n_cells"], out["n_genes"] = adata.n_obs, adata.n_vars
    out["peak_rss_mb"]["after_open"] = _rss_mb()

    t = time.perf_counter()
    SCVI.setup_anndata(adata, batch_key="batch")
    out["setup_s"] = time.perf_counter() - t
    out["peak_rss_mb"]["after_setup"] = _rss_mb()

    t = time.perf_counter()
    model = SCVI(adata)
    out["model_init_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model.train(max_epochs=1, enable_progress_bar=False)
    out["epoch_s"] = time.perf_counter() - t
    n_train = len(model.train_indices)
    out["n_train_cells"] = n_train
    out["train_cells_per_s"] = n_train / out["epoch_s"]
    out["elbo_train"] = float(model.history["elbo_train"].values[-1, 0])
    out["peak_rss_mb"]["after_epoch"] = _rss_mb()
    out["still_backed"] = bool(adata.isbacked)
    _, data = model.registered_data()
    out["mean_counts_per_cell"] = float(np.exp(data.log_library.numpy()).mean())

    if query:
        t = time.perf_counter()
        latent = model.get_latent_representation()
        out["latent_s"] = time.perf_counter() - t
        out["latent_cells_per_s"] = latent.shape[0] / out["latent_s"]
        out["peak_rss_mb"]["after_latent"] = _rss_mb()
    out["peak_rss_mb"]["final"] = _rss_mb()
    return out


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------


def _child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"child {args[:2]} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _has_shape(path: str, n_cells: int, n_genes: int) -> bool:
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return [int(v) for v in f["X"].attrs["shape"]] == [n_cells, n_genes]
    except (OSError, KeyError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--path", default=None,
                        help="the .h5ad to write (default /tmp/bench_backed_<cells>x<genes>.h5ad)")
    parser.add_argument("--keep", action="store_true", help="keep the .h5ad afterwards")
    parser.add_argument("--reuse", action="store_true", help="train on an existing file of the right shape")
    parser.add_argument("--chunk-cells", type=int, default=10_000,
                        help="cells generated and written at a time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training child")
    parser.add_argument("--no-query", action="store_true", help="skip the get_latent_representation pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--child", choices=["write", "train"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.path or f"/tmp/bench_backed_{args.n_cells}x{args.n_genes}.h5ad"

    if args.child == "write":
        print(json.dumps(write_h5ad(path, args.n_cells, args.n_genes, args.chunk_cells, args.seed)))
        return
    if args.child == "train":
        print(json.dumps(train(path, args.threads, not args.no_query)))
        return

    common = ["--n-cells", str(args.n_cells), "--n-genes", str(args.n_genes), "--path", path]
    result: dict = {
        "benchmark": "bench_backed",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1min_at_start": os.getloadavg()[0],
        "path": path,
    }
    try:
        if args.reuse and _has_shape(path, args.n_cells, args.n_genes):
            result["write"] = "reused"
        else:
            result["write"] = _child(["--child", "write", "--chunk-cells", str(args.chunk_cells),
                                      "--seed", str(args.seed), *common])
        train_args = ["--child", "train", "--threads", str(args.threads), *common]
        result["train"] = _child(train_args + (["--no-query"] if args.no_query else []))
    finally:
        if not args.keep and os.path.exists(path):
            os.remove(path)
    result["goal_peak_rss_under_4gb"] = result["train"]["peak_rss_mb"]["final"] < 4096
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
