"""Is a weak scANVI classifier the scANVI stage's doing or the scVI model's? Both packages' scANVI
stages start from the *same* pyro-scvi scVI model.

1. pyro-scvi trains scVI on the ``cellbench_3cl`` reference of ``bench_scanvi.py`` (its settings,
   ``--scvi-seed``, ``--epochs`` scVI epochs) and saves it in scvi-tools' format;
2. for each of ``--seeds``, pyro-scvi and scvi-tools (a child process with ``--scvi-python``) each
   run ``SCANVI.from_scvi_model(vae, "Unknown")`` and ``train(max_epochs=20, n_samples_per_label=100)``
   and print the final training accuracy of the classifier.

Run from the repository root (needs ``../shared/data`` and the scvi-tools venv)::

    .venv/bin/python benchmarks/scanvi_stage_crosscheck.py --scvi-seed 0 --seeds 0,1,2,3,4,5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cellbench import DEFAULT_SCVI_PYTHON, REPO  # noqa: E402

SCANVI_EPOCHS = 20


def scanvi_accuracies(SCANVI, set_seed, vae, seeds: list[int], label: str) -> None:
    for seed in seeds:
        set_seed(seed)
        model = SCANVI.from_scvi_model(vae, "Unknown")
        model.train(max_epochs=SCANVI_EPOCHS, n_samples_per_label=100, batch_size=128,
                    enable_progress_bar=False)
        accuracy = float(model.history["train_accuracy"].iloc[-1, 0])
        print(f"{label}: scANVI seed {seed}, train accuracy after {SCANVI_EPOCHS} epochs {accuracy:.3f}",
              flush=True)


def scvi_tools_worker(a: argparse.Namespace) -> None:
    import anndata as ad
    import scvi
    import torch
    from scvi.model import SCANVI, SCVI

    torch.set_num_threads(a.threads)
    vae = SCVI.load(a.model, adata=ad.read_h5ad(a.ref))
    scanvi_accuracies(SCANVI, lambda s: setattr(scvi.settings, "seed", s), vae, a.seed_list, "scvi-tools")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scvi-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--epochs", type=int, default=100, help="scVI epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scvi-python", default=DEFAULT_SCVI_PYTHON)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    a = parser.parse_args()
    a.seed_list = [int(s) for s in a.seeds.split(",")]
    warnings.simplefilter("ignore")
    if a.worker:
        scvi_tools_worker(a)
        return
    import bench_scanvi

    if not bench_scanvi.DATA_DIR.exists() or not Path(a.scvi_python).exists():
        print("needs ../shared/data and the scvi-tools venv; nothing run")
        return
    import anndata as ad
    import torch

    sys.path.insert(0, str(REPO))
    from pyro_scvi import SCANVI, SCVI, settings

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    split = bench_scanvi.build_split("cellbench_3cl", tmp)
    settings.seed = a.scvi_seed
    ref = ad.read_h5ad(split["ref"]["path"])
    SCVI.setup_anndata(ref, batch_key="batch", labels_key=bench_scanvi.LABELS)
    vae = SCVI(ref, **bench_scanvi.ARCHES)
    vae.train(max_epochs=a.epochs, batch_size=128, enable_progress_bar=False)
    latent = vae.get_latent_representation()
    print(f"pyro-scvi scVI, seed {a.scvi_seed}: std of the latent means across cells "
          f"{latent.std(0).mean():.4f}")
    vae.save(tmp / "scvi", scvi_tools_format=True, overwrite=True)
    scanvi_accuracies(SCANVI, lambda s: setattr(settings, "seed", s), vae, a.seed_list, "pyro-scvi")
    worker = [a.scvi_python, str(Path(__file__).resolve()), "--worker", "--model", str(tmp / "scvi"),
              "--ref", split["ref"]["path"], "--seeds", a.seeds, "--threads", str(a.threads)]
    subprocess.run(worker, check=True)


if __name__ == "__main__":
    main()
