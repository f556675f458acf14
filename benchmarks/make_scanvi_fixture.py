"""Write ``tests/fixtures/scvi_tools_scanvi_1.4.2/``: a small SCANVI trained and saved by scvi-tools.

Run it with the Python of the separate scvi-tools 1.4.2 venv (pyro-scvi never imports scvi), from
the repository root::

    /work/scvi-venv/bin/python benchmarks/make_scanvi_fixture.py

The counts are drawn here with numpy (300 cells x 100 genes, three cell types "alpha", "beta",
"delta" with their own gene means, two batches with a per-gene batch factor, gamma-Poisson
counts) and stored in ``data.npz`` so that the tests rebuild the same AnnData without this venv.
A quarter of the cells get the unlabeled category ``"Unknown"``; as a plain string column it sorts
first, so scvi-tools' label mapping swaps it with the last category (``[delta, alpha, beta,
Unknown]``).

The model: ``SCVI(n_hidden=32, n_latent=5)`` trained 5 epochs, then ``SCANVI.from_scvi_model``
trained 3 epochs (``scvi.settings.seed = 0``, CPU, batch_key="batch"). Saved: ``model/model.pt``
(no AnnData), and in plain ``.npy`` files (no pickles): ``predict_soft.npy`` (float32, cells x L),
``predict_soft_columns.npy`` and ``predict_hard.npy`` (unicode strings) and ``latent.npy``
(``get_latent_representation()``, the mean of q(z1 | x)).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

N_CELLS, N_GENES = 300, 100
TYPES = np.array(["alpha", "beta", "delta"])
UNLABELED = "Unknown"


def generate(seed: int = 0) -> dict:
    """Counts, batches and labels of the fixture (plain numpy arrays)."""
    rng = np.random.default_rng(seed)
    cell_type = rng.integers(0, len(TYPES), N_CELLS)
    batch = rng.integers(0, 2, N_CELLS)
    type_means = rng.gamma(2.0, 1.0, size=(len(TYPES), N_GENES)) * 2.0  # (T, G)
    batch_factor = np.exp(rng.normal(0.0, 0.3, size=(2, N_GENES)))  # (2, G)
    size = rng.lognormal(0.0, 0.3, size=(N_CELLS, 1))  # (N, 1)
    mean = type_means[cell_type] * batch_factor[batch] * size  # (N, G)
    rate = rng.gamma(5.0, mean / 5.0)  # NB with inverse dispersion 5
    counts = rng.poisson(rate).astype(np.int32)
    labels = TYPES[cell_type].astype(object)
    labels[rng.random(N_CELLS) < 0.25] = UNLABELED
    return {
        "counts": counts,
        "batch": np.array([f"batch_{b}" for b in batch]),
        "cell_type": labels.astype(str),
        "obs_names": np.array([f"cell_{i}" for i in range(N_CELLS)]),
        "var_names": np.array([f"gene_{j}" for j in range(N_GENES)]),
    }


def main() -> None:
    import anndata
    import pandas as pd
    import scvi
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"
                                             / "scvi_tools_scanvi_1.4.2"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    scvi.settings.seed = 0
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    data = generate()
    np.savez_compressed(out / "data.npz", **data)
    obs = pd.DataFrame({"batch": data["batch"], "cell_type": data["cell_type"]}, index=data["obs_names"])
    adata = anndata.AnnData(X=data["counts"].astype(np.float32), obs=obs,
                            var=pd.DataFrame(index=data["var_names"]))

    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    vae = scvi.model.SCVI(adata, n_hidden=32, n_latent=5)
    vae.train(max_epochs=5, accelerator="cpu", enable_progress_bar=False)
    model = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNLABELED)
    model.train(max_epochs=3, accelerator="cpu", enable_progress_bar=False)
    model.save(out / "model", save_anndata=False)

    soft = model.predict(soft=True)
    np.save(out / "predict_soft.npy", soft.to_numpy().astype(np.float32))
    np.save(out / "predict_soft_columns.npy", np.asarray(soft.columns, dtype=str))
    np.save(out / "predict_hard.npy", np.asarray(model.predict(), dtype=str))
    np.save(out / "latent.npy", model.get_latent_representation().astype(np.float32))
    print("scvi-tools", scvi.__version__, "label mapping",
          list(model.adata_manager.get_state_registry("labels")["categorical_mapping"]),
          "n_labels", model.n_labels, "->", out)


if __name__ == "__main__":
    main()
