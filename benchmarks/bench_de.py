"""Differential-expression and expression benchmark: pyro-scvi vs scvi-tools on CellBench 5cl.

Both sides time the same calls, each side in its own child process with the same number of torch
threads (pyro-scvi with this project's Python, scvi-tools with the Python of a separate venv):

* ``de_vanilla``, ``de_change``: ``differential_expression(groupby="cell_line", mode=...)``,
  one-vs-rest (defaults otherwise: 5000 posterior draws per group, no batch correction);
* ``expr_s1``: ``get_normalized_expression()`` over all cells (one draw per cell);
* ``expr_s25_mean``: ``get_normalized_expression(n_samples=25, return_mean=True)`` over all cells.

Beside each median time the child reports its peak resident memory during that task (``VmHWM``
from ``/proc/self/status``, reset before each task through ``/proc/self/clear_refs``) and its
resident memory before the task; the difference is what the task itself added at its peak.
The report also records the CPU model and flags, the C compiler and each side's torch version.

Models:

* default: the scvi-tools model saved in the shared fixture (CellBench 5cl, top 2000 genes,
  trained by scvi-tools), loaded by each side's ``SCVI.load``: same weights on both sides;
* ``--full-genes``: CellBench 5cl with all 12,653 genes and a freshly initialised default model
  on each side (marked trained without training: the timing of DE does not depend on the weight
  values), to compare with the reference's time at full size.

Each task is timed ``--repeats`` times in the same process, in ``--rounds`` child processes per
side that alternate between the sides (the first call includes any lazy
initialisation); the summary is the median. Before starting, the parent waits up to
``--wait-idle`` seconds for the 1-minute load average to drop below 1.0, and records it.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_de.py                 # fixture model, 2000 genes
    .venv/bin/python benchmarks/bench_de.py --full-genes    # all 12,653 genes, untrained weights
    .venv/bin/python benchmarks/bench_de.py --full-genes --tasks expr_s1 expr_s25_mean
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_FIXTURE = REPO.parent / "shared" / "fixtures" / "scvi_tools_cellbench5" / "model"
DEFAULT_H5AD = REPO.parent / "shared" / "data" / "cellbench_5cl.h5ad"
DEFAULT_SCVI_PYTHON = "/work/scvi-venv/bin/python"
SIDES = {"pyro": "pyro-scvi", "scvi": "scvi-tools"}
TASKS = ("de_vanilla", "de_change", "expr_s1", "expr_s25_mean")


def _status_mb(key: str) -> float | None:
    """``VmHWM`` (peak resident) or ``VmRSS`` (resident) of this process in MiB, from /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _task_calls(model, de) -> dict:
    """The timed calls, ``task → callable()``, through the side's ``model`` and its DE function."""
    return {
        "de_vanilla": lambda: de(model, "vanilla"),
        "de_change": lambda: de(model, "change"),
        "expr_s1": lambda: model.get_normalized_expression(return_numpy=True),
        "expr_s25_mean": lambda: model.get_normalized_expression(n_samples=25, return_mean=True,
                                                                 return_numpy=True),
    }


def machine_info() -> dict:
    """CPU model, SIMD flags (avx2, avx512f, fma), the C compiler's first line and the core count."""
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        lines = text.splitlines()
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        info["flags"] = {flag: flag in flags for flag in ("avx2", "avx512f", "fma")}
    except OSError:
        pass
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
        info["compiler"] = out.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        info["compiler"] = None
    return info


# ---------------------------------------------------------------------------------------- worker
def worker(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    if a.worker == "pyro":
        sys.path.insert(0, str(REPO))
        import pyro_scvi
        from pyro_scvi import SCVI, settings

        settings.seed = a.seed
        versions = {"pyro_scvi": pyro_scvi.__version__}
    else:
        import scvi
        from scvi.model import SCVI

        scvi.settings.seed = a.seed
        versions = {"scvi_tools": scvi.__version__}
    de = lambda model, mode: model.differential_expression(groupby="cell_line", mode=mode, silent=True)  # noqa: E731
    versions.update(torch=torch.__version__, numpy=np.__version__, python=platform.python_version())

    t0 = time.perf_counter()
    if a.full_genes:
        import anndata

        adata = anndata.read_h5ad(a.h5ad)
        SCVI.setup_anndata(adata, batch_key="batch")
        model = SCVI(adata)
        model.is_trained_ = True  # timing only: DE cost does not depend on the weights
        model.module.eval()  # a fresh scvi-tools module is in training mode (BatchNorm would use batch stats)
    else:
        model = SCVI.load(str(a.fixture))
    result = {"side": SIDES[a.worker], "versions": versions, "threads": torch.get_num_threads(),
              "shape": list(model.adata.shape), "load_s": time.perf_counter() - t0, "seconds": {},
              "rss_before_mb": {}, "peak_rss_mb": {}, "rows": {}}
    calls = _task_calls(model, de)
    for task in a.tasks:
        times = []
        result["rss_before_mb"][task] = _status_mb("VmRSS")
        reset = _reset_peak()
        for _ in range(a.repeats):
            out = None  # the previous repeat's result is freed before the next call
            t0 = time.perf_counter()
            out = calls[task]()
            times.append(time.perf_counter() - t0)
        result["seconds"][task] = times
        result["peak_rss_mb"][task] = _status_mb("VmHWM") if reset else None
        result["rows"][task] = len(out)
        del out
    Path(a.worker_out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------- parent
def wait_for_idle(max_wait: float, threshold: float = 1.0) -> tuple[float, float]:
    """Wait until the 1-minute load average is below ``threshold`` (at most ``max_wait`` s)."""
    start = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - start < max_wait:
        time.sleep(10)
    return os.getloadavg()[0], time.time() - start


def run_side(side: str, a: argparse.Namespace, python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{side}.json"
        command = [python, str(Path(__file__).resolve()), "--worker", side, "--worker-out", str(out),
                   "--threads", str(a.threads), "--repeats", str(a.repeats), "--seed", str(a.seed),
                   "--fixture", str(a.fixture), "--h5ad", str(a.h5ad), "--tasks", *a.tasks] + (
                      ["--full-genes"] if a.full_genes else [])
        t0 = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        result = json.loads(out.read_text())
        result["process_s"] = time.perf_counter() - t0
        return result


def merge_round(sides: dict, side: str, result: dict) -> None:
    """Add one child's ``result`` to ``sides[side]``: times appended, the peak memory the largest."""
    if side not in sides:
        sides[side] = result
        return
    merged = sides[side]
    for task, times in result["seconds"].items():
        merged["seconds"][task] += times
        for key in ("peak_rss_mb", "rss_before_mb"):
            values = [v for v in (merged[key][task], result[key][task]) if v is not None]
            merged[key][task] = max(values) if values else None


def summarise(report: dict, tasks) -> dict:
    """Print one table (median time, peak and before-task RSS per side; time ratio) and return it."""
    m = report["machine"]
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in m.get("flags", {}).items())
    torch_versions = ", ".join(f"{SIDES[side]} torch {result['versions']['torch']}"
                               for side, result in report["sides"].items())
    print(f"CPU {m.get('cpu_model')} ({m['cpus']} cpus; {flags}); {m.get('compiler')}; {torch_versions}")
    print(f"load average (1 min) {m['load_avg_1min_at_start']:.2f} at start, "
          f"{report['load_avg_1min_at_end']:.2f} at end; {report['threads']} threads")
    print(f"\n{'task':<14} {'side':<11} {'median s':>9} {'peak MiB':>9} {'before':>7}   all runs (s)")
    summary = {}
    for task in tasks:
        row = {}
        for side, result in report["sides"].items():
            times = result["seconds"][task]
            peak, before = result["peak_rss_mb"][task], result["rss_before_mb"][task]
            row[side] = {"median_s": statistics.median(times), "peak_rss_mb": peak, "rss_before_mb": before}
            print(f"{task:<14} {SIDES[side]:<11} {row[side]['median_s']:9.2f} {peak or float('nan'):9.0f} "
                  f"{before or float('nan'):7.0f}   {', '.join(f'{t:.2f}' for t in times)}")
        if "scvi" in row:
            row["ratio_pyro_over_scvi"] = row["pyro"]["median_s"] / row["scvi"]["median_s"]
            print(f"{task:<14} time ratio pyro-scvi / scvi-tools = {row['ratio_pyro_over_scvi']:.2f}")
        summary[task] = row
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)
    p.add_argument("--h5ad", type=Path, default=DEFAULT_H5AD)
    p.add_argument("--full-genes", action="store_true", help="all 12,653 genes, untrained weights")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each task per child process")
    p.add_argument("--rounds", type=int, default=1, help="child processes per side, alternating sides")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scvi-python", default=DEFAULT_SCVI_PYTHON)
    p.add_argument("--wait-idle", type=float, default=300.0, help="seconds to wait for load < 1.0")
    p.add_argument("--skip-scvi", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", choices=sorted(SIDES))
    p.add_argument("--worker-out")
    a = p.parse_args()
    if a.worker:
        worker(a)
        return

    load, waited = wait_for_idle(a.wait_idle)
    print(f"load average {load:.2f} after waiting {waited:.0f} s")
    machine = {**machine_info(), "load_avg_1min_at_start": load}
    report = {
        "benchmark": "one-vs-rest differential_expression over 'cell_line' and get_normalized_expression",
        "model": "CellBench 5cl, 12,653 genes, untrained default SCVI" if a.full_genes
        else f"scvi-tools fixture model {a.fixture}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "repeats": a.repeats, "rounds": a.rounds, "threads": a.threads,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sides": {},
    }
    sides = {"pyro": sys.executable, **({} if a.skip_scvi else {"scvi": a.scvi_python})}
    for _ in range(a.rounds):  # the sides alternate, so that a change of load hits both
        for side, python in sides.items():
            merge_round(report["sides"], side, run_side(side, a, python))
    report["load_avg_1min_at_end"] = os.getloadavg()[0]
    report["summary"] = summarise(report, a.tasks)
    out = a.out or HERE / "results" / f"de_cellbench_{'all_genes' if a.full_genes else '2000'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
