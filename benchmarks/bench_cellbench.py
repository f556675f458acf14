"""CellBench 5cl benchmark: pyro-scvi vs scvi-tools, default SCVI, same data, same epochs.

Each implementation trains in its own child process (pyro-scvi with this project's Python,
scvi-tools with the Python of a separate venv that has scvi-tools installed), so that each side's
peak resident memory can be read from the kernel's accounting of that child alone
(``os.wait4``), free of the other side and of the parent.

Per side it reports: seconds per epoch (training wall time / epochs, progress bar off),
held-out (validation set) ELBO and train ELBO via ``get_elbo``, held-out marginal
log-likelihood via ``get_marginal_ll(n_mc_samples=--mc)``, silhouette of the latent mean by
``cell_line`` and by ``batch``, and the child's peak RSS.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_cellbench.py                       # 2000 genes, 100 epochs
    .venv/bin/python benchmarks/bench_cellbench.py --n-genes 0 --epochs 20   # all 12,653 genes
    .venv/bin/python benchmarks/bench_cellbench.py --generate 100000 --epochs 2 --mc-cells 2000
        # a generated 100,000-cell x 2,000-gene set (4 batches, 5 cell types, ~38% non-zero)
    .venv/bin/python benchmarks/bench_cellbench.py --n-genes 0 --epochs 15 --check-val-every 1 \
        --timing-only --kernel-cflags=-march=haswell
        # training time only, validation every epoch (scvi-tools' default), the fused kernel built
        # for AVX2 (as on an AVX2 machine) even on an AVX-512 CPU; --emulate-avx2 also limits
        # torch, MKL and oneDNN to AVX2 on both sides

Validation runs every ``--check-val-every`` epochs (default: every tenth of the run; scvi-tools'
own default is every epoch). The output records the CPU model and SIMD flags, the C compiler, and
how pyro-scvi's kernel was built (flags, vectorised loops) and chosen.

The same file is the child-process runner (``--worker pyro|scvi``); it only uses the public
``SCVI`` API of each package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_H5AD = "/work/shared/data/cellbench_5cl.h5ad"
DEFAULT_SCVI_PYTHON = "/work/scvi-venv/bin/python"
SIDES = {"pyro": "pyro-scvi", "scvi": "scvi-tools"}


# ---------------------------------------------------------------------------------------- worker
def _rss_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc, in MB (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def load_data(h5ad: str, n_genes: int):
    """The AnnData restricted to the top ``n_genes`` genes by variance of log1p counts.

    Same selection as /work/shared/tools/peer_scvi_tools.py: variance of log1p of the CSR data
    as E[x²] − E[x]², top-N by ``argsort``, kept in the original gene order.
    """
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(h5ad)
    if n_genes:
        X = adata.X
        lx = X.copy()
        lx.data = np.log1p(lx.data)
        mean = np.asarray(lx.mean(0)).ravel()
        sq = np.asarray(lx.multiply(lx).mean(0)).ravel()
        keep = np.argsort(-(sq - mean**2))[:n_genes]
        adata = adata[:, np.sort(keep)].copy()
    return adata


def write_generated(path: Path, n_cells: int, n_genes: int = 2000, seed: int = 0) -> None:
    """A generated count matrix as .h5ad (CSR float32): 4 batches, 5 cell types (``cell_line``).

    Poisson-gamma (NB) counts around per-type log-normal profiles with per-batch gene scaling and
    log-normal library sizes; written in chunks of 20k cells (then stacked as CSR).
    """
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    profiles = rng.lognormal(0.0, 1.5, (5, n_genes))
    batch_scale = rng.lognormal(0.0, 0.3, (4, n_genes))
    theta = rng.gamma(2.0, 1.0, n_genes)
    cell_type = rng.integers(0, 5, n_cells)
    batch = rng.integers(0, 4, n_cells)
    blocks = []
    for start in range(0, n_cells, 20000):
        stop = min(start + 20000, n_cells)
        profile = profiles[cell_type[start:stop]] * batch_scale[batch[start:stop]]
        library = rng.lognormal(np.log(2500.0), 0.4, stop - start)
        mean = library[:, None] * profile / profile.sum(1, keepdims=True)
        counts = rng.poisson(rng.gamma(theta[None, :], mean / theta[None, :])).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    X = sp.vstack(blocks, format="csr")
    obs = pd.DataFrame({"batch": pd.Categorical([f"batch_{b}" for b in batch]),
                        "cell_line": pd.Categorical([f"type_{t}" for t in cell_type])},
                       index=[f"cell_{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)])
    ad.AnnData(X, obs=obs, var=var).write_h5ad(path)
    print(f"generated {n_cells} x {n_genes} (density {X.nnz / (n_cells * n_genes):.2f}) -> {path}")


def worker(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    if a.worker == "pyro":
        sys.path.insert(0, str(REPO))
        import pyro

        import pyro_scvi
        from pyro_scvi import SCVI, settings

        settings.seed = a.seed
        versions = {"pyro_scvi": getattr(pyro_scvi, "__version__", "?"), "pyro": pyro.__version__}
    else:
        import scvi
        from scvi.model import SCVI

        scvi.settings.seed = a.seed
        versions = {"scvi_tools": scvi.__version__}
    import sklearn
    from sklearn.metrics import silhouette_score

    versions.update(torch=torch.__version__, numpy=np.__version__, sklearn=sklearn.__version__,
                    python=platform.python_version())
    t_load = time.perf_counter()
    adata = load_data(a.h5ad, a.n_genes)
    res: dict = {
        "side": SIDES[a.worker], "versions": versions, "shape": list(adata.shape), "epochs": a.epochs,
        "n_genes_arg": a.n_genes, "threads": torch.get_num_threads(),
        "genes_sha1": hashlib.sha1("\n".join(map(str, adata.var_names)).encode()).hexdigest(),
        "load_s": time.perf_counter() - t_load,
    }
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_line")
    m = SCVI(adata)
    res["rss_before_train_mb"] = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    m.train(max_epochs=a.epochs, train_size=0.9, batch_size=128, enable_progress_bar=False,
            check_val_every_n_epoch=a.check_val_every or max(1, a.epochs // 10))
    res["train_s"] = time.perf_counter() - t0
    res["s_per_epoch"] = res["train_s"] / a.epochs
    res["check_val_every_n_epoch"] = a.check_val_every or max(1, a.epochs // 10)
    if a.worker == "pyro":
        from pyro_scvi.distributions import fused, kernel_choice

        # the vectorisation report compiles the kernel again: done by the parent, after the runs,
        # so that the compiler does not count as competing CPU work here
        res["kernel"] = {"build": fused.build_info(), "choice": kernel_choice._choice}
    res["rss_after_train_mb"] = _rss_mb("VmRSS")
    res["peak_rss_after_train_mb"] = _rss_mb("VmHWM")  # high-water mark of the process up to here
    val, tr = np.asarray(m.validation_indices), np.asarray(m.train_indices)
    res["n_train"], res["n_validation"] = len(tr), len(val)
    res["validation_sha1"] = hashlib.sha1(np.sort(val).astype(np.int64).tobytes()).hexdigest()
    if a.timing_only:
        with open(a.worker_out, "w") as f:
            json.dump(res, f, indent=1)
        return

    t0 = time.perf_counter()
    res["elbo_validation"] = float(m.get_elbo(indices=val))
    res["elbo_validation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res["elbo_train"] = float(m.get_elbo(indices=tr))
    res["elbo_train_s"] = time.perf_counter() - t0
    res["peak_rss_after_elbo_mb"] = _rss_mb("VmHWM")
    mll_cells = np.sort(val)[: a.mc_cells] if a.mc_cells else val  # the same cells on both sides
    res["marginal_ll_cells"] = len(mll_cells)
    t0 = time.perf_counter()
    res["marginal_ll_validation"] = float(m.get_marginal_ll(indices=mll_cells, n_mc_samples=a.mc))
    res["marginal_ll_validation_s"] = time.perf_counter() - t0
    res["mc_samples"] = a.mc
    res["peak_rss_after_marginal_ll_mb"] = _rss_mb("VmHWM")

    t0 = time.perf_counter()
    z = np.asarray(m.get_latent_representation())
    res["latent_s"] = time.perf_counter() - t0
    res["latent_shape"] = list(z.shape)
    sample = min(len(z), 5000)  # silhouettes are O(n²): a fixed random subset of cells on large data
    res["silhouette_cell_line"] = float(silhouette_score(z, adata.obs["cell_line"], sample_size=sample,
                                                         random_state=0))
    res["silhouette_batch"] = float(silhouette_score(z, adata.obs["batch"], sample_size=sample,
                                                     random_state=0))

    hist = m.history or {}
    res["history_last"] = {k: float(v.iloc[-1, 0]) for k, v in hist.items() if len(v)}
    res["peak_rss_self_mb"] = _rss_mb("VmHWM")
    with open(a.worker_out, "w") as f:
        json.dump(res, f, indent=1)


# ---------------------------------------------------------------------------------------- parent
def scvi_available(python: str) -> tuple[bool, str]:
    if not Path(python).exists():
        return False, f"{python} does not exist"
    r = subprocess.run([python, "-c", "import scvi; print(scvi.__version__)"], capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"`import scvi` failed with {python}: {r.stderr.strip().splitlines()[-1:]}"
    return True, r.stdout.strip().splitlines()[-1]


def run_side(side: str, python: str, a: argparse.Namespace, tmp: Path, rep: int) -> dict:
    """Run one side in a child process; returns its figures plus the child's peak RSS (wait4)."""
    out = tmp / f"{side}_{rep}.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--worker-out", str(out),
           "--h5ad", a.h5ad, "--n-genes", str(a.n_genes), "--epochs", str(a.epochs), "--mc", str(a.mc),
           "--seed", str(a.seed), "--threads", str(a.threads), "--mc-cells", str(a.mc_cells),
           "--check-val-every", str(a.check_val_every)] + (["--timing-only"] if a.timing_only else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    if a.emulate_avx2:  # both sides: torch's kernels, MKL and oneDNN limited to AVX2
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    if side == "pyro" and (a.kernel_cflags or a.emulate_avx2):
        env["PYRO_SCVI_CFLAGS"] = a.kernel_cflags or "-march=haswell"
    log = tmp / f"{side}_{rep}.log"
    if a.wait_idle:
        wait_idle(a.wait_idle)
    load_before = os.getloadavg()
    busy_before = cpu_busy_s()
    print(f"[{datetime.now():%H:%M:%S}] {SIDES[side]} (run {rep + 1}) ...", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or not out.exists():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{SIDES[side]} child failed (exit {p.returncode}); log tail:\n{tail}")
    res = json.loads(out.read_text())
    res["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    res["child_wall_s"] = wall
    res["child_cpu_s"] = usage.ru_utime + usage.ru_stime
    res["loadavg_before"], res["loadavg_after"] = list(load_before), list(os.getloadavg())
    busy_after = cpu_busy_s()
    # CPU time other processes took while the child ran: > 0 means the timing competed for cores
    res["other_procs_cpu_s"] = (None if busy_before is None
                                else max(0.0, busy_after - busy_before - res["child_cpu_s"]))
    elbo = res.get("elbo_validation", float("nan"))
    print(f"    {res['s_per_epoch']:.3f} s/epoch, held-out ELBO {elbo:.2f}, "
          f"peak RSS {res['peak_rss_mb']:.0f} MB, child wall {wall:.1f} s, "
          f"CPU taken by other processes meanwhile {res['other_procs_cpu_s'] or 0:.1f} s", flush=True)
    if (res["other_procs_cpu_s"] or 0) > 0.1 * wall:
        print("    WARNING: other processes competed for the cores during this run; "
              "its timing is unreliable", flush=True)
    return res


def vectorisation_report(a: argparse.Namespace) -> dict | str:
    """Which of the kernel's loops the compiler vectorised, built as the pyro-scvi child built it."""
    env = dict(os.environ)
    if a.kernel_cflags or a.emulate_avx2:
        env["PYRO_SCVI_CFLAGS"] = a.kernel_cflags or "-march=haswell"
    code = ("import json; from pyro_scvi.distributions import fused; print(json.dumps("
            "fused.vectorisation_report() if fused.available() else fused.unavailable_reason()))")
    result = subprocess.run([a.pyro_python, "-c", code], cwd=str(REPO), env=env, capture_output=True,
                            text=True)
    return json.loads(result.stdout) if result.returncode == 0 else result.stderr.strip()[-300:]


def cpu_busy_s() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait_s: float, window_s: float = 5.0, threshold: float = 0.1) -> None:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold`` of one core over ``window_s``."""
    t0 = time.monotonic()
    while True:
        b0 = cpu_busy_s()
        time.sleep(window_s)
        b1 = cpu_busy_s()
        if b0 is None or (b1 - b0) / window_s < threshold:
            return
        if time.monotonic() - t0 > max_wait_s:
            print(f"    machine still busy after waiting {max_wait_s:.0f} s "
                  f"({(b1 - b0) / window_s:.2f} cores in use); running anyway", flush=True)
            return


def machine_info() -> dict:
    """CPU model and SIMD flags, C compiler, platform and date."""
    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flag_line = next((ln for ln in lines if ln.startswith(("flags", "Features"))), ":")
        flags = set(flag_line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "asimd", "sve") if f in flags]
    compiler = os.environ.get("CC", "cc")
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True)
        version = result.stdout.splitlines()[0]
    except (OSError, IndexError):
        version = "not found"
    return {"cpu": cpu, "simd_flags": " ".join(simd), "logical_cpus": os.cpu_count(),
            "c_compiler": f"{compiler}: {version}", "platform": platform.platform(),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _clean(r: dict) -> bool:
    """True when other processes took < 10% of a core over the child's lifetime."""
    return (r.get("other_procs_cpu_s") or 0.0) < 0.1 * r["child_wall_s"]


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """First run's quality figures (seeded, so repeats agree); s/epoch is the median over the
    runs nothing else competed with (over all runs when none was clean); peak RSS the max."""
    out = {}
    for side, rs in runs.items():
        if not rs:
            continue
        s = dict(rs[0])
        clean = [r for r in rs if _clean(r)]
        s["s_per_epoch_runs"] = [r["s_per_epoch"] for r in rs]
        s["runs_clean"] = [_clean(r) for r in rs]
        s["s_per_epoch"] = _median([r["s_per_epoch"] for r in (clean or rs)])
        s["s_per_epoch_from"] = (f"median of {len(clean)} clean run(s)" if clean
                                 else f"median of {len(rs)} run(s), none clean")
        s["train_s"] = s["s_per_epoch"] * s["epochs"]
        s["peak_rss_mb_runs"] = [r["peak_rss_mb"] for r in rs]
        s["peak_rss_mb"] = max(s["peak_rss_mb_runs"])
        out[side] = s
    return out


ROWS = [
    ("s/epoch", "s_per_epoch", "{:.3f}"),
    ("train wall (s, = s/epoch x epochs)", "train_s", "{:.1f}"),
    ("held-out ELBO", "elbo_validation", "{:.2f}"),
    ("train ELBO", "elbo_train", "{:.2f}"),
    ("held-out marginal LL", "marginal_ll_validation", "{:.2f}"),
    ("  (time, s)", "marginal_ll_validation_s", "{:.2f}"),
    ("silhouette cell_line", "silhouette_cell_line", "{:.3f}"),
    ("silhouette batch", "silhouette_batch", "{:.3f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
    ("RSS before train (MB)", "rss_before_train_mb", "{:.0f}"),
    ("peak RSS up to end of train (MB)", "peak_rss_after_train_mb", "{:.0f}"),
    ("peak RSS up to after get_elbo (MB)", "peak_rss_after_elbo_mb", "{:.0f}"),
]


def table(summary: dict[str, dict]) -> str:
    sides = [s for s in ("pyro", "scvi") if s in summary]
    head = f"| {'':36s} | " + " | ".join(f"{SIDES[s]:>11s}" for s in sides) + " |"
    lines = [head, "|" + "-" * 38 + "|" + "|".join("-" * 13 for _ in sides) + "|"]
    for label, key, fmt in ROWS:
        cells = []
        for s in sides:
            v = summary[s].get(key)
            cells.append(f"{fmt.format(v) if v is not None else 'n/a':>11s}")
        lines.append(f"| {label:36s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parent(a: argparse.Namespace) -> None:
    name = f"generated_{a.generate}" if a.generate else f"cellbench_{a.n_genes}"
    out_path = Path(a.out) if a.out else HERE / "results" / f"{name}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ok, why = (False, "--skip-peer") if a.skip_peer else scvi_available(a.scvi_python)
    if not ok:
        print(f"scvi-tools peer skipped: {why}")
    else:
        print(f"scvi-tools {why} found at {a.scvi_python}")
    sides = ["pyro"] + (["scvi"] if ok else [])
    pythons = {"pyro": a.pyro_python, "scvi": a.scvi_python}
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    order_log = []
    with tempfile.TemporaryDirectory(prefix="bench_cellbench_") as tmp:
        if a.generate:
            a.h5ad = str(Path(tmp) / f"generated_{a.generate}.h5ad")
            a.n_genes = 0
            write_generated(Path(a.h5ad), a.generate)
        for rep in range(a.repeats):
            # alternate the order each round (A B, B A, ...) so drift in machine load hits both sides
            order = sides if rep % 2 == 0 else sides[::-1]
            for side in order:
                runs[side].append(run_side(side, pythons[side], a, Path(tmp), rep))
                order_log.append(SIDES[side])
    summary = summarise(runs)
    result = {"benchmark": name, "h5ad": a.h5ad, "n_genes": a.n_genes, "epochs": a.epochs,
              "emulate_avx2": a.emulate_avx2, "kernel_cflags": a.kernel_cflags,
              "mc_samples": a.mc, "seed": a.seed, "threads": a.threads, "repeats": a.repeats,
              "run_order": order_log, "machine": machine_info(), "peer_skipped": None if ok else why,
              "results": summary, "all_runs": runs}
    if "pyro" in summary and "scvi" in summary:
        p, s = summary["pyro"], summary["scvi"]
        if p["genes_sha1"] != s["genes_sha1"]:
            print("WARNING: the two sides selected different genes!")
        if p["validation_sha1"] != s["validation_sha1"]:
            result["note_split"] = "validation sets differ between the two sides (different split RNG)"
        result["ratio_s_per_epoch_pyro_over_scvi"] = p["s_per_epoch"] / s["s_per_epoch"]
        result["ratio_peak_rss_pyro_over_scvi"] = p["peak_rss_mb"] / s["peak_rss_mb"]
        result["same_genes"] = p["genes_sha1"] == s["genes_sha1"]
        result["same_validation_cells"] = p["validation_sha1"] == s["validation_sha1"]
    shape = summary["pyro"]["shape"]
    machine = result["machine"]
    print(f"\n{name}: {shape[0]} cells x {shape[1]} genes, {a.epochs} epochs, validation every "
          f"{summary['pyro']['check_val_every_n_epoch']} epoch(s), {a.threads} threads, "
          f"marginal LL with {a.mc} samples, order: {', '.join(order_log)}")
    print(f"CPU: {machine['cpu']} ({machine['simd_flags']}), {machine['logical_cpus']} logical; "
          f"compiler {machine['c_compiler']}")
    kernel = summary["pyro"].get("kernel")
    if kernel:
        kernel["vectorised_loops"] = vectorisation_report(a)
        build = kernel["build"]
        print(f"pyro-scvi kernel: {build.get('flags', build.get('reason'))}; vectorised loops "
              f"{kernel['vectorised_loops']}; choice {kernel['choice']}")
    print(table(summary))
    for side, r in summary.items():
        runs_txt = ", ".join(f"{v:.3f}{'' if c else '*'}"
                             for v, c in zip(r["s_per_epoch_runs"], r["runs_clean"]))
        print(f"{SIDES[side]} s/epoch per run: {runs_txt}  -> {r['s_per_epoch_from']}"
              + ("  (* = other processes competed)" if not all(r["runs_clean"]) else ""))
    if "ratio_s_per_epoch_pyro_over_scvi" in result:
        print(f"\nratio pyro-scvi / scvi-tools, s/epoch: {result['ratio_s_per_epoch_pyro_over_scvi']:.2f}"
              f"   peak RSS: {result['ratio_peak_rss_pyro_over_scvi']:.2f}")
        print(f"same genes: {result['same_genes']}   "
              f"same validation cells: {result['same_validation_cells']}")
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--h5ad", default=DEFAULT_H5AD)
    p.add_argument("--n-genes", type=int, default=2000,
                   help="top-N genes by variance of log1p counts; 0 = all")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--mc", type=int, default=100, help="importance samples for get_marginal_ll")
    p.add_argument("--mc-cells", type=int, default=0,
                   help="marginal LL on the first N validation cells (0 = all)")
    p.add_argument("--generate", type=int, default=0, metavar="N_CELLS",
                   help="benchmark on a generated N_CELLS x 2000-gene set instead of --h5ad")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds; the order alternates each round, s/epoch is the median")
    p.add_argument("--out", help="JSON output (default benchmarks/results/cellbench_<n_genes>.json)")
    p.add_argument("--pyro-python", default=sys.executable, help="Python with pyro_scvi's dependencies")
    p.add_argument("--scvi-python", default=DEFAULT_SCVI_PYTHON, help="Python with scvi-tools installed")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each child, wait up to SECONDS until other processes use < 10%% of a core")
    p.add_argument("--skip-peer", action="store_true", help="run pyro-scvi only")
    p.add_argument("--check-val-every", type=int, default=0, metavar="N",
                   help="validation every N epochs (0: a tenth of the epochs; scvi-tools' default is 1)")
    p.add_argument("--timing-only", action="store_true", help="stop after training (no quality metrics)")
    p.add_argument("--emulate-avx2", action="store_true",
                   help="an AVX2 machine on an AVX-512 one: torch, MKL and oneDNN limited to AVX2 on both "
                        "sides, pyro-scvi's kernel built with -march=haswell")
    p.add_argument("--kernel-cflags", default="",
                   help="extra C flags for pyro-scvi's fused kernel ($PYRO_SCVI_CFLAGS), e.g. -march=haswell")
    p.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
