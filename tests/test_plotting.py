"""pyro_scvi.plotting: every plot renders to a PNG with the expected content."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("matplotlib")

from pyro_scvi import SCVI, plotting  # noqa: E402
from pyro_scvi.data import synthetic_iid  # noqa: E402

torch.set_num_threads(2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _saved(fig, path):
    out = plotting.save_figure(fig, path)
    assert out.exists() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == PNG_MAGIC
    return out


def _history(n_epochs=10, validate_every=2):
    epochs = np.arange(n_epochs)
    frame = lambda idx, values, key: pd.DataFrame({key: values}, index=pd.Index(idx, name="epoch"))  # noqa: E731
    val_epochs = epochs[validate_every - 1 :: validate_every]
    return {
        "elbo_train": frame(epochs, 300 - 5 * epochs, "elbo_train"),
        "elbo_validation": frame(val_epochs, 310 - 4 * val_epochs, "elbo_validation"),
        "kl_weight": frame(epochs, epochs / 400, "kl_weight"),
        "train_loss": frame(epochs, 300 - 5 * epochs, "train_loss"),
    }


@pytest.fixture(scope="module")
def trained():
    adata = synthetic_iid(batch_size=50, n_genes=30, n_batches=2, n_labels=3, seed=0)
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="labels")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=4, check_val_every_n_epoch=1, enable_progress_bar=False)
    return model, adata


# ---------------------------------------------------------------------------- training history
def test_training_history_train_validation_and_kl(tmp_path):
    fig = plotting.plot_training_history(_history())
    main, twin = fig.axes
    assert [line.get_label() for line in main.get_lines()] == ["elbo train", "elbo validation"]
    assert len(main.get_lines()[0].get_xdata()) == 10 and len(main.get_lines()[1].get_xdata()) == 5
    assert [line.get_label() for line in twin.get_lines()] == ["KL weight"]
    assert twin.get_ylabel() == "KL weight"
    _saved(fig, tmp_path / "history.png")


def test_training_history_without_validation_and_into_given_axes(tmp_path):
    import matplotlib.pyplot as plt

    history = _history()
    del history["elbo_validation"]
    fig, ax = plt.subplots()
    assert plotting.plot_training_history(history, ax=ax, show_kl_weight=False) is fig
    assert len(ax.get_lines()) == 1 and len(fig.axes) == 1
    _saved(fig, tmp_path / "sub" / "history.png")  # parent folders are created


def test_training_history_errors():
    with pytest.raises(ValueError, match="train the model"):
        plotting.plot_training_history(None)
    with pytest.raises(ValueError, match="none of"):
        plotting.plot_training_history({"kl_weight": _history()["kl_weight"]})


# ---------------------------------------------------------------------------- latent
def test_latent_categorical_pca_when_umap_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "_umap_available", lambda: False)
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(90, 5))
    labels = pd.Series(pd.Categorical(np.repeat(["a", "b", "c"], 30)), name="cell_type")
    fig = plotting.plot_latent(latent, labels)
    ax = fig.axes[0]
    assert len(ax.collections) == 3  # one scatter per category
    assert sum(len(c.get_offsets()) for c in ax.collections) == 90
    assert "PCA" in ax.get_title() and "umap-learn" in ax.get_title() and "cell_type" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
    _saved(fig, tmp_path / "latent.png")


def test_latent_numeric_colour_gets_a_colorbar(tmp_path):
    latent = np.random.default_rng(1).normal(size=(40, 3))
    fig = plotting.plot_latent(latent, np.linspace(0, 1, 40), method="pca", color_name="score")
    assert len(fig.axes) == 2  # plot + colour bar
    assert len(fig.axes[0].collections) == 1 and len(fig.axes[0].collections[0].get_offsets()) == 40
    _saved(fig, tmp_path / "latent_numeric.png")
    fig = plotting.plot_latent(latent)  # no colour
    assert len(fig.axes[0].collections) == 1
    _saved(fig, tmp_path / "latent_plain.png")


def test_pca_embedding_is_the_top_principal_plane():
    rng = np.random.default_rng(2)
    latent = rng.normal(size=(200, 4)) * np.array([5.0, 2.0, 0.5, 0.1])
    coords, used = plotting.embed_latent(latent, "pca")
    assert used == "pca" and coords.shape == (200, 2)
    np.testing.assert_allclose(
        coords.var(0), np.sort(np.linalg.eigvalsh(np.cov(latent.T, bias=True)))[::-1][:2], rtol=1e-8
    )
    with pytest.raises(ValueError, match="method"):
        plotting.embed_latent(latent, "tsne")


def test_umap_without_umap_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ImportError, match="umap-learn"):
        plotting.embed_latent(np.zeros((10, 3)), "umap")
    assert plotting.embed_latent(np.random.default_rng(0).normal(size=(10, 3)), "auto")[1] == "pca"


# ---------------------------------------------------------------------------- volcano
def _de_change(n=50, comparisons=("a vs Rest",), seed=0):
    rng = np.random.default_rng(seed)
    blocks = []
    for name in comparisons:
        lfc = rng.normal(0, 2, n)
        proba = 1 / (1 + np.exp(-np.abs(lfc) * 2 + 3))
        blocks.append(pd.DataFrame({
            "proba_de": proba, "proba_not_de": 1 - proba, "bayes_factor": np.log(proba / (1 - proba)),
            "scale1": rng.uniform(0.001, 0.1, n), "scale2": rng.uniform(0.001, 0.1, n), "lfc_mean": lfc,
            "comparison": name,
        }, index=[f"g{i}" for i in range(n)]))
    return pd.concat(blocks)


def test_volcano_change_mode(tmp_path):
    table = _de_change()
    fig = plotting.plot_volcano(table, top_n=5)
    ax = fig.axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 50
    assert ax.get_xlabel() == "mean log fold change" and ax.get_ylabel() == "log Bayes factor"
    assert len(ax.texts) == 5
    top = table["bayes_factor"].idxmax()
    assert top in {t.get_text() for t in ax.texts}
    assert "a vs Rest" in ax.get_title()
    _saved(fig, tmp_path / "volcano.png")


def test_volcano_vanilla_mode_uses_log2_scale_ratio(tmp_path):
    table = pd.DataFrame(
        {
            "proba_m1": [0.9, 0.2, 0.5],
            "proba_m2": [0.1, 0.8, 0.5],
            "bayes_factor": [2.2, -1.4, 0.0],
            "scale1": [0.4, 0.1, 0.2],
            "scale2": [0.1, 0.4, 0.2],
        },
        index=["x", "y", "z"],
    )
    xs, ys, x_label, y_label = plotting.volcano_coordinates(table)
    np.testing.assert_allclose(xs, [2.0, -2.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(ys, [2.2, 1.4, 0.0])
    assert x_label == "log2(scale1 / scale2)" and y_label == "|log Bayes factor|"
    fig = plotting.plot_volcano(table, y="proba_m1")
    assert fig.axes[0].get_ylabel() == "proba_m1"
    _saved(fig, tmp_path / "volcano_vanilla.png")


def test_volcano_several_comparisons_and_selection(tmp_path):
    table = _de_change(n=20, comparisons=("a vs Rest", "b vs Rest", "c vs Rest"))
    ax = plotting.plot_volcano(table, top_n=0).axes[0]
    assert len(ax.collections) == 3 and all(len(c.get_offsets()) == 20 for c in ax.collections)
    fig = plotting.plot_volcano(table, comparison="b vs Rest")
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 20
    _saved(fig, tmp_path / "volcano_b.png")
    with pytest.raises(ValueError, match="No comparison"):
        plotting.plot_volcano(table, comparison="zzz")
    with pytest.raises(ValueError):
        plotting.plot_volcano(pd.DataFrame())


# ---------------------------------------------------------------------------- posterior predictive
def test_posterior_predictive_panels(tmp_path):
    rng = np.random.default_rng(3)
    observed = rng.poisson(3.0, size=(60, 12))
    samples = rng.poisson(3.0, size=(60, 12, 7))
    stats = plotting.posterior_predictive_summary(observed, samples)
    np.testing.assert_allclose(stats["observed_mean"], observed.mean(0))
    assert stats["predicted_zeros"].shape == (12, 7)
    fig = plotting.plot_posterior_predictive(observed, samples)
    mean_ax, zero_ax = fig.axes
    for ax in (mean_ax, zero_ax):
        assert len(ax.containers) == 1  # one errorbar series: one point per gene
        assert len(ax.containers[0].lines[0].get_xdata()) == 12
    np.testing.assert_allclose(zero_ax.containers[0].lines[0].get_xdata(), (observed == 0).mean(0))
    _saved(fig, tmp_path / "ppc.png")
    with pytest.raises(ValueError, match="cells, genes"):
        plotting.plot_posterior_predictive(observed, samples[:10])


# ---------------------------------------------------------------------------- with a trained model
def test_every_plot_from_a_trained_model(trained, tmp_path):
    model, adata = trained
    _saved(plotting.plot_training_history(model), tmp_path / "history.png")
    latent = model.get_latent_representation()
    _saved(plotting.plot_latent(latent, adata.obs["labels"]), tmp_path / "latent.png")
    for mode in ("change", "vanilla"):
        de = model.differential_expression(
            groupby="labels", group1="label_0", mode=mode, n_samples_overall=200, silent=True
        )
        fig = plotting.plot_volcano(de)
        assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == adata.n_vars
        _saved(fig, tmp_path / f"volcano_{mode}.png")
    pytest.importorskip("sparse")
    samples = model.posterior_predictive_sample(indices=np.arange(40), n_samples=5)
    fig = plotting.plot_posterior_predictive(adata.layers["counts"][:40], samples)
    _saved(fig, tmp_path / "ppc.png")


def test_missing_matplotlib_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pyro-scvi\[plot\]"):
        plotting.plot_training_history(_history())
