"""Round trip through scvi-tools: read the scvi-tools fixture with pyro-scvi's safe reader, write
it back with ``write_scvi_tools_model``, and load the result with the real ``scvi.model.SCVI.load``.

Run with this project's Python (from the repository root)::

    .venv/bin/python benchmarks/check_scvi_tools_roundtrip.py

scvi-tools runs in a child process with the Python of a separate venv (``--scvi-python``, default
``/work/scvi-venv/bin/python``); pyro-scvi never imports it. The child prints the largest absolute
difference of ``get_latent_representation()`` (mean and, with ``return_dist=True``, variance)
from the fixture's ``latent_mean.npy``/``latent_var.npy``. Exits 0 with a note when that venv or
the fixture is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyro_scvi.io_scvi_tools import read_scvi_tools_model, write_scvi_tools_model  # noqa: E402

FIXTURE = REPO.parent / "shared" / "fixtures" / "scvi_tools_cellbench5"

CHILD = r"""
import json, sys, warnings
import anndata, numpy as np
import scvi
model_dir, fixture = sys.argv[1], sys.argv[2]
warnings.simplefilter("ignore")
adata = anndata.read_h5ad(fixture + "/model/adata.h5ad")
model = scvi.model.SCVI.load(model_dir, adata=adata, accelerator="cpu")
mean, var = model.get_latent_representation(return_dist=True)
print(json.dumps({
    "scvi_version": scvi.__version__,
    "is_trained": bool(model.is_trained_),
    "history_keys": sorted(model.history_) if model.history_ is not None else None,
    "n_train_indices": int(len(model.train_indices)),
    "setup_args": {k: v for k, v in model.registry_["setup_args"].items()},
    "max_abs_diff_mean": float(np.abs(mean - np.load(fixture + "/latent_mean.npy")).max()),
    "max_abs_diff_var": float(np.abs(var - np.load(fixture + "/latent_var.npy")).max()),
}))
"""


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
    if not (fixture / "model" / "model.pt").exists():
        print(f"SKIP: fixture {fixture} not found; nothing checked.")
        return 0

    saved = read_scvi_tools_model(fixture / "model")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "exported"
        write_scvi_tools_model(out, saved["model_state_dict"], saved["var_names"], saved["attr_dict"])
        proc = subprocess.run([str(scvi_python), "-c", CHILD, str(out), str(fixture)],
                              capture_output=True, text=True, cwd=tmp, timeout=600)
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        print(proc.stderr[-4000:])
        print("FAIL: scvi.model.SCVI.load could not load the exported model.")
        return 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    worst = max(result["max_abs_diff_mean"], result["max_abs_diff_var"])
    ok = worst <= args.tolerance and result["is_trained"]
    print(f"{'PASS' if ok else 'FAIL'}: scvi-tools {result['scvi_version']} loaded the exported model; "
          f"latent mean max |diff| = {result['max_abs_diff_mean']:.3g}, "
          f"latent var max |diff| = {result['max_abs_diff_var']:.3g} (tolerance {args.tolerance:g}).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
