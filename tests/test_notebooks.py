"""The notebooks of ``notebooks/`` run from top to bottom and are stored without outputs.

Each notebook is executed with nbclient in a Jupyter kernel of *this* interpreter (a kernelspec
written to a temporary folder and found through ``JUPYTER_PATH``; the first cell checks
``sys.prefix``), from the ``notebooks/`` folder as working directory, with matplotlib's ``Agg``
backend and one OpenMP/MKL thread (on a busy 2-core machine torch's thread pool otherwise slows
training by orders of magnitude). Small settings come from a cell injected right after the
notebook's ``parameters`` cell (papermill's convention, done by hand). A failing cell fails the
test with its index, its source and the error; the executed notebook is written to the test's
temporary folder for inspection.

``make strip-notebooks`` (``python notebooks/strip_outputs.py``) removes outputs before a commit.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel runs `python -m ipykernel_launcher`)
import nbformat
import pytest
from nbclient import NotebookClient

pytest.importorskip("matplotlib")  # the notebooks plot (the `plot` extra)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "pyro-scvi-tests"
CELL_TIMEOUT = 180  # seconds per cell
#: small settings per notebook: a few epochs, the top 100 genes, few cells and Monte-Carlo samples (every
#: code path still runs; the numbers mean nothing at this size)
SMALL = {
    "quickstart.ipynb": {"MAX_EPOCHS": 3, "N_GENES": 100, "DE_SAMPLES": 100},
    "priors.ipynb": {"MAX_EPOCHS": 3, "N_GENES": 100, "N_COMPONENTS": 3, "N_MC_SAMPLES": 10},
    "diagnostics.ipynb": {"MAX_EPOCHS": 3, "N_GENES": 100, "N_CHECK_CELLS": 30, "N_DRAWS": 20,
                          "N_MC_SAMPLES": 20, "N_PPC_SAMPLES": 5},
    "scanvi.ipynb": {"SCVI_EPOCHS": 3, "SCANVI_EPOCHS": 2, "N_GENES": 100, "N_SAMPLES_PER_LABEL": 10},
    "posteriors.ipynb": {"MAX_EPOCHS": 3, "N_GENES": 100, "N_MC_SAMPLES": 20, "N_EVAL_CELLS": 16,
                         "CONFIGS": [("normal", "elbo", 1), ("normal", "iwae", 4), ("full_rank", "elbo", 1),
                                     ("flow", "elbo", 1)],
                         "N_DE_SEEDS": 2, "DE_SAMPLES": 100, "DE_MC_SAMPLES": 10, "REFINE_STEPS": 2,
                         "DE_MAX_CELLS": 32},
}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _cellbench_reachable() -> bool:
    """What the notebooks' ``find_cellbench`` finds from ``notebooks/``: shared/data in it or above."""
    return any(
        (folder / "shared" / "data" / "cellbench_5cl.h5ad").is_file()
        for folder in (NOTEBOOKS, *NOTEBOOKS.parents)
    )


def test_every_notebook_has_small_settings():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_is_stored_without_outputs(name):
    """Outputs, execution counts and execution metadata are stripped (run `make strip-notebooks`)."""
    nb = _read(name)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None or "execution" in cell.metadata)]
    assert not dirty, f"{name}: cells {dirty} hold outputs; run `make strip-notebooks`."
    assert "widgets" not in nb.metadata, f"{name}: widget state in the metadata; run `make strip-notebooks`."
    parameters = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and parameters[0].cell_type == "code", (
        f"{name}: needs one code cell tagged 'parameters'."
    )
    for key in SMALL[name]:  # every overridden setting is a parameter of the notebook
        assert re.search(rf"^{key} = ", parameters[0].source, re.M), (
            f"{name}: no parameter {key} to override."
        )


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec running ``sys.executable`` (the venv's python) with the Agg backend."""
    folder = tmp_path_factory.mktemp("jupyter")
    spec = folder / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    env = {"MPLBACKEND": "Agg", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pyro-scvi tests", "language": "python", "env": env,
    }))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(folder), prepend=os.pathsep)
        for key, value in env.items():
            patch.setenv(key, value)
        yield KERNEL_NAME


def _injected(settings: dict) -> str:
    lines = ["# injected by tests/test_notebooks.py: small settings, and a check of the interpreter"]
    lines += [f"{key} = {value!r}" for key, value in settings.items()]
    lines += [
        "import sys",
        f"assert sys.prefix == {sys.prefix!r}, f'kernel runs {{sys.executable}}, not {sys.executable}'",
        # PCA for the latent plots: umap-learn's first call compiles with numba for ~40 s in every kernel;
        # the UMAP path is tested once, by tests/test_cli.py's demo --plots
        "import pyro_scvi.plotting",
        "pyro_scvi.plotting._umap_available = lambda: False",
    ]
    return "\n".join(lines)


def _text(cell) -> str:
    """The stream and plain-text outputs of a code cell."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def run_notebook(nb, name: str, out_dir: Path, kernel_name: str):
    """Execute ``nb`` cell by cell; on a failure, fail with the cell's index, source and error."""
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    timings, failure = [], None
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            start = time.perf_counter()
            try:
                client.execute_cell(cell, index)
            except Exception as error:  # CellExecutionError, CellTimeoutError, DeadKernelError
                failure = index, cell, error
                break
            timings.append((time.perf_counter() - start, index))
    if failure is not None:
        index, cell, error = failure
        nbformat.write(nb, out_dir / name)
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        detail = (ANSI.sub("", "\n".join(errors[0].traceback)) or f"{errors[0].ename}: {errors[0].evalue}"
                  if errors else f"{type(error).__name__}: {error}")
        pytest.fail(f"{name}: cell {index} failed (executed notebook: {out_dir / name})\n"
                    f"----- source -----\n{cell.source}\n----- error -----\n{detail}", pytrace=False)
    slowest = ", ".join(f"cell {i} {t:.1f}s" for t, i in sorted(timings, reverse=True)[:3])
    print(f"\n[notebook] {name}: {sum(t for t, _ in timings):.1f}s (slowest: {slowest})")
    return nb


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, kernel, tmp_path):
    nb = _read(name)
    position = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(_injected(SMALL[name]))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(position + 1, injected)
    run_notebook(nb, name, tmp_path, kernel)
    text = "".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
    expected = "Data: real data, CellBench 5cl" if _cellbench_reachable() else "Data: generated data"
    assert expected in text, f"{name} did not print {expected!r}"


def test_data_cell_falls_back_to_generated_data(kernel, tmp_path):
    """Without cellbench_5cl.h5ad (here: DATA_DIR is an empty folder) the notebooks use
    synthetic_iid and say so; only the cells up to the data cell run."""
    nb = _read("quickstart.ipynb")
    data_cell = next(i for i, cell in enumerate(nb.cells) if "find_cellbench(DATA_DIR)" in cell.source)
    position = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    nb.cells = nb.cells[:data_cell + 1]
    nb.cells.insert(
        position + 1, nbformat.v4.new_code_cell(_injected({"N_GENES": 50, "DATA_DIR": str(tmp_path)}))
    )
    run_notebook(nb, "quickstart.ipynb", tmp_path, kernel)
    text = "".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
    assert (
        "Data: generated data from pyro_scvi.data.synthetic_iid" in text and "900 cells x 50 genes" in text
    ), text
