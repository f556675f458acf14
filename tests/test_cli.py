"""The main job: `pyro-scvi demo` on its built-in default data."""

import importlib.util

import anndata
import numpy as np

from pyro_scvi import SCVI
from pyro_scvi.cli import main


def test_demo_writes_latent_and_model(tmp_path, capsys):
    """``make demo`` runs ``demo --plots``: the latent space as UMAP when umap-learn (the plot extra) is
    installed, else PCA. (The first UMAP of a process spends most of its time in numba compilation.)"""
    plots = importlib.util.find_spec("matplotlib") is not None
    assert main(["demo", "--out", str(tmp_path), "--epochs", "5", "--quiet"] + ["--plots"] * plots) == 0
    out = capsys.readouterr().out
    assert "pyro-scvi demo" in out and "silhouette" in out
    if plots:
        umap_installed = importlib.util.find_spec("umap") is not None
        assert f"plots (latent space: {'UMAP' if umap_installed else 'PCA'})" in out
        for name in ("training", "latent_labels", "latent_batch"):
            _png(tmp_path / f"demo_{name}.png")
    written = anndata.read_h5ad(tmp_path / "demo.h5ad")
    assert written.obsm["X_scVI"].shape == (1200, 10) and np.isfinite(written.obsm["X_scVI"]).all()
    np.testing.assert_allclose(written.layers["scvi_normalized"].sum(1), 1e4, rtol=1e-3)
    model = SCVI.load(tmp_path / "model", adata=written)
    np.testing.assert_allclose(
        model.get_latent_representation(), written.obsm["X_scVI"], rtol=1e-5, atol=1e-6
    )


# ============================================================================ the other subcommands
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
from test_io_tenx import write_10x_h5  # noqa: E402

from pyro_scvi.data import synthetic_iid  # noqa: E402

torch.set_num_threads(2)
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
SCVI_TOOLS_MODEL = FIXTURES / "scvi_tools_cellbench5" / "model"
TINY = ["--epochs", "3", "--n-hidden", "16", "--n-latent", "4", "--batch-size", "64"]


def _png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``pyro-scvi train`` on 120 generated cells x 40 genes, with plots and a normalized layer."""
    pytest.importorskip("matplotlib")
    work = tmp_path_factory.mktemp("cli")
    adata = synthetic_iid(batch_size=60, n_genes=40, n_batches=2, n_labels=3, seed=0)
    adata.write_h5ad(work / "data.h5ad")
    code = main(["train", str(work / "data.h5ad"), "--layer", "counts", "--batch-key", "batch",
                 "--labels-key", "labels", "--out", str(work / "res"), "--normalized-layer", "norm",
                 "--plots", "--quiet", *TINY])
    assert code == 0
    return work


def test_train_writes_model_h5ad_and_plots(trained):
    out = trained / "res"
    written = anndata.read_h5ad(out / "data_scvi.h5ad")
    assert written.obsm["X_scVI"].shape == (120, 4) and np.isfinite(written.obsm["X_scVI"]).all()
    np.testing.assert_allclose(written.layers["norm"].sum(1), 1e4, rtol=1e-3)
    model = SCVI.load(out / "model", adata=written)
    assert len(model.history["elbo_train"]) == 3 and "elbo_validation" in model.history
    np.testing.assert_allclose(
        model.get_latent_representation(), written.obsm["X_scVI"], rtol=1e-5, atol=1e-6
    )
    for name in ("training", "latent_labels", "latent_batch"):
        _png(out / f"data_scvi_{name}.png")
    pytest.importorskip("sparse")
    _png(out / "data_scvi_ppc.png")


def test_train_refuses_to_overwrite_without_flag(trained, capsys):
    code = main(["train", str(trained / "data.h5ad"), "--out", str(trained / "res"), *TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "--overwrite" in err


def test_latent_h5ad_csv_and_plots(trained, capsys):
    model_dir, data = str(trained / "res" / "model"), str(trained / "data.h5ad")
    assert main(["latent", model_dir, data, "-o", str(trained / "lat.h5ad"), "--plots",
                 "--color", "labels"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "lat_latent_labels.png" in out
    lat = anndata.read_h5ad(trained / "lat.h5ad")
    reference = anndata.read_h5ad(trained / "res" / "data_scvi.h5ad").obsm["X_scVI"]
    np.testing.assert_allclose(lat.obsm["X_scVI"], reference, rtol=1e-5, atol=1e-6)
    _png(trained / "lat_latent_labels.png")
    assert main(["latent", model_dir, data, "-o", str(trained / "lat.csv"), "--key", "Z", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    table = pd.read_csv(trained / "lat.csv", index_col=0)
    assert table.shape == (120, 4)
    np.testing.assert_allclose(table.to_numpy(), reference, rtol=1e-4, atol=1e-5)


def test_normalize_h5ad_and_csv(trained, capsys):
    model_dir, data = str(trained / "res" / "model"), str(trained / "data.h5ad")
    assert main(["normalize", model_dir, data, "-o", str(trained / "norm.h5ad"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    norm = anndata.read_h5ad(trained / "norm.h5ad")
    np.testing.assert_allclose(norm.layers["scvi_normalized"].sum(1), 1e4, rtol=1e-3)
    out_csv = trained / "norm_out.txt"
    assert main(["normalize", model_dir, data, "-o", str(out_csv), "--csv", "--genes", "gene_0,gene_3",
                 "--library-size", "100", "--transform-batch", "batch_0"]) == 0
    table = pd.read_csv(out_csv, index_col=0)
    assert (
        list(table.columns) == ["gene_0", "gene_3"]
        and table.shape == (120, 2)
        and (table.to_numpy() > 0).all()
    )
    assert (table.to_numpy().sum(1) < 100).all()


def test_de_csv_and_volcano(trained, capsys):
    model_dir, data = str(trained / "res" / "model"), str(trained / "data.h5ad")
    out = trained / "de.csv"
    assert main(["de", model_dir, data, "--groupby", "labels", "-o", str(out), "--n-samples", "200",
                 "--plots", "--quiet"]) == 0
    table = pd.read_csv(out, index_col=0)
    assert {"proba_de", "bayes_factor", "lfc_mean", "comparison"} <= set(table.columns)
    assert table["comparison"].nunique() == 3 and len(table) == 3 * 40
    _png(trained / "de_volcano.png")
    out = trained / "de_vanilla.csv"
    assert main(["de", model_dir, data, "--groupby", "labels", "--group1", "label_1", "--group2", "label_0",
                 "--mode", "vanilla", "-o", str(out), "--n-samples", "200"]) == 0
    table = pd.read_csv(out, index_col=0)
    assert set(table["comparison"]) == {"label_1 vs label_0"} and "proba_m1" in table


def test_info_on_our_model(trained, capsys):
    assert main(["info", str(trained / "res" / "model")]) == 0
    out = capsys.readouterr().out
    assert "pyro-scvi" in out and "n_latent: 4" in out and "Setup via `SCVI.setup_anndata`" in out
    assert "'batch_key': 'batch'" in out and "batch_0, batch_1" in out and "Training: 3 epochs" in out


@pytest.mark.skipif(not (SCVI_TOOLS_MODEL / "model.pt").exists(), reason="scvi-tools fixture absent")
def test_info_on_scvi_tools_model(capsys):
    assert main(["info", str(SCVI_TOOLS_MODEL)]) == 0
    out = capsys.readouterr().out
    assert "scvi-tools 1." in out and "'labels_key': 'cell_line'" in out
    assert "909 cells x 2000 genes" in out and "Training: 100 epochs" in out


# ---------------------------------------------------------------------------- errors and help
def test_errors_exit_1_with_message(trained, tmp_path, capsys):
    model_dir, data = str(trained / "res" / "model"), str(trained / "data.h5ad")
    bad_suffix = tmp_path / "data.loom"
    bad_suffix.write_text("not data")
    (tmp_path / "empty_dir").mkdir()
    cases = [
        (["train", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "a"), *TINY], "missing.h5ad"),
        (["train", data, "--batch-key", "nope", "--out", str(tmp_path / "b"), *TINY], "nope"),
        (["train", data, "--layer", "nope", "--out", str(tmp_path / "c"), *TINY], "nope"),
        (["train", str(bad_suffix), "--out", str(tmp_path / "d"), *TINY], "Unsupported"),
        (
            ["train", str(tmp_path / "empty_dir"), "--out", str(tmp_path / "e"), *TINY],
            "not a 10x matrix directory",
        ),
        (["latent", str(tmp_path), data, "-o", str(tmp_path / "x.h5ad")], "No model"),
        (["de", model_dir, data, "--groupby", "nope", "-o", str(tmp_path / "x.csv")], "nope"),
        (
            ["de", model_dir, data, "--groupby", "labels", "--group1", "label_9",
             "-o", str(tmp_path / "x.csv")],
            "label_9",
        ),
        (
            ["normalize", model_dir, data, "--genes", "not_a_gene", "-o", str(tmp_path / "x.csv")],
            "not_a_gene",
        ),
        (["info", str(tmp_path / "nothing")], "No model"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err, (argv, err)
        assert "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["train"]) == 2
    assert main(["train", "x.h5ad", "--n-latent", "0"]) == 2
    assert main(["de", "m", "d.h5ad", "-o", "x.csv"]) == 2  # --groupby is required
    assert main(["bogus"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_explains_commands_and_options(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("train", "latent", "normalize", "de", "info", "demo", "exit codes", "10x"):
        assert word in out
    expected = {
        "train": ["--layer", "--batch-key", "--labels-key", "--n-latent", "--gene-likelihood", "--max-epochs",
                  "--normalized-layer", "--plots", "--color", "--quiet", "--overwrite", "(default: 10)"],
        "latent": ["--key", "--plots", "--color", "--quiet"],
        "normalize": ["--csv", "--library-size", "--transform-batch", "--genes", "--layer-name"],
        "de": ["--groupby", "--group1", "--group2", "--mode", "--delta", "--plots"],
        "info": ["--prefix"],
        "demo": ["--epochs", "--out", "--quiet"],
    }
    for command, options in expected.items():
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        for option in options:
            assert option in out, (command, option)


def test_train_from_10x_h5_quiet(tmp_path, capsys):
    adata = synthetic_iid(batch_size=80, n_genes=30, n_batches=1, n_labels=2, seed=3)
    counts = sp.csc_matrix(np.asarray(adata.layers["counts"]).T)
    write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", counts)
    argv = ["train", str(tmp_path / "filtered_feature_bc_matrix.h5"), "--out", str(tmp_path / "out"),
            "--name", "pbmc", "--quiet", "--epochs", "2", "--n-hidden", "16", "--n-latent", "3", "--plots"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    written = anndata.read_h5ad(tmp_path / "out" / "pbmc.h5ad")
    assert written.obsm["X_scVI"].shape == (80, 3)
    _png(tmp_path / "out" / "pbmc_training.png")
    _png(tmp_path / "out" / "pbmc_latent.png")  # no batch/labels keys: one uncoloured plot


@pytest.mark.skipif(not (SCVI_TOOLS_MODEL / "adata.h5ad").exists(), reason="scvi-tools fixture absent")
def test_latent_with_scvi_tools_model(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fixture_latent.h5ad"
    assert main(["latent", str(SCVI_TOOLS_MODEL), str(SCVI_TOOLS_MODEL / "adata.h5ad"), "-o", str(out),
                 "--plots", "--color", "cell_line", "--quiet"]) == 0
    assert anndata.read_h5ad(out).obsm["X_scVI"].shape == (909, 10)
    _png(tmp_path / "fixture_latent_latent_cell_line.png")


def test_plots_without_matplotlib_fail_before_training(tmp_path, capsys, monkeypatch):
    import sys

    adata = synthetic_iid(batch_size=10, n_genes=10, n_batches=1, n_labels=1, seed=0)
    adata.write_h5ad(tmp_path / "d.h5ad")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    assert main(["train", str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "o"), "--plots", *TINY]) == 1
    assert "pip install 'pyro-scvi[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- choices match the model
def _choices(command: str, option: str) -> tuple:
    import argparse

    from pyro_scvi.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in commands.choices[command]._actions if option in a.option_strings)
    return tuple(action.choices)


def test_model_choices_are_what_the_model_accepts():
    from pyro_scvi.infer.distributed import STRATEGIES
    from pyro_scvi.models.likelihoods import BUILTIN_LIKELIHOODS
    from pyro_scvi.models.module import DISPERSIONS, LATENT_DISTRIBUTIONS

    assert _choices("train", "--gene-likelihood") == BUILTIN_LIKELIHOODS
    assert set(BUILTIN_LIKELIHOODS) == {"zinb", "nb", "poisson", "normal"}
    assert _choices("train", "--dispersion") == DISPERSIONS
    assert _choices("train", "--latent-distribution") == LATENT_DISTRIBUTIONS
    assert _choices("train", "--strategy") == STRATEGIES
    adata = synthetic_iid(batch_size=10, n_genes=8, n_batches=2, n_labels=2, seed=0)
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="labels")
    for likelihood in _choices("train", "--gene-likelihood"):
        SCVI(adata, n_hidden=4, n_latent=2, gene_likelihood=likelihood)
    for dispersion in _choices("train", "--dispersion"):
        SCVI(adata, n_hidden=4, n_latent=2, dispersion=dispersion)
    for latent in _choices("train", "--latent-distribution"):
        SCVI(adata, n_hidden=4, n_latent=2, latent_distribution=latent)


def test_accelerator_choices_are_what_train_accepts(capsys):
    choices = _choices("train", "--accelerator")
    assert choices == ("auto", "cpu", "gpu", "cuda")
    adata = synthetic_iid(batch_size=10, n_genes=8, n_batches=1, n_labels=1, seed=0)
    SCVI.setup_anndata(adata, layer="counts")
    for accelerator in choices:
        model = SCVI(adata, n_hidden=4, n_latent=2)
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            with pytest.raises(ValueError, match="CUDA is not available"):  # a valid value, no device
                model.train(max_epochs=1, accelerator=accelerator, enable_progress_bar=False)
        else:
            model.train(max_epochs=1, accelerator=accelerator, enable_progress_bar=False)
    with pytest.raises(ValueError, match="mps"):
        SCVI(adata, n_hidden=4, n_latent=2).train(max_epochs=1, accelerator="mps", enable_progress_bar=False)
    assert main(["train", "x.h5ad", "--accelerator", "mps"]) == 2
    assert "invalid choice: 'mps'" in capsys.readouterr().err


def test_embedding_and_var_names_choices_are_accepted():
    from pyro_scvi.io.tenx import VAR_NAMES
    from pyro_scvi.plotting import _umap_available, embed_latent

    assert _choices("train", "--var-names") == _choices("latent", "--var-names") == VAR_NAMES
    latent = np.random.default_rng(0).normal(size=(30, 3))
    for method in _choices("latent", "--embedding"):
        if method != "umap" or _umap_available():
            embed_latent(latent, method)


def test_annotate_transfers_cell_types_to_a_query(tmp_path, capsys):
    """`pyro-scvi annotate`: scVI → scANVI on a labelled reference, the query (a held-out batch without
    labels or batch column) mapped onto it, predictions in its obs."""
    data = synthetic_iid(batch_size=150, n_genes=60, n_batches=3, n_labels=3, n_markers=10,
                         log_fold_change=3.0, seed=0)
    data.obs["cell_type"] = data.obs["labels"].astype(str)
    data.obs.loc[data.obs_names[::5], "cell_type"] = "Unknown"
    reference = data[data.obs["batch"] != "batch_2"].copy()
    query = data[data.obs["batch"] == "batch_2"].copy()
    truth = query.obs["labels"].astype(str).to_numpy()
    del query.obs["cell_type"], query.obs["batch"]
    reference.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    out = tmp_path / "typed.h5ad"
    code = main(["annotate", str(tmp_path / "ref.h5ad"), str(tmp_path / "query.h5ad"), "-o", str(out),
                 "--batch-key", "batch", "--scvi-epochs", "20", "--scanvi-epochs", "10",
                 "--query-epochs", "20", "--batch-size", "64", "--save-model", str(tmp_path / "models")])
    assert code == 0, capsys.readouterr().err
    assert "predicted_cell_type" in capsys.readouterr().out
    typed = anndata.read_h5ad(out)
    assert np.mean(typed.obs["predicted_cell_type"].astype(str).to_numpy() == truth) >= 0.9
    assert typed.obs["predicted_cell_type_probability"].between(0, 1).all()
    assert typed.obsm["X_scANVI"].shape == (query.n_obs, 10)
    # the saved reference model is accepted in place of the reference data
    again = tmp_path / "again.h5ad"
    assert main(["annotate", str(tmp_path / "models" / "reference"), str(tmp_path / "query.h5ad"), "-o",
                 str(again), "--query-epochs", "2", "--quiet"]) == 0
    assert anndata.read_h5ad(again).obs["predicted_cell_type"].notna().all()
    # clear errors: the labels column missing from the reference, the output present
    assert main(["annotate", str(tmp_path / "ref.h5ad"), str(tmp_path / "query.h5ad"), "-o",
                 str(tmp_path / "x.h5ad"), "--labels-key", "nope", "--quiet"]) == 1
    assert "--labels-key" in capsys.readouterr().err
    assert main(["annotate", str(tmp_path / "ref.h5ad"), str(tmp_path / "query.h5ad"), "-o", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err


# ============================================================================ train --n-top-genes
@pytest.fixture(scope="module")
def trained_hvg(tmp_path_factory):
    """``train --n-top-genes 15`` on 120 generated cells x 40 genes (genes ranked within each batch)."""
    pytest.importorskip("skmisc")
    work = tmp_path_factory.mktemp("cli_hvg")
    adata = synthetic_iid(batch_size=60, n_genes=40, n_batches=2, n_labels=3, seed=0)
    adata.write_h5ad(work / "data.h5ad")
    code = main(["train", str(work / "data.h5ad"), "--layer", "counts", "--batch-key", "batch",
                 "--labels-key", "labels", "--n-top-genes", "15", "--out", str(work / "res"), "--quiet",
                 *TINY])
    assert code == 0
    return work, adata


def test_train_on_highly_variable_genes(trained_hvg):
    from pyro_scvi import pp

    work, adata = trained_hvg
    expected = pp.highly_variable_genes(adata, 15, batch_key="batch", layer="counts", inplace=False)
    genes = list(expected.index[expected["highly_variable"]])
    written = anndata.read_h5ad(work / "res" / "data_scvi.h5ad")
    assert list(written.var_names) == genes and written.var["highly_variable"].all()
    assert "highly_variable_nbatches" in written.var  # ranked within each batch of --batch-key
    model = SCVI.load(work / "res" / "model", adata=written)
    assert list(model.var_names) == genes


def test_model_commands_use_the_models_genes_of_a_full_file(trained_hvg, capsys):
    work, adata = trained_hvg
    model_dir, data = str(work / "res" / "model"), str(work / "data.h5ad")
    assert main(["latent", model_dir, data, "-o", str(work / "lat.h5ad")]) == 0
    assert "using the model's 15 genes of the input's 40" in capsys.readouterr().out
    lat = anndata.read_h5ad(work / "lat.h5ad")  # the input with all its genes, and the latent space
    assert lat.n_vars == 40 and lat.obsm["X_scVI"].shape == (120, 4)
    np.testing.assert_allclose(lat.obsm["X_scVI"], anndata.read_h5ad(work / "res" / "data_scvi.h5ad")
                               .obsm["X_scVI"], rtol=1e-5, atol=1e-6)
    assert main(["normalize", model_dir, data, "-o", str(work / "norm.h5ad"), "--quiet"]) == 0
    assert anndata.read_h5ad(work / "norm.h5ad").layers["scvi_normalized"].shape == (120, 15)
    assert main(["de", model_dir, data, "-o", str(work / "de.csv"), "--groupby", "labels",
                 "--group1", "label_0", "--n-samples", "50", "--quiet"]) == 0
    assert len(pd.read_csv(work / "de.csv", index_col=0)) == 15
    written = anndata.read_h5ad(work / "res" / "data_scvi.h5ad")
    adata[:, [g for g in adata.var_names if g != written.var_names[0]]].copy().write_h5ad(work / "short.h5ad")
    assert main(["latent", model_dir, str(work / "short.h5ad"), "-o", str(work / "x.h5ad"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: The input lacks 1 of the model's 15 genes") and written.var_names[0] in err


def test_n_top_genes_errors(trained_hvg, tmp_path, capsys):
    work, _ = trained_hvg
    data = str(work / "data.h5ad")
    for extra, message in ((["--n-top-genes", "41"], "n_top_genes=41"),
                           (["--hvg-batch-key", "batch"], "--hvg-batch-key needs --n-top-genes"),
                           (["--n-top-genes", "10", "--hvg-batch-key", "plate"], "'plate' is not a column")):
        code = main(["train", data, "--out", str(tmp_path / "r"), "--quiet", *extra, *TINY])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and message in err, err

