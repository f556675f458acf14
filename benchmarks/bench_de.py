"""Differential-expression benchmark: pyro-scvi vs scvi-tools, one-vs-rest over ``cell_line``.

Both sides time the same call, ``differential_expression(groupby="cell_line", mode=...)`` for
``mode`` in ``vanilla`` and ``change`` (defaults otherwise: 5000 posterior draws per group, no
batch correction), each in its own child process with the same number of torch threads:
pyro-scvi with this project's Python (``pyro_scvi.differential.differential_expression``),
scvi-tools with the Python of a separate venv (``scvi.model.SCVI.differential_expression``).

Models:

* default: the scvi-tools model saved in the shared fixture (CellBench 5cl, top 2000 genes,
  trained by scvi-tools), loaded by each side's ``SCVI.load``: same weights on both sides;
* ``--full-genes``: CellBench 5cl with all 12,653 genes and a freshly initialised default model
  on each side (marked trained without training: the timing of DE does not depend on the weight
  values), to compare with the reference's time at full size.

Each mode is timed ``--repeats`` times in the same process (the first call includes any lazy
initialisation); the summary is the median. Before starting, the parent waits up to
``--wait-idle`` seconds for the 1-minute load average to drop below 1.0, and records it.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_de.py                 # fixture model, 2000 genes
    .venv/bin/python benchmarks/bench_de.py --full-genes    # all 12,653 genes, untrained weights
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
MODES = ("vanilla", "change")


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------- worker
def worker(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    if a.worker == "pyro":
        sys.path.insert(0, str(REPO))
        import pyro_scvi
        from pyro_scvi import SCVI, settings
        from pyro_scvi.differential import differential_expression

        settings.seed = a.seed
        versions = {"pyro_scvi": pyro_scvi.__version__}
        run = lambda model, mode: differential_expression(model, groupby="cell_line", mode=mode, silent=True)  # noqa: E731
    else:
        import scvi
        from scvi.model import SCVI

        scvi.settings.seed = a.seed
        versions = {"scvi_tools": scvi.__version__}
        run = lambda model, mode: model.differential_expression(groupby="cell_line", mode=mode, silent=True)  # noqa: E731
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
              "shape": list(model.adata.shape), "load_s": time.perf_counter() - t0, "seconds": {}}
    for mode in MODES:
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            table = run(model, mode)
            times.append(time.perf_counter() - t0)
        result["seconds"][mode] = times
        result[f"rows_{mode}"] = len(table)
    result["peak_rss_mb"] = _peak_rss_mb()
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
                   "--fixture", str(a.fixture), "--h5ad", str(a.h5ad)] + (
                      ["--full-genes"] if a.full_genes else [])
        t0 = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        result = json.loads(out.read_text())
        result["process_s"] = time.perf_counter() - t0
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)
    p.add_argument("--h5ad", type=Path, default=DEFAULT_H5AD)
    p.add_argument("--full-genes", action="store_true", help="all 12,653 genes, untrained weights")
    p.add_argument("--repeats", type=int, default=3)
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
    report = {
        "benchmark": "differential_expression one-vs-rest, groupby='cell_line'",
        "model": "CellBench 5cl, 12,653 genes, untrained default SCVI" if a.full_genes
        else f"scvi-tools fixture model {a.fixture}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1min_at_start": load},
        "repeats": a.repeats, "threads": a.threads,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sides": {},
    }
    report["sides"]["pyro"] = run_side("pyro", a, sys.executable)
    if not a.skip_scvi:
        report["sides"]["scvi"] = run_side("scvi", a, a.scvi_python)
    report["load_avg_1min_at_end"] = os.getloadavg()[0]

    print(f"\n{'mode':<8} {'side':<11} {'median s':>9}   all runs (s)")
    summary = {}
    for mode in MODES:
        medians = {}
        for side, result in report["sides"].items():
            times = result["seconds"][mode]
            medians[side] = statistics.median(times)
            print(f"{mode:<8} {SIDES[side]:<11} {medians[side]:9.2f}   "
                  f"{', '.join(f'{t:.2f}' for t in times)}")
        if "scvi" in medians:
            ratio = medians["scvi"] / medians["pyro"]
            medians["speedup_scvi_over_pyro"] = ratio
            print(f"{mode:<8} ratio scvi-tools / pyro-scvi = {ratio:.2f}x")
        summary[mode] = medians
    report["median_seconds"] = summary

    out = a.out or HERE / "results" / f"de_cellbench_{'all_genes' if a.full_genes else '2000'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
