"""Round trips through the real scvi-tools ``SCVI.load``, with pyro-scvi's reader and writer.

1. *fixture*: read the scvi-tools 1.4.2 fixture with ``read_scvi_tools_model`` (safe reader),
   write it back with ``write_scvi_tools_model`` and load that with ``scvi.model.SCVI.load``;
   compare ``get_latent_representation(return_dist=True)`` with the fixture's
   ``latent_mean.npy``/``latent_var.npy``.
2. *ours*: train a small pyro-scvi model (2 epochs, generated data, ``var_activation="softplus"``),
   export it with ``write_scvi_tools_model`` and compare scvi-tools' latent mean/variance with ours.
3. *SCANVI fixture*: load ``tests/fixtures/scvi_tools_scanvi_1.4.2`` with ``pyro_scvi.SCANVI.load``,
   export it with ``save(scvi_tools_format=True)``, load that with ``scvi.model.SCANVI.load`` and
   compare its ``predict(soft=True)`` and latent with the fixture's (scvi-tools' own) outputs; the
   same for the fixture relabelled as written by scvi-tools 1.0.3 (classifier ending in a softmax).
4. *SCANVI ours*: train a small pyro-scvi SCANVI (linear classifier, 2 epochs), export it and
   compare scvi-tools' ``predict(soft=True)`` and latent with ours.

Run with this project's Python (from the repository root)::

    .venv/bin/python benchmarks/check_scvi_tools_roundtrip.py

scvi-tools runs in a child process with the Python of a separate venv (``--scvi-python``, default
``/work/scvi-venv/bin/python``); pyro-scvi never imports it. Prints PASS/FAIL per check; exits 0
with a note when that venv (or the fixture, for check 1) is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyro_scvi import SCANVI, SCVI  # noqa: E402
from pyro_scvi.data import synthetic_iid  # noqa: E402
from pyro_scvi.io.model_file import read_payload  # noqa: E402
from pyro_scvi.io.native import from_safe  # noqa: E402
from pyro_scvi.io.scvi_tools import read_scvi_tools_model, write_scvi_tools_model  # noqa: E402

FIXTURE = REPO.parent / "shared" / "fixtures" / "scvi_tools_cellbench5"
SCANVI_FIXTURE = REPO / "tests" / "fixtures" / "scvi_tools_scanvi_1.4.2"

CHILD = r"""
import json, sys, warnings
import anndata, numpy as np
import scvi
model_dir, adata_path, mean_path, var_path = sys.argv[1:5]
warnings.simplefilter("ignore")
model = scvi.model.SCVI.load(model_dir, adata=anndata.read_h5ad(adata_path), accelerator="cpu")
mean, var = model.get_latent_representation(return_dist=True)
print(json.dumps({
    "scvi_version": scvi.__version__,
    "is_trained": bool(model.is_trained_),
    "history_keys": sorted(model.history_) if model.history_ is not None else None,
    "n_train_indices": int(len(model.train_indices)),
    "setup_args": dict(model.registry_["setup_args"]),
    "var_activation": repr(model.module.z_encoder.var_activation),
    "max_abs_diff_mean": float(np.abs(mean - np.load(mean_path)).max()),
    "max_abs_diff_var": float(np.abs(var - np.load(var_path)).max()),
}))
"""


SCANVI_CHILD = r"""
import json, sys, warnings
import anndata, numpy as np
import scvi
model_dir, adata_path, soft_path, latent_path = sys.argv[1:5]
warnings.simplefilter("ignore")
model = scvi.model.SCANVI.load(model_dir, adata=anndata.read_h5ad(adata_path), accelerator="cpu")
soft = model.predict(soft=True)
print(json.dumps({
    "scvi_version": scvi.__version__,
    "is_trained": bool(model.is_trained_),
    "n_labels": int(model.n_labels),
    "columns": [str(c) for c in soft.columns],
    "classifier_ends_in_softmax": type(model.module.classifier.classifier[-1]).__name__ == "Softmax",
    "max_abs_diff_soft": float(np.abs(soft.to_numpy() - np.load(soft_path)).max()),
    "max_abs_diff_latent": float(np.abs(model.get_latent_representation() - np.load(latent_path)).max()),
}))
"""


def run_child(scvi_python: Path, model_dir: Path, adata_path: Path, mean_path: Path, var_path: Path,
              cwd: str, child: str = CHILD):
    proc = subprocess.run([str(scvi_python), "-c", child, str(model_dir), str(adata_path), str(mean_path),
                           str(var_path)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        print(proc.stderr[-3000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(name: str, result: dict | None, tolerance: float) -> bool:
    if result is None:
        print(f"FAIL [{name}]: scvi.model.SCVI.load could not load the exported model.")
        return False
    print(json.dumps(result, indent=2))
    worst = max(result["max_abs_diff_mean"], result["max_abs_diff_var"])
    ok = worst <= tolerance and result["is_trained"]
    print(f"{'PASS' if ok else 'FAIL'} [{name}]: scvi-tools {result['scvi_version']} "
          f"loaded the exported model; "
          f"latent mean max |diff| = {result['max_abs_diff_mean']:.3g}, "
          f"latent var max |diff| = {result['max_abs_diff_var']:.3g} (tolerance {tolerance:g}).")
    return ok


def check_fixture(scvi_python: Path, fixture: Path, tolerance: float, tmp: str) -> bool:
    saved = read_scvi_tools_model(fixture / "model")
    out = Path(tmp) / "fixture_exported"
    write_scvi_tools_model(out, saved["model_state_dict"], saved["var_names"], saved["attr_dict"])
    result = run_child(scvi_python, out, fixture / "model" / "adata.h5ad", fixture / "latent_mean.npy",
                       fixture / "latent_var.npy", tmp)
    return report("fixture", result, tolerance)


def check_ours(scvi_python: Path, tolerance: float, tmp: str) -> bool:
    adata = synthetic_iid(batch_size=150, n_genes=60, n_batches=2, n_labels=3, seed=0)
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = SCVI(adata, n_latent=5, var_activation="softplus")
    model.train(max_epochs=2, enable_progress_bar=False)
    mean, var = model.get_latent_representation(return_dist=True)
    ours = Path(tmp) / "ours"
    model.save(ours, save_anndata=True)
    np.save(Path(tmp) / "ours_mean.npy", mean)
    np.save(Path(tmp) / "ours_var.npy", var)
    _, payload = read_payload(ours)
    attrs = from_safe(payload["attr_dict"])
    attrs["history_"] = payload["attr_dict"]["history_"]
    out = Path(tmp) / "ours_exported"
    write_scvi_tools_model(out, payload["model_state_dict"], payload["var_names"], attrs)
    result = run_child(scvi_python, out, ours / "adata.h5ad", Path(tmp) / "ours_mean.npy",
                       Path(tmp) / "ours_var.npy", tmp)
    return report("pyro-scvi model", result, tolerance)


def report_scanvi(name: str, result: dict | None, tolerance: float, softmax: bool = False) -> bool:
    if result is None:
        print(f"FAIL [{name}]: scvi.model.SCANVI.load could not load the exported model.")
        return False
    print(json.dumps(result, indent=2))
    worst = max(result["max_abs_diff_soft"], result["max_abs_diff_latent"])
    ok = worst <= tolerance and result["is_trained"] and result["classifier_ends_in_softmax"] == softmax
    print(f"{'PASS' if ok else 'FAIL'} [{name}]: scvi-tools {result['scvi_version']} loaded the exported "
          f"SCANVI (L={result['n_labels']}, softmax classifier: {result['classifier_ends_in_softmax']}); "
          f"predict(soft=True) max |diff| = {result['max_abs_diff_soft']:.3g}, "
          f"latent max |diff| = {result['max_abs_diff_latent']:.3g} (tolerance {tolerance:g}).")
    return ok


def check_scanvi_fixture(scvi_python: Path, tolerance: float, tmp: str) -> bool:
    data = np.load(SCANVI_FIXTURE / "data.npz")
    obs = pd.DataFrame({"batch": data["batch"], "cell_type": data["cell_type"]}, index=data["obs_names"])
    adata = anndata.AnnData(X=data["counts"].astype(np.float32), obs=obs,
                            var=pd.DataFrame(index=data["var_names"]))
    adata_path = Path(tmp) / "scanvi_fixture.h5ad"
    adata.write_h5ad(adata_path)
    soft, latent = SCANVI_FIXTURE / "predict_soft.npy", SCANVI_FIXTURE / "latent.npy"
    ok = True
    for name, version in (("SCANVI fixture", None), ("SCANVI fixture as 1.0.3", "1.0.3")):
        source = SCANVI_FIXTURE / "model"
        if version is not None:  # the same file, with the registry of an scvi-tools < 1.1 save
            _, payload = read_payload(source)
            saved = read_scvi_tools_model(source)
            attrs = dict(payload["attr_dict"], registry_=dict(payload["attr_dict"]["registry_"],
                                                               scvi_version=version))
            source = Path(tmp) / "scanvi_old"
            write_scvi_tools_model(source, saved["model_state_dict"], saved["var_names"], attrs)
        model = SCANVI.load(source, adata.copy())
        out = Path(tmp) / f"scanvi_fixture_exported_{version}"
        model.save(out, scvi_tools_format=True)
        result = run_child(scvi_python, out, adata_path, soft, latent, tmp, SCANVI_CHILD)
        ok &= report_scanvi(name, result, tolerance, softmax=version is not None)
    return ok


def check_scanvi_ours(scvi_python: Path, tolerance: float, tmp: str) -> bool:
    adata = synthetic_iid(batch_size=150, n_genes=60, n_batches=2, n_labels=3, seed=0)
    labels = np.asarray(adata.obs["labels"].astype(str), dtype=object)
    labels[::4] = "Unknown"
    adata.obs["partial"] = labels
    SCANVI.setup_anndata(adata, labels_key="partial", unlabeled_category="Unknown", batch_key="batch")
    model = SCANVI(adata, n_latent=5, linear_classifier=True)
    model.train(max_epochs=2, enable_progress_bar=False)
    np.save(Path(tmp) / "scanvi_soft.npy", model.predict(soft=True).to_numpy())
    np.save(Path(tmp) / "scanvi_latent.npy", model.get_latent_representation())
    out = Path(tmp) / "scanvi_ours_exported"
    model.save(out, scvi_tools_format=True, save_anndata=True)
    result = run_child(scvi_python, out, out / "adata.h5ad", Path(tmp) / "scanvi_soft.npy",
                       Path(tmp) / "scanvi_latent.npy", tmp, SCANVI_CHILD)
    return report_scanvi("SCANVI pyro-scvi model", result, tolerance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scvi-python", default="/work/scvi-venv/bin/python")
    parser.add_argument("--fixture", default=str(FIXTURE))
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max abs latent difference for PASS")
    args = parser.parse_args()
    torch.set_num_threads(1)

    scvi_python, fixture = Path(args.scvi_python), Path(args.fixture)
    if not scvi_python.exists():
        print(f"SKIP: {scvi_python} not found (no scvi-tools venv); nothing checked.")
        return 0
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if (fixture / "model" / "model.pt").exists():
            ok &= check_fixture(scvi_python, fixture, args.tolerance, tmp)
        else:
            print(f"SKIP [fixture]: {fixture} not found.")
        ok &= check_ours(scvi_python, args.tolerance, tmp)
        ok &= check_scanvi_fixture(scvi_python, args.tolerance, tmp)
        ok &= check_scanvi_ours(scvi_python, args.tolerance, tmp)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
