"""How often does the scVI stage of ``bench_scanvi.py`` end with a near-zero latent scale, in each
package? Over ``--seeds``, each package trains scVI on the ``cellbench_3cl`` reference (scArches
tutorial settings, ``--epochs`` epochs, one thread) and reports the standard deviation of the
encoder means across cells, averaged over latent dimensions. A tiny scale (below about 0.01) is
what the seeds share whose scANVI classifier learns too slowly (see ``benchmarks/README.md``).

    .venv/bin/python benchmarks/scvi_latent_scale.py --seeds 0-29

pyro-scvi runs in this process's Python, scvi-tools in a child with ``--scvi-python``; the two run
side by side (one thread each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cellbench import DEFAULT_SCVI_PYTHON, REPO  # noqa: E402


def latent_scales(tool: str, ref_path: str, seeds: list[int], epochs: int) -> list[float]:
    import anndata as ad
    import bench_scanvi
    import torch

    torch.set_num_threads(1)
    if tool == "pyro-scvi":
        sys.path.insert(0, str(REPO))
        from pyro_scvi import SCVI, settings
    else:
        import scvi
        from scvi.model import SCVI

        settings = scvi.settings
    scales = []
    for seed in seeds:
        settings.seed = seed
        ref = ad.read_h5ad(ref_path)
        SCVI.setup_anndata(ref, batch_key="batch", labels_key=bench_scanvi.LABELS)
        vae = SCVI(ref, **bench_scanvi.ARCHES)
        vae.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False)
        scales.append(float(vae.get_latent_representation().std(0).mean()))
    return scales


def summary(tool: str, scales: list[float]) -> str:
    small = sum(s < 0.01 for s in scales)
    return (f"{tool}: {len(scales)} seeds, median latent scale {statistics.median(scales):.4f}, "
            f"below 0.01 in {small} ({small / len(scales):.0%}), below 0.02 in "
            f"{sum(s < 0.02 for s in scales)}; sorted: {', '.join(f'{s:.3f}' for s in sorted(scales))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-29", help="A-B (inclusive) or a comma-separated list")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--scvi-python", default=DEFAULT_SCVI_PYTHON)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if "-" in a.seeds:
        first, last = map(int, a.seeds.split("-"))
        seeds = list(range(first, last + 1))
    else:
        seeds = [int(s) for s in a.seeds.split(",")]
    warnings.simplefilter("ignore")
    if a.worker:
        Path(a.out).write_text(json.dumps(latent_scales(a.worker, a.ref, seeds, a.epochs)))
        return
    import bench_scanvi

    if not bench_scanvi.DATA_DIR.exists() or not Path(a.scvi_python).exists():
        print("needs ../shared/data and the scvi-tools venv; nothing run")
        return
    tmp = Path(tempfile.mkdtemp())
    split = bench_scanvi.build_split("cellbench_3cl", tmp)
    runs = {}
    for tool, python in (("pyro-scvi", sys.executable), ("scvi-tools", a.scvi_python)):
        out = tmp / f"{tool}.json"
        command = [python, str(Path(__file__).resolve()), "--worker", tool, "--ref", split["ref"]["path"],
                   "--seeds", a.seeds, "--epochs", str(a.epochs), "--out", str(out)]
        runs[tool] = (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    for tool, (process, out) in runs.items():
        if process.wait() != 0:
            raise SystemExit(f"{tool} worker failed")
        print(summary(tool, json.loads(out.read_text())))


if __name__ == "__main__":
    main()
