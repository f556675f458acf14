"""Training and differential expression timed side by side with scvi-tools on one GPU (or, for a dry
run of the whole pipeline, on the CPU with tiny data).

Run by ``benchmarks/gpu_check.sh``, which also prints the device facts and runs the CUDA tests. Per
data set (CellBench 5cl with all genes, and with the top 2000 by variance of log1p counts; a
generated stand-in when the file is absent) and per side, a child process:

1. loads the data and builds the default ``SCVI`` (``batch``, ``cell_line``);
2. trains one warm-up epoch (CUDA context, kernels' first launches), then ``--epochs`` epochs with
   validation after every epoch, timed: seconds per epoch;
3. runs one-vs-rest vanilla DE over ``cell_line`` (``differential_expression(groupby="cell_line")``),
   timed;
4. records the peak GPU memory (``torch.cuda.max_memory_allocated``) of training and of DE.

Each child runs under a timeout that keeps the whole run within ``--budget-s``; what does not fit is
reported as skipped. The scvi-tools side runs where a Python with scvi-tools is found
(``--scvi-python``), else it is reported as skipped. The result is one markdown table, printed and
written with a JSON file to ``--out``.

Usage (from the repository root)::

    python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check     # dry run, seconds
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE))
from bench_cellbench import load_data, machine_info, write_generated  # noqa: E402

SIDES = {"pyro": "pyro-scvi", "scvi": "scvi-tools"}
#: where CellBench 5cl is looked for when --h5ad is not given (a carried copy first)
H5AD_CANDIDATES = [REPO / ".gpu-carry" / "cellbench_5cl.h5ad",
                   REPO / "shared" / "data" / "cellbench_5cl.h5ad",
                   REPO.parent / "shared" / "data" / "cellbench_5cl.h5ad"]
DEFAULT_SCVI_PYTHON = "/work/scvi-venv/bin/python"
#: per data set: (label, --n-genes); 0 = all genes
CASES = [("top 2000 genes", 2000), ("all genes", 0)]
TINY = {"cells": 240, "genes": 300, "top": 100, "epochs": 2}
#: seconds kept back at the end of the budget for the parent's own report
RESERVE_S = 5.0


# ---------------------------------------------------------------------------------------- worker
def _peak_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def worker(a: argparse.Namespace) -> None:
    """One side on one data set: the figures of the module docstring, as JSON in ``--worker-out``."""
    import torch

    torch.set_num_threads(a.threads)
    if a.worker == "pyro":
        sys.path.insert(0, str(REPO))
        import pyro_scvi
        from pyro_scvi import SCVI, settings

        settings.seed = a.seed
        version = pyro_scvi.__version__
    else:
        import scvi
        from scvi.model import SCVI

        scvi.settings.seed = a.seed
        version = scvi.__version__
    accelerator = "gpu" if a.device == "cuda" else "cpu"
    adata = load_data(a.h5ad, a.n_genes)
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_line")
    model = SCVI(adata)
    train = dict(accelerator=accelerator, train_size=0.9, batch_size=128, check_val_every_n_epoch=1,
                 enable_progress_bar=False)
    res = {"side": SIDES[a.worker], "version": version, "torch": torch.__version__,
           "shape": list(adata.shape), "epochs": a.epochs,
           "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}

    start = time.perf_counter()
    model.train(max_epochs=1, **train)  # warm-up: CUDA context, first launches, allocator growth
    _synchronize(a.device)
    res["first_epoch_s"] = time.perf_counter() - start
    _reset_peak(a.device)
    start = time.perf_counter()
    model.train(max_epochs=a.epochs, **train)
    _synchronize(a.device)
    res["train_s"] = time.perf_counter() - start
    res["s_per_epoch"] = res["train_s"] / a.epochs
    res["peak_train_mb"] = _peak_mb(a.device)

    _reset_peak(a.device)
    start = time.perf_counter()
    de = model.differential_expression(groupby="cell_line")
    _synchronize(a.device)
    res["de_s"] = time.perf_counter() - start
    res["peak_de_mb"] = _peak_mb(a.device)
    res["de_shape"] = list(de.shape)
    Path(a.worker_out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------- parent
def scvi_python(requested: str | None, own: str) -> tuple[str | None, str]:
    """The Python that imports scvi-tools (``requested``, else the default venv's, else ``own``), and
    a line saying which, or why there is none."""
    candidates = [requested] if requested else [p for p in (DEFAULT_SCVI_PYTHON, own) if Path(p).exists()]
    reasons = []
    for python in candidates:
        if not Path(python).exists():
            reasons.append(f"{python} does not exist")
            continue
        found = subprocess.run([python, "-c", "import scvi; print(scvi.__version__)"], capture_output=True,
                               text=True, timeout=120)
        if found.returncode == 0:
            return python, f"scvi-tools {found.stdout.strip().splitlines()[-1]} with {python}"
        last = (found.stderr.strip().splitlines() or ["?"])[-1]
        reasons.append(f"`import scvi` failed with {python}: {last}")
    return None, "; ".join(reasons) or "no Python with scvi-tools given (SCVI_PYTHON)"


def data_file(a: argparse.Namespace, tmp: Path) -> tuple[str, str, list[tuple[str, int]]]:
    """The .h5ad to time on, what it is, and its (label, n_genes) cases."""
    if a.tiny:  # the pipeline on a few hundred generated cells, all genes and a top-N subset
        path = tmp / "tiny.h5ad"
        write_generated(path, TINY["cells"], TINY["genes"])
        return str(path), f"generated {TINY['cells']} cells", [("all genes", 0), (f"top {TINY['top']}",
                                                                                   TINY["top"])]
    found = a.h5ad or next((str(p) for p in H5AD_CANDIDATES if p.exists()), None)
    if found:
        return found, "CellBench 5cl" if "cellbench_5cl" in found else found, CASES
    path = tmp / "generated.h5ad"  # CellBench 5cl's size: 909 cells x 12,653 genes
    write_generated(path, 909, 12653)
    return str(path), "generated stand-in for CellBench 5cl (file not found)", CASES


def run_child(side: str, python: str, h5ad: str, n_genes: int, a: argparse.Namespace, tmp: Path,
              timeout: float, log) -> dict:
    """One worker under ``timeout`` seconds: its JSON, or ``{"status": "timeout" | "failed", ...}``."""
    out = tmp / f"{side}_{n_genes}.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--worker-out", str(out), "--h5ad", h5ad,
           "--n-genes", str(n_genes), "--epochs", str(a.epochs), "--device", a.device, "--seed", str(a.seed),
           "--threads", str(a.threads)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    log.write(f"\n===== {SIDES[side]}, n_genes={n_genes}, timeout {timeout:.0f} s\n")
    log.flush()
    try:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    if done.returncode != 0 or not out.exists():
        return {"status": "failed", "exit": done.returncode, "wall_s": wall}
    return dict(json.loads(out.read_text()), status="ok", wall_s=wall)


#: (label, key of the worker's JSON, format) of the table's rows
ROWS = [
    ("first epoch, s (warm-up)", "first_epoch_s", "{:.2f}"),
    ("s/epoch", "s_per_epoch", "{:.3f}"),
    ("DE one-vs-rest vanilla, s", "de_s", "{:.2f}"),
    ("peak GPU MiB, training", "peak_train_mb", "{:.0f}"),
    ("peak GPU MiB, DE", "peak_de_mb", "{:.0f}"),
]


def _cell(result: dict | None, key: str, fmt: str) -> str:
    if result is None:
        return "skipped"
    if result.get("status") != "ok":
        return result.get("status", "?")
    value = result.get(key)
    return "n/a" if value is None else fmt.format(value)


def table(cases: list[dict]) -> str:
    """One markdown table: a block of rows per data set, pyro-scvi and scvi-tools side by side."""
    lines = ["| data | figure | pyro-scvi | scvi-tools | ratio pyro/scvi |", "|---|---|---:|---:|---:|"]
    for case in cases:
        pyro, peer = case["results"].get("pyro"), case["results"].get("scvi")
        for i, (label, key, fmt) in enumerate(ROWS):
            ratio = "n/a"
            if pyro and peer and pyro.get("status") == peer.get("status") == "ok":
                if pyro.get(key) is not None and peer.get(key):
                    ratio = f"{pyro[key] / peer[key]:.2f}"
            name = case["label"] if i == 0 else ""
            cells = [name, label, _cell(pyro, key, fmt), _cell(peer, key, fmt), ratio]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
            "cuda_available": torch.cuda.is_available()}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    return info


def parent(a: argparse.Namespace) -> int:
    deadline = time.monotonic() + a.budget_s
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peer_python, peer_note = scvi_python(a.scvi_python, sys.executable)
    if a.skip_peer:
        peer_python, peer_note = None, "--skip-peer"
    print(f"scvi-tools side: {peer_note if peer_python else 'skipped: ' + peer_note}", flush=True)
    sides = {"pyro": sys.executable, **({"scvi": peer_python} if peer_python else {})}
    result = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": a.device,
              "epochs": a.epochs, "threads": a.threads, "machine": machine_info(), **device_info(a.device),
              "scvi_tools": peer_note if peer_python else f"skipped: {peer_note}", "cases": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, open(out_dir / "workers.log", "w") as log:
        h5ad, what, cases = data_file(a, Path(tmp))
        result["data"] = what
        for label, n_genes in cases:
            case = {"label": f"{what}, {label}", "n_genes": n_genes, "results": {}}
            for side, python in sides.items():
                left = deadline - time.monotonic() - RESERVE_S
                if left < a.min_child_s:
                    case["results"][side] = {"status": "skipped (time budget)"}
                    continue
                timeout = min(a.child_timeout_s, left)
                print(f"[{datetime.now():%H:%M:%S}] {SIDES[side]}, {case['label']} (timeout {timeout:.0f} s)",
                      flush=True)
                case["results"][side] = run_child(side, python, h5ad, n_genes, a, Path(tmp), timeout, log)
                print(f"    {case['results'][side]['status']}, {case['results'][side]['wall_s']:.1f} s",
                      flush=True)
            result["cases"].append(case)
    if a.tests_log and Path(a.tests_log).exists():
        lines = Path(a.tests_log).read_text().strip().splitlines()
        result["cuda_tests"] = {"exit": a.tests_rc, "summary": lines[-1] if lines else ""}
    markdown = report(result)
    print("\n" + markdown, flush=True)
    (out_dir / "gpu_check.md").write_text(markdown + "\n")
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out_dir / 'gpu_check.md'} and {out_dir / 'gpu_check.json'}")
    ok = all(r.get("status") == "ok" for case in result["cases"] for r in case["results"].values())
    return 0 if ok else 1


def report(result: dict) -> str:
    gpu = result.get("gpu", "no GPU (CPU dry run)" if result["device"] == "cpu" else "CUDA not available")
    head = [f"## GPU check, {result['date_utc']}", "",
            f"- device: {gpu}; torch {result['torch']} (CUDA {result['torch_cuda']}), "
            f"Python {result['python']}, CPU: {result['machine']['cpu']}",
            f"- data: {result['data']}; {result['epochs']} timed epochs after one warm-up epoch, "
            "validation every epoch, batch size 128",
            f"- scvi-tools: {result['scvi_tools']}"]
    if "cuda_tests" in result:
        head.append(f"- CUDA tests (pytest -m cuda): exit {result['cuda_tests']['exit']}, "
                    f"{result['cuda_tests']['summary']}")
    return "\n".join(head + ["", table(result["cases"])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="a few hundred generated cells (dry run of the pipeline)")
    p.add_argument("--h5ad", help="CellBench 5cl .h5ad (default: the first of H5AD_CANDIDATES that exists)")
    p.add_argument("--epochs", type=int, help="timed epochs after the warm-up (default 10; 2 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=4, help="torch CPU threads of each child")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of all the children")
    p.add_argument("--child-timeout-s", type=float, default=90.0, help="at most this long per child")
    p.add_argument("--min-child-s", type=float, default=20.0,
                   help="skip a child with less time than this left")
    p.add_argument("--scvi-python", default=os.environ.get("SCVI_PYTHON"), help="a Python with scvi-tools")
    p.add_argument("--skip-peer", action="store_true", help="time pyro-scvi only")
    p.add_argument("--out", default=str(HERE / "results" / "gpu_check"))
    p.add_argument("--tests-log", help="log of the CUDA tests, summarised in the report")
    p.add_argument("--tests-rc", type=int, help="exit status of the CUDA tests")
    p.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--n-genes", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.epochs is None:
        a.epochs = TINY["epochs"] if a.tiny else 10
    if a.worker:
        worker(a)
        return 0
    return parent(a)


if __name__ == "__main__":
    sys.exit(main())
