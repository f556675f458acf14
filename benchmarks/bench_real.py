"""Quality benchmark on real data, over many seeds: pyro-scvi vs scvi-tools, trained as a user does.

For each data set a fixed test split (20% of the cells, the same for both packages and all seeds)
is removed from the training AnnData. For each seed, each package then runs plain scVI with its
defaults::

    settings.seed = s                                   # pyro_scvi.settings / scvi.settings
    SCVI.setup_anndata(adata_train, batch_key="batch")  # labels not registered
    m = SCVI(adata_train)
    m.train(max_epochs=E, enable_progress_bar=False)    # default 90/10 train/validation split

and is scored by

* the per-cell marginal log-likelihood of the held-out test cells,
  ``m.get_marginal_ll(adata_test, n_mc_samples=--mc, return_mean=False)`` (``adata_test`` is a new
  AnnData with the same genes; both packages transfer the model's setup to it);
* scib-metrics (``Benchmarker``, run with the scvi-tools venv's Python) on the latent means
  ``m.get_latent_representation(adata_all)`` of all cells, train and test.

The unit of the statistics is the seed: per seed the paired difference of the mean test marginal
LL (ours − theirs, nats per cell) and of the scib total; mean over seeds with a 95% t-interval.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_real.py                     # 6 data sets x 10 seeds x 2 sides
    .venv/bin/python benchmarks/bench_real.py --datasets kang_ifnb_pbmc --seeds 0-1 --epochs 3 --mc 10
    .venv/bin/python benchmarks/bench_real.py --summarize         # tables from the results so far

Every finished (data set, seed, side) leaves its own files under ``--out``; a rerun skips them, so
a killed run resumes where it stopped. The same file is the child-process runner
(``--worker pyro|scvi|scib``); the children use only the public APIs of the packages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the helpers shared with bench_cellbench.py (stdlib-only at import)
from bench_cellbench import (  # noqa: E402
    DEFAULT_SCVI_PYTHON,
    REPO,
    SIDES,
    _rss_mb,
    load_data,
    machine_info,
    scvi_available,
    write_generated,
)

DATA_DIR = REPO.parent / "shared" / "data"
DEFAULT_OUT = HERE / "results" / "real"
#: data set -> labels key (None: no labels, batch-correction metrics only). Batch key: "batch".
DATASETS = {
    "cellbench_3cl": "cell_line",
    "cellbench_5cl": "cell_line",
    "baron_pancreas_human": "cell_type",
    "baron_pancreas_mouse": "cell_type",
    "kang_ifnb_pbmc": "cell_type",
    "pbmc_10x_3chem": None,
}
GENERATED = "generated"  # fallback when the real data are absent (bench_cellbench.write_generated)
GENERATED_CELLS = 2000
BATCH_KEY = "batch"
ONE_LABEL = "_one_label"  # constant label column for the label-aware batch metrics on unlabelled data
#: the settings that determine the results: a rerun into the same --out must use the same ones
CONFIG_KEYS = ("epochs", "mc", "n_genes", "test_fraction", "split_seed", "kbet")
#: goals: the upper end of the 95% interval of (ours - theirs) must reach these ("not worse")
GOAL_MLL = -1.0    # nats per cell
GOAL_SCIB = -0.01  # scib total


# ---------------------------------------------------------------------------------- small helpers
def parse_seeds(text: str) -> list[int]:
    """``"0-9"`` -> 0..9, ``"0,3,5"`` -> [0, 3, 5]; ranges and lists mix (``"0-2,7"``)."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return sorted(set(seeds))


def write_json(path: Path, obj) -> None:
    """Write atomically (temporary file, then rename): a file that exists is complete."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def seed_dir(out: Path, dataset: str, seed: int) -> Path:
    return out / dataset / f"seed{seed}"


def cpu_details() -> dict:
    """CPU model and count (bench_cellbench.machine_info), its SIMD flags and the C compiler.

    The compiler matters because pyro-scvi's fused NB/ZINB kernel is built with it for this CPU.
    """
    info = machine_info()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
        wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile")
        flags = [w for w in wanted if w in line.split()]
    except OSError:
        pass
    cc = os.environ.get("CC", "cc")
    compiler = "none found"
    if shutil.which(cc):
        r = subprocess.run([cc, "--version"], capture_output=True, text=True)
        compiler = (r.stdout.splitlines() or ["?"])[0]
    return dict(info, simd_flags=flags, compiler=compiler)


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, "
            f"SIMD {' '.join(m['simd_flags']) or '?'}; "
            f"compiler {m['compiler']}; {m['platform']}.")


def child_env() -> dict:
    """One thread per child for every numerical library (torch, BLAS, OpenMP, numba, XLA)."""
    one = "1"
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=one, MKL_NUM_THREADS=one,
                OPENBLAS_NUM_THREADS=one, NUMBA_NUM_THREADS=one, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


# ------------------------------------------------------------------------------------ data split
def prepare_split(out: Path, dataset: str, h5ad: Path, a: argparse.Namespace) -> dict:
    """Gene selection and test split of one data set, computed once and stored as ``split.json``.

    Genes: the top ``--n-genes`` by variance of log1p counts (bench_cellbench.load_data, the
    selection of /work/shared/tools/peer_scvi_tools.py; a data set with fewer genes keeps all).
    Test cells: ``round(test_fraction * n)`` cells drawn without replacement by
    ``np.random.default_rng(split_seed)``. Every child reads this file, so both packages and all
    seeds see exactly the same genes and cells.
    """
    import numpy as np

    path = out / dataset / "split.json"
    if path.exists():
        return json.loads(path.read_text())
    adata = load_data(str(h5ad), a.n_genes)
    if not adata.var_names.is_unique:
        raise SystemExit(f"{dataset}: gene names are not unique; cannot select genes by name")
    n = adata.n_obs
    rng = np.random.default_rng(a.split_seed)
    test = np.sort(rng.choice(n, size=int(round(a.test_fraction * n)), replace=False))
    train_batches = set(adata.obs[BATCH_KEY].iloc[np.setdiff1d(np.arange(n), test)])
    missing = set(adata.obs[BATCH_KEY].iloc[test]) - train_batches
    if missing:  # the model could not encode these test cells' batch
        raise SystemExit(f"{dataset}: batches {sorted(missing)} only occur in the test cells")
    split = {
        "dataset": dataset, "h5ad": str(h5ad), "labels_key": DATASETS.get(dataset, "cell_line"),
        "n_cells": n, "n_genes": adata.n_vars, "n_batches": int(adata.obs[BATCH_KEY].nunique()),
        "split_seed": a.split_seed, "test_fraction": a.test_fraction, "n_test": len(test),
        "genes": list(map(str, adata.var_names)), "test_idx": test.tolist(),
        "test_sha1": hashlib.sha1(test.astype(np.int64).tobytes()).hexdigest(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, split)
    return split


def read_split_data(split: dict):
    """(all cells, train cells, test cells) as AnnData, genes as selected, cells in file order."""
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(split["h5ad"])[:, split["genes"]].copy()
    test = np.asarray(split["test_idx"])
    train = np.setdiff1d(np.arange(adata.n_obs), test)
    return adata, adata[train].copy(), adata[test].copy()


# --------------------------------------------------------------------------- worker: train a side
def train_worker(a: argparse.Namespace) -> None:
    """One package, one seed: train on the training cells, score the test cells, embed all cells."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    if a.worker == "pyro":
        sys.path.insert(0, str(REPO))
        import pyro

        import pyro_scvi
        from pyro_scvi import SCVI, settings
        from pyro_scvi.distributions import fused

        settings.seed = a.seed
        versions = {"pyro_scvi": pyro_scvi.__version__, "pyro": pyro.__version__}
        extra = {"fused_kernel": fused.available()}
    else:
        import scvi
        from scvi.model import SCVI

        scvi.settings.seed = a.seed
        versions = {"scvi_tools": scvi.__version__}
        extra = {}
    versions.update(torch=torch.__version__, numpy=np.__version__, python=platform.python_version())
    import_s = time.perf_counter() - t_start

    split = json.loads(Path(a.split).read_text())
    adata, adata_train, adata_test = read_split_data(split)
    SCVI.setup_anndata(adata_train, batch_key=BATCH_KEY)
    m = SCVI(adata_train)
    t0 = time.perf_counter()
    m.train(max_epochs=a.epochs, enable_progress_bar=False)
    train_s = time.perf_counter() - t0

    # adata_test / adata were never set up: both packages transfer the model's setup (same batch
    # categories and codes) when given a new AnnData with the same genes.
    t0 = time.perf_counter()
    mll = m.get_marginal_ll(adata_test, n_mc_samples=a.mc, return_mean=False)
    mll_s = time.perf_counter() - t0
    mll = torch.as_tensor(mll).detach().cpu().double().numpy()
    if mll.shape != (adata_test.n_obs,):
        raise RuntimeError(f"get_marginal_ll(return_mean=False) gave shape {mll.shape}, "
                           f"expected ({adata_test.n_obs},)")
    t0 = time.perf_counter()
    z = np.asarray(m.get_latent_representation(adata), dtype=np.float32)
    latent_s = time.perf_counter() - t0

    d = Path(a.result_dir)
    np.save(d / f"{a.worker}_test_mll.npy", mll)
    np.save(d / f"{a.worker}_latent.npy", z)
    history = {k: float(v.iloc[-1, 0]) for k, v in (m.history or {}).items() if len(v)}
    res = {
        "side": SIDES[a.worker], "dataset": split["dataset"], "seed": a.seed, "epochs": a.epochs,
        "mc": a.mc, "versions": versions, **extra, "threads": torch.get_num_threads(),
        "n_train": adata_train.n_obs, "n_train_fit": len(m.train_indices),
        "n_validation": len(m.validation_indices), "n_test": adata_test.n_obs,
        "n_genes": adata.n_vars, "test_sha1": split["test_sha1"],
        "import_s": import_s, "train_s": train_s, "s_per_epoch": train_s / a.epochs,
        "marginal_ll_s": mll_s, "latent_s": latent_s,
        "test_marginal_ll_mean": float(mll.mean()), "latent_shape": list(z.shape),
        "history_last": history, "peak_rss_self_mb": _rss_mb("VmHWM"),
        "machine": {k: v for k, v in cpu_details().items() if k != "date_utc"},
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(d / f"{a.worker}.partial.json", res)  # the parent adds its figures and renames it


# ------------------------------------------------------------------------ worker: scib-metrics
def scib_worker(a: argparse.Namespace) -> None:
    """scib-metrics of every latent of one data set that has none yet (all requested seeds, both
    sides), in one process: JAX compiles each metric once per data set, not once per latent.

    Metrics: ``Benchmarker`` with the default ``BioConservation()`` (isolated labels, KMeans
    NMI/ARI, silhouette label, cLISI; Leiden off) and ``BatchCorrection()`` without kBET unless
    ``--kbet`` (BRAS, iLISI, graph connectivity, PCR comparison); raw (not min-max scaled)
    scores, so each latent is scored on its own. Neighbours: exact k-NN (scikit-learn) instead
    of pynndescent. Pre-integration embedding (for PCR comparison): 50 PCs of log1p of counts
    normalised to 10⁴ per cell, all selected genes, computed once per data set. Without labels
    (pbmc_10x_3chem) there are no bio metrics; BRAS and graph connectivity then see one
    constant label (they become global batch-mixing scores) and the total is the batch score.
    """
    import gc

    import jax
    import numpy as np
    import scanpy as sc
    import scib_metrics
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    def exact_knn(x: np.ndarray, k: int) -> NeighborsResults:
        distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
        return NeighborsResults(indices=indices, distances=distances)

    split = json.loads(Path(a.split).read_text())
    t0 = time.perf_counter()
    adata, _, _ = read_split_data(split)
    label_key = split["labels_key"]
    if label_key is None:
        adata.obs[ONE_LABEL] = "all"
        label_key = ONE_LABEL
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.tl.pca(adata, n_comps=50, svd_solver="arpack")
    setup_s = time.perf_counter() - t0
    bio = BioConservation() if split["labels_key"] else None
    batch = BatchCorrection(kbet_per_label=a.kbet)

    out = Path(a.out)
    for seed in parse_seeds(a.seeds):
        d = seed_dir(out, split["dataset"], seed)
        for side in SIDES:
            done = d / f"{side}_scib.json"
            if not (d / f"{side}.json").exists() or done.exists():
                continue
            t0 = time.perf_counter()
            adata.obsm["latent"] = np.load(d / f"{side}_latent.npy")
            # Benchmarker calls gc.collect() before every metric; with JAX, scanpy and the data
            # loaded that is ~0.2 s each. Freezing the objects alive now exempts them (~2.5 s less
            # per latent); what the metrics allocate is still collected.
            gc.freeze()
            bm = Benchmarker(adata, batch_key=BATCH_KEY, label_key=label_key, embedding_obsm_keys=["latent"],
                             bio_conservation_metrics=bio, batch_correction_metrics=batch,
                             pre_integrated_embedding_obsm_key="X_pca", n_jobs=1, progress_bar=False)
            bm.prepare(neighbor_computer=exact_knn)
            bm.benchmark()
            row = bm.get_results(min_max_scale=False, clean_names=False).loc["latent"]
            scores = {k: float(v) for k, v in row.items()}
            total = scores.get("Total", scores["Batch correction"])  # no labels: the batch score
            write_json(done, {
                "side": SIDES[side], "dataset": split["dataset"], "seed": seed,
                "bio": scores.get("Bio conservation"), "batch": scores["Batch correction"], "total": total,
                "metrics": {k: v for k, v in scores.items()
                            if k not in ("Bio conservation", "Batch correction", "Total")},
                "labels": split["labels_key"], "kbet": a.kbet, "scib_metrics": scib_metrics.__version__,
                "jax": jax.__version__,
                "seconds": time.perf_counter() - t0, "setup_s": setup_s,
            })
            print(f"{split['dataset']} seed {seed} {SIDES[side]}: total {total:.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)


# ------------------------------------------------------------------------- parent: process pool
@dataclass
class Task:
    """One child process. ``ready`` gates the start (dependencies), ``needed`` is checked again at
    the start (work may have been done meanwhile), ``finish`` runs after a successful exit."""

    name: str
    dataset: str
    cmd: list[str]
    log: Path
    needed: Callable[[], bool]
    ready: Callable[[], bool] = lambda: True
    finish: Callable[["Task", dict], str] = lambda task, usage: ""
    started: float = 0.0
    failed: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)


def run_pool(tasks: list[Task], jobs: int) -> list[str]:
    """Run ``tasks`` with at most ``jobs`` children at a time, first ready task first; returns
    the names of the failed ones. Each child's peak RSS and CPU time come from ``os.wait4``."""
    pending, running, failed = list(tasks), [], []
    t_run = time.perf_counter()
    try:
        _pool_loop(pending, running, failed, jobs, t_run)
    finally:  # interrupted (Ctrl-C, SIGTERM): stop our children; their unfinished work reruns next time
        for task in running:
            task.proc.terminate()
            task.proc.wait()
    return failed


def _pool_loop(pending: list[Task], running: list[Task], failed: list[str], jobs: int, t_run: float) -> None:
    while pending or running:
        while len(running) < jobs:
            task = next((t for t in pending if t.ready()), None)
            if task is None:
                break
            pending.remove(task)
            if not task.needed():
                continue
            task.log.parent.mkdir(parents=True, exist_ok=True)
            with open(task.log, "a") as logf:
                task.proc = subprocess.Popen(task.cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO),
                                             env=child_env())
            task.started = time.perf_counter()
            running.append(task)
            print(f"[{datetime.now():%H:%M:%S}] start {task.name}", flush=True)
        if not running:
            if pending:  # only tasks whose dependencies can no longer be met
                failed.extend(f"{t.name} (not started)" for t in pending)
            break
        time.sleep(0.2)
        for task in list(running):
            pid, status, usage = os.wait4(task.proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            running.remove(task)
            wall = time.perf_counter() - task.started
            code = os.waitstatus_to_exitcode(status)
            figures = {"child_wall_s": wall, "child_cpu_s": usage.ru_utime + usage.ru_stime,
                       "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux: KiB
            note = ""
            if code == 0:
                try:
                    note = task.finish(task, figures)
                except Exception as e:  # e.g. the child exited 0 without writing its result
                    code, note = -1, f"{type(e).__name__}: {e}"
            if code != 0:
                task.failed = True
                failed.append(task.name)
                tail = "\n    ".join(task.log.read_text().splitlines()[-15:]) if task.log.exists() else ""
                print(f"[{datetime.now():%H:%M:%S}] FAILED {task.name} (exit {code}) {note}; "
                      f"log {task.log}:\n    {tail}", flush=True)
            else:
                print(f"[{datetime.now():%H:%M:%S}] done  {task.name} in {wall:.0f} s {note}  "
                      f"({len(pending)} waiting, {time.perf_counter() - t_run:.0f} s elapsed)", flush=True)


def train_task(a, out: Path, split_path: Path, dataset: str, seed: int, side: str, python: str) -> Task:
    d = seed_dir(out, dataset, seed)
    result = d / f"{side}.json"

    def finish(task: Task, figures: dict) -> str:
        partial = d / f"{side}.partial.json"
        res = json.loads(partial.read_text())
        res.update(figures, jobs=a.jobs)
        write_json(result, res)
        partial.unlink()
        return (f"({res['s_per_epoch']:.3f} s/epoch, test marginal LL {res['test_marginal_ll_mean']:.2f}, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB)")

    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--split", str(split_path),
           "--result-dir", str(d), "--seed", str(seed), "--epochs", str(a.epochs), "--mc", str(a.mc)]
    d.mkdir(parents=True, exist_ok=True)
    return Task(name=f"{dataset} seed {seed} {SIDES[side]}", dataset=dataset, cmd=cmd, log=d / f"{side}.log",
                needed=lambda: not result.exists(), finish=finish)


def scib_task(a, out: Path, split_path: Path, dataset: str, sides: list[str],
              train_tasks: list[Task]) -> Task:
    """The scib child of one data set; it starts once none of that data set's training is left."""
    seeds = a.seeds_list

    def missing() -> bool:
        return any((seed_dir(out, dataset, s) / f"{side}.json").exists()
                   and not (seed_dir(out, dataset, s) / f"{side}_scib.json").exists()
                   for s in seeds for side in sides)

    def ready() -> bool:  # every training of this data set has its result (or has failed)
        return all(t.failed or not t.needed() for t in train_tasks if t.dataset == dataset)

    cmd = [a.scvi_python, str(Path(__file__).resolve()), "--worker", "scib", "--split", str(split_path),
           "--out", str(out), "--seeds", ",".join(map(str, seeds))] + (["--kbet"] if a.kbet else [])
    return Task(name=f"{dataset} scib-metrics", dataset=dataset, cmd=cmd, log=out / dataset / "scib.log",
                needed=missing, ready=ready)


def python_has(python: str, module: str) -> tuple[bool, str]:
    """Whether ``python`` exists and imports ``module`` (its version, or why not)."""
    if not Path(python).exists():
        return False, f"{python} does not exist"
    r = subprocess.run([python, "-c", f"import {module} as m; print(getattr(m, '__version__', '?'))"],
                       capture_output=True, text=True, env=child_env())
    if r.returncode != 0:
        return False, f"`import {module}` failed with {python}: {r.stderr.strip().splitlines()[-1:]}"
    return True, r.stdout.strip().splitlines()[-1]


def check_config(out: Path, a: argparse.Namespace) -> None:
    """Results in ``out`` must come from the same settings: store them on the first run, compare after."""
    path = out / "config.json"
    now = {k: getattr(a, k) for k in CONFIG_KEYS}
    if path.exists():
        before = json.loads(path.read_text())
        diff = {k: (before.get(k), now[k]) for k in CONFIG_KEYS if before.get(k) != now[k]}
        if diff:
            raise SystemExit(f"{out} holds results made with other settings {diff} (before, now); "
                             f"use another --out or the same settings")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, now)


def choose_datasets(a: argparse.Namespace, out: Path) -> dict[str, Path]:
    """The requested data sets and their files; a generated set when the real data are absent."""
    names = [n.strip() for n in a.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS and n != GENERATED]
    if unknown:
        raise SystemExit(f"unknown data sets {unknown}; known: {', '.join(DATASETS)} (or {GENERATED})")
    data_dir = Path(a.data_dir)
    real = [n for n in names if n != GENERATED]
    absent = [n for n in real if not (data_dir / f"{n}.h5ad").exists()]
    files = {n: data_dir / f"{n}.h5ad" for n in real if n not in absent}
    if absent:
        print(f"real data absent ({', '.join(f'{data_dir}/{n}.h5ad' for n in absent)}): "
              f"{'skipping them' if files else 'using a generated data set instead'}")
    if GENERATED in names or not files:
        path = out / GENERATED / f"{GENERATED}.h5ad"  # generated counts, not real data (git-ignored)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_generated(path, GENERATED_CELLS)
        files[GENERATED] = path
    for n, f in files.items():
        print(f"data: {n} <- {f}"
              + (" (generated: 4 batches, 5 types in cell_line)" if n == GENERATED else ""))
    return files


def parent(a: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run_pool's cleanup also on `kill`
    out = Path(a.out)
    check_config(out, a)
    print(machine_line(cpu_details()))
    ok_peer, why = (False, "--skip-peer") if a.skip_peer else scvi_available(a.scvi_python)
    print(f"scvi-tools {why} at {a.scvi_python}" if ok_peer else f"scvi-tools peer skipped: {why}")
    ok_scib, why_scib = python_has(a.scvi_python, "scib_metrics")
    print(f"scib-metrics {why_scib} at {a.scvi_python}" if ok_scib else f"scib-metrics skipped: {why_scib}")
    sides = ["pyro"] + (["scvi"] if ok_peer else [])
    pythons = {"pyro": a.pyro_python, "scvi": a.scvi_python}
    files = choose_datasets(a, out)
    print(f"seeds {a.seeds_list}, {a.epochs} epochs, marginal LL with {a.mc} samples, "
          f"{a.jobs} children at a time")

    splits = {}
    for dataset, h5ad in files.items():
        split = prepare_split(out, dataset, h5ad, a)
        splits[dataset] = out / dataset / "split.json"
        print(f"{dataset}: {split['n_cells']} cells ({split['n_cells'] - split['n_test']} train, "
              f"{split['n_test']} test) x {split['n_genes']} genes, {split['n_batches']} batches, "
              f"labels {split['labels_key'] or 'none'}")

    # training order: data set by data set (its scib child can then start while the next one
    # trains), seeds ascending, the two sides alternating which goes first
    train_tasks = [train_task(a, out, splits[ds], ds, seed, side, pythons[side])
                   for ds in files for seed in a.seeds_list
                   for side in (sides if seed % 2 == 0 else sides[::-1])]
    scib_tasks = ([scib_task(a, out, splits[ds], ds, sides, train_tasks) for ds in files] if ok_scib else [])
    todo = sum(t.needed() for t in train_tasks)
    print(f"{todo} of {len(train_tasks)} trainings to run ({len(train_tasks) - todo} found in {out})",
          flush=True)
    t0 = time.perf_counter()
    failed = run_pool(scib_tasks + train_tasks, a.jobs)  # scib first whenever one is ready
    print(f"\nfinished in {time.perf_counter() - t0:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    print()
    summarize(out)
    if failed:
        sys.exit(1)


# --------------------------------------------------------------------------------- statistics
def t_interval(values) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (nan bounds with fewer than two values)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if len(x) else math.nan
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def signed(value: float) -> str:
    """``-1`` as ``−1`` (a real minus sign, as in the tables)."""
    return f"{value:g}".replace("-", "−")


def fmt_num(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def fmt_ci(ci: tuple[float, float, float], digits: int) -> str:
    mean, lo, hi = ci
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    if not math.isnan(lo):
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text.replace("-", "−")


def verdict(ci: tuple[float, float, float], goal: float) -> str:
    """Significantly better (lower end > 0), not significantly worse (upper end ≥ goal), or worse."""
    _, lo, hi = ci
    if math.isnan(lo):
        return "n/a (< 2 seeds)"
    if lo > 0:
        return "**significantly better**"
    return "not significantly worse ✓" if hi >= goal else "**WORSE ✗**"


def load_dataset_results(out: Path, dataset: str) -> dict:
    """Per seed and side: training JSON, per-cell test marginal LL and scib JSON (what exists)."""
    import numpy as np

    runs: dict[int, dict[str, dict]] = {}
    for d in sorted((out / dataset).glob("seed*"), key=lambda p: int(p.name[4:])):
        for side in SIDES:
            path = d / f"{side}.json"
            if not path.exists():
                continue
            r = {"train": json.loads(path.read_text()), "mll": np.load(d / f"{side}_test_mll.npy")}
            scib = d / f"{side}_scib.json"
            r["scib"] = json.loads(scib.read_text()) if scib.exists() else None
            runs.setdefault(int(d.name[4:]), {})[side] = r
    return runs


def note_provenance(prov: dict, split: dict, runs: dict) -> None:
    """Collect what the header line reports: machines, versions, dates, seeds, data folders."""
    prov["data"].add(str(Path(split["h5ad"]).parent))
    prov["seeds"].update(runs)
    for by_side in runs.values():
        for side, r in by_side.items():
            t = r["train"]
            for k, v in t["versions"].items():
                prov["versions"].setdefault(SIDES[side], {}).setdefault(k, set()).add(v)
            if r["scib"]:
                for k in ("scib_metrics", "jax"):
                    prov["versions"].setdefault("scib-metrics", {}).setdefault(k, set()).add(
                        r["scib"].get(k, "?"))
            if "fused_kernel" in t:
                prov["fused"].add(str(t["fused_kernel"]))
            prov["machines"].add(json.dumps(t["machine"], sort_keys=True))
            prov["jobs"].add(str(t["jobs"]))
            prov["dates"].append(t["finished_utc"])


def dataset_rows(dataset: str, split: dict, runs: dict) -> dict[str, str]:
    """One row of each table for one data set."""
    import numpy as np

    paired = [s for s, r in runs.items() if set(r) == set(SIDES)]  # seeds with both sides trained

    def per_seed(side: str, value: Callable[[dict], float | None]) -> list[float]:
        vals = [value(runs[s][side]) for s in runs if side in runs[s]]
        return [v for v in vals if v is not None]

    def scib(key: str) -> Callable[[dict], float | None]:
        return lambda r: r["scib"][key] if r["scib"] else None

    rows = {}
    # marginal LL of the test cells: per-side mean over seeds, paired per-seed differences
    n_train = split["n_cells"] - split["n_test"]
    mll = {side: fmt_ci(t_interval(per_seed(side, lambda r: r["mll"].mean())), 2) for side in SIDES}
    ci = t_interval([(runs[s]["pyro"]["mll"] - runs[s]["scvi"]["mll"]).mean() for s in paired])
    rows["mll"] = (f"| {dataset} | {n_train} / {split['n_test']} | {split['n_genes']} | "
                   f"{split['n_batches']} | {len(paired)} | {mll['pyro']} | {mll['scvi']} | "
                   f"{fmt_ci(ci, 2)} | {verdict(ci, GOAL_MLL)} |")

    # scib: totals per side, paired difference of the totals; bio and batch per side
    scored = [s for s in paired if all(runs[s][side]["scib"] for side in SIDES)]
    ci = t_interval([runs[s]["pyro"]["scib"]["total"] - runs[s]["scvi"]["scib"]["total"] for s in scored])
    total = {side: fmt_ci(t_interval(per_seed(side, scib("total"))), 3) for side in SIDES}
    rows["scib"] = (f"| {dataset}{'' if split['labels_key'] else ' (batch only)'} | {len(scored)} | "
                    f"{total['pyro']} | {total['scvi']} | {fmt_ci(ci, 3)} | {verdict(ci, GOAL_SCIB)} |")
    parts = [fmt_ci(t_interval(per_seed(side, scib(key))), 3)
             if split["labels_key"] or key == "batch" else "—"
             for key in ("bio", "batch") for side in SIDES]
    rows["parts"] = f"| {dataset} | " + " | ".join(parts) + " |"

    # side figures: speed, time of get_marginal_ll, peak RSS, CPU share of the children
    def mean(side: str, key: str) -> float:
        vals = per_seed(side, lambda r: r["train"][key])
        return float(np.mean(vals)) if vals else math.nan

    spe = {side: mean(side, "s_per_epoch") for side in SIDES}
    cells = [fmt_num(spe["pyro"], 3), fmt_num(spe["scvi"], 3), fmt_num(spe["pyro"] / spe["scvi"], 2),
             *(fmt_num(mean(side, "marginal_ll_s"), 1) for side in SIDES),
             *(fmt_num(mean(side, "peak_rss_mb"), 0) for side in SIDES),
             *(fmt_num(mean(side, "child_cpu_s") / mean(side, "child_wall_s"), 2) for side in SIDES)]
    rows["side"] = f"| {dataset} | " + " | ".join(cells) + " |"
    return rows


def header_lines(config: dict, prov: dict, generated: bool) -> list[str]:
    """Machine, data, versions and protocol, as the paragraph above the tables."""
    kinds = [*SIDES.values(), "scib-metrics"]
    versions = "; ".join(f"{kind} child: " + ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in pk.items())
                         for kind, pk in sorted(prov["versions"].items(), key=lambda kv: kinds.index(kv[0])))
    lines = [machine_line(json.loads(m)) for m in sorted(prov["machines"])] or ["Machine: ? (no results yet)"]
    return lines + [
        f"pyro-scvi's fused NB/ZINB kernel in use: {'/'.join(sorted(prov['fused'])) or '?'}.",
        f"Data: the .h5ad files in {', '.join(sorted(prov['data']))}"
        + (" (generated data, not real)" if generated else "") + ".",
        f"Versions: {versions}.",
        f"Protocol: {config['epochs']} epochs (all other training settings default), test marginal LL "
        f"with {config['mc']} importance samples, top {config['n_genes']} genes by variance of log1p "
        f"counts, test split {config['test_fraction']:.0%} of the cells (rng seed {config['split_seed']}), "
        f"seeds {', '.join(map(str, sorted(prov['seeds'])))} ({len(prov['seeds'])}); 95% t-intervals over "
        f"seeds; kBET {'included' if config.get('kbet') else 'skipped'}; "
        f"{'/'.join(sorted(prov['jobs'])) or '?'} single-threaded children at a time. "
        f"Results dated {min(prov['dates'], default='?')} to {max(prov['dates'], default='?')} (UTC).",
    ]


def summarize(out: Path) -> str:
    """Markdown tables from the results in ``out`` (nothing is run); printed and written to summary.md."""
    if not (out / "config.json").exists():
        raise SystemExit(f"no results in {out} (no config.json)")
    config = json.loads((out / "config.json").read_text())
    datasets = [d for d in [*DATASETS, GENERATED] if (out / d / "split.json").exists()]
    prov = {"versions": {}, "machines": set(), "fused": set(), "jobs": set(), "seeds": set(), "dates": [],
            "data": set()}
    rows: dict[str, list[str]] = {"mll": [], "scib": [], "parts": [], "side": []}
    for ds in datasets:
        split = json.loads((out / ds / "split.json").read_text())
        runs = load_dataset_results(out, ds)
        note_provenance(prov, split, runs)
        for table, row in dataset_rows(ds, split, runs).items():
            rows[table].append(row)

    lines = header_lines(config, prov, GENERATED in datasets) + [
        "",
        "Test-set marginal log-likelihood, nats per cell (higher is better); Δ = pyro-scvi − scvi-tools, "
        f"per seed the mean over test cells; goal: upper end of Δ's interval ≥ {signed(GOAL_MLL)}.",
        "",
        "| data set | cells train / test | genes | batches | paired seeds | pyro-scvi | scvi-tools "
        "| Δ [95% CI] | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        *rows["mll"],
        "",
        f"scib-metrics total (0.6 bio + 0.4 batch; batch only without labels), latent of all cells; "
        f"Δ = pyro-scvi − scvi-tools per seed; goal: upper end of Δ's interval ≥ {signed(GOAL_SCIB)}.",
        "",
        "| data set | paired seeds | pyro-scvi | scvi-tools | Δ [95% CI] | goal |",
        "|---|---:|---:|---:|---:|---|",
        *rows["scib"],
        "",
        "scib-metrics bio conservation and batch correction, mean [95% CI] over seeds.",
        "",
        "| data set | bio pyro-scvi | bio scvi-tools | batch pyro-scvi | batch scvi-tools |",
        "|---|---:|---:|---:|---:|",
        *rows["parts"],
        "",
        "Side figures, means over seeds: s/epoch of `train()` (children ran concurrently, so these are "
        "the times of a busy machine), seconds of `get_marginal_ll` on the test cells, peak RSS of the "
        "child, and its CPU share (CPU time / wall time: 1.00 = it had a core to itself; less = other "
        "processes competed).",
        "",
        "| data set | s/epoch pyro-scvi | s/epoch scvi-tools | ratio | mLL s pyro-scvi | mLL s scvi-tools "
        "| RSS MB pyro-scvi | RSS MB scvi-tools | CPU share pyro-scvi | CPU share scvi-tools |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows["side"],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "summary.md").write_text(text)
    print(f"wrote {out / 'summary.md'}")
    return text


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help=f"comma-separated subset of {', '.join(DATASETS)} (or {GENERATED})")
    p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,5 (default 0-9)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--mc", type=int, default=200, help="importance samples per test cell for get_marginal_ll")
    p.add_argument("--n-genes", type=int, default=2000, help="top-N genes by variance of log1p counts")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=12345,
                   help="seed of the test split (np.random.default_rng)")
    p.add_argument("--kbet", action="store_true",
                   help="include kBET in the scib batch metrics (slow to compile)")
    p.add_argument("--jobs", type=int, default=2, help="children running at a time (each single-threaded)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="results directory (default benchmarks/results/real)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="folder of the real .h5ad files")
    p.add_argument("--pyro-python", default=sys.executable, help="Python with pyro_scvi's dependencies")
    p.add_argument("--scvi-python", default=DEFAULT_SCVI_PYTHON,
                   help="Python with scvi-tools and scib-metrics")
    p.add_argument("--skip-peer", action="store_true", help="train pyro-scvi only")
    p.add_argument("--summarize", action="store_true", help="only print (and write summary.md) the tables")
    # child-process arguments
    p.add_argument("--worker", choices=[*SIDES, "scib"], help=argparse.SUPPRESS)
    p.add_argument("--split", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.seeds_list = parse_seeds(a.seeds)
    if a.worker == "scib":
        scib_worker(a)
    elif a.worker:
        train_worker(a)
    elif a.summarize:
        summarize(Path(a.out))
    else:
        parent(a)


if __name__ == "__main__":
    main()
