"""Round trips through the real scvi-tools ``SCVI.load``, with pyro-scvi's reader and writer.

1. *fixture*: read the scvi-tools 1.4.2 fixture with ``read_scvi_tools_model`` (safe reader),
   write it back with ``write_scvi_tools_model`` and load that with ``scvi.model.SCVI.load``;
   compare ``get_latent_representation(return_dist=True)`` with the fixture's
   ``latent_mean.npy``/``latent_var.npy``.
2. *ours*: train a small pyro-scvi model (2 epochs, generated data, ``var_activation="softplus"``),
   export it with ``write_scvi_tools_model`` and compare scvi-tools' latent mean/variance with ours.

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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyro_scvi import SCVI  # noqa: E402
from pyro_scvi.data import synthetic_iid  # noqa: E402
from pyro_scvi.io.model_file import read_payload  # noqa: E402
from pyro_scvi.io.native import from_safe  # noqa: E402
from pyro_scvi.io.scvi_tools import read_scvi_tools_model, write_scvi_tools_model  # noqa: E402

FIXTURE = REPO.parent / "shared" / "fixtures" / "scvi_tools_cellbench5"

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


def run_child(scvi_python: Path, model_dir: Path, adata_path: Path, mean_path: Path, var_path: Path,
              cwd: str):
    proc = subprocess.run([str(scvi_python), "-c", CHILD, str(model_dir), str(adata_path), str(mean_path),
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scvi-python", default="/work/scvi-venv/bin/python")
    parser.add_argument("--fixture", default=str(FIXTURE))
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max abs latent difference for PASS")
    args = parser.parse_args()

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
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
