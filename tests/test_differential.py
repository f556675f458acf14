"""Differential expression (issue 4): the pure statistics by hand, known DE genes on generated
data, agreement with scvi-tools' DE tables on the shared fixture, group selection and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_scvi import SCVI, settings
from pyro_scvi.data import synthetic_iid
from pyro_scvi.differential import (
    change_statistics,
    estimate_delta,
    fdr_flags,
    hpd_interval,
    pair_samples,
    pseudocounts_from_counts,
    raw_count_statistics,
    vanilla_statistics,
)

torch.set_num_threads(2)
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "scvi_tools_cellbench5"
VANILLA_COLUMNS = ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
CHANGE_COLUMNS = ["proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
                  "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max"]
RAW_COLUMNS = ["raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
               "raw_normalized_mean1", "raw_normalized_mean2"]


# ------------------------------------------------------------------------------- pure statistics
def test_vanilla_statistics_by_hand():
    s1 = np.array([[1.0, 0.0], [2.0, 3.0], [3.0, 1.0], [0.0, 5.0]])
    s2 = np.array([[0.5, 1.0], [1.0, 4.0], [4.0, 0.5], [1.0, 1.0]])
    out = vanilla_statistics(s1, s2)
    np.testing.assert_allclose(out["proba_m1"], [0.5, 0.5])
    s2[2, 0] = 0.0  # gene 0: 3 of 4 draws have s1 > s2
    out = vanilla_statistics(s1, s2)
    np.testing.assert_allclose(out["proba_m1"], [0.75, 0.5])
    np.testing.assert_allclose(out["proba_m2"], [0.25, 0.5])
    np.testing.assert_allclose(
        out["bayes_factor"], [np.log(0.75 + 1e-8) - np.log(0.25 + 1e-8), 0.0], atol=1e-12
    )
    assert vanilla_statistics(np.ones((3, 1)) * 2, np.ones((3, 1)))["bayes_factor"][0] == pytest.approx(
        np.log(1 / 1e-8)
    )
    with pytest.raises(ValueError, match="paired"):
        vanilla_statistics(np.ones((3, 2)), np.ones((4, 2)))


def test_change_statistics_by_hand():
    # lfc (ψ = 0) of gene 0: log2 of [4, 1, 1/2, 2, 1.1] ; gene 1: [-3, -2, -0.2, 0.1, 0.3]
    s2 = np.ones((5, 2))
    s1 = np.column_stack([[4.0, 1.0, 0.5, 2.0, 1.1], 2.0 ** np.array([-3.0, -2.0, -0.2, 0.1, 0.3])])
    out = change_statistics(s1, s2, delta=0.25, pseudocounts=0.0)
    lfc = np.log2(s1)
    p_up = (lfc >= 0.25).mean(0)
    p_down = (lfc < -0.25).mean(0)
    np.testing.assert_allclose(p_up, [0.4, 0.2])
    np.testing.assert_allclose(p_down, [0.2, 0.4])
    np.testing.assert_allclose(out["proba_de"], [0.4, 0.4])
    np.testing.assert_allclose(out["proba_not_de"], [0.6, 0.6])
    np.testing.assert_allclose(out["bayes_factor"], np.log(0.4 + 1e-8) - np.log(0.6 + 1e-8))
    assert out["delta"] == 0.25
    np.testing.assert_allclose(out["lfc_mean"], lfc.mean(0))
    np.testing.assert_allclose(out["lfc_median"], np.median(lfc, 0))
    np.testing.assert_allclose(out["lfc_std"], lfc.std(0))
    np.testing.assert_allclose(out["lfc_min"], lfc.min(0))
    np.testing.assert_allclose(out["lfc_max"], lfc.max(0))
    two = change_statistics(s1, s2, delta=0.25, pseudocounts=0.0, test_mode="two")
    np.testing.assert_allclose(two["proba_de"], [0.6, 0.6])
    # the test uses ψ, the summaries 1e-3·ψ
    psi = 0.5
    out = change_statistics(s1, s2, delta=0.25, pseudocounts=psi)
    tested = np.log2(s1 + psi) - np.log2(s2 + psi)
    summarised = np.log2(s1 + 1e-3 * psi) - np.log2(s2 + 1e-3 * psi)
    np.testing.assert_allclose(
        out["proba_de"], np.maximum((tested >= 0.25).mean(0), (tested < -0.25).mean(0))
    )
    np.testing.assert_allclose(out["lfc_mean"], summarised.mean(0))
    # custom change function and DE region
    out = change_statistics(s1, s2, pseudocounts=0.0, change_fn=lambda x, y, p: x - y,
                            m1_domain_fn=lambda c: np.abs(c) > 1.5)
    np.testing.assert_allclose(out["proba_de"], [0.2, 0.0])
    np.testing.assert_allclose(out["lfc_mean"], (s1 - s2).mean(0))
    out = change_statistics(s1, s2, pseudocounts=0.0, cred_interval_lvls=[0.5])
    assert {"lfc_confidence_interval_0.5_min", "lfc_confidence_interval_0.5_max"} <= set(out)
    with pytest.raises(ValueError, match="test_mode"):
        change_statistics(s1, s2, test_mode="one")


def test_hpd_interval_and_delta_estimate():
    samples = np.column_stack([np.arange(10.0), [0, 0.1, 0.2, 0.3, 5, 6, 7, 8, 9, 10]])
    low, high = hpd_interval(samples, 0.3)  # k = 3: shortest window of 4 sorted draws
    np.testing.assert_allclose(low, [0.0, 0.0])
    np.testing.assert_allclose(high, [3.0, 0.3])
    with pytest.raises(ValueError):
        hpd_interval(samples, 1.5)
    rng = np.random.default_rng(0)
    lfc = np.concatenate([rng.normal(-2, 0.05, 50), rng.normal(0, 0.05, 300), rng.normal(2, 0.05, 50)])
    assert estimate_delta(lfc) == pytest.approx(0.6 * 2, abs=0.02)
    assert estimate_delta(rng.normal(0, 0.01, 300)) == 0.1  # floored


def _shortest_window(samples, level):
    """The HPD interval by hand: the narrowest window of ⌊level · M⌋ + 1 sorted draws per column."""
    ordered = np.sort(samples, axis=0)
    n, k = ordered.shape[0], int(np.floor(level * ordered.shape[0]))
    start = np.argmin(ordered[k:] - ordered[: n - k], axis=0)
    columns = np.arange(ordered.shape[1])
    return ordered[start, columns], ordered[start + k, columns]


@pytest.mark.parametrize("level", [0.05, 0.5, 0.9, 0.99])
def test_hpd_interval_is_the_shortest_window_of_sorted_draws(level):
    rng = np.random.default_rng(1)
    samples = np.column_stack([rng.normal(size=1000), rng.gamma(0.5, size=1000), rng.integers(0, 4, 1000)])
    for dtype in (np.float32, np.float64):
        low, high = hpd_interval(samples.astype(dtype), level)
        expected_low, expected_high = _shortest_window(samples.astype(dtype), level)
        assert low.shape == high.shape == (3,)
        np.testing.assert_array_equal(low, expected_low)
        np.testing.assert_array_equal(high, expected_high)
    low, high = hpd_interval(samples[:, :1], level)  # one gene
    assert low.shape == high.shape == (1,)


def test_pseudocounts_rule():
    rng = np.random.default_rng(0)
    s1, s2 = rng.random((100, 4)) * [1, 2, 3, 4], rng.random((80, 4))
    raw1, raw2 = np.array([0.0, 0.005, 1.0, 1.0]), np.array([1.0, 1.0, 1.0, 0.001])
    psi1 = np.quantile(s1[:, :2].max(0), 0.9)  # group 1: genes 0 and 1 are below 0.01 counts
    psi2 = np.quantile(s2[:, 3:].max(0), 0.9)
    assert pseudocounts_from_counts(s1, s2, raw1, raw2) == pytest.approx(max(psi1, psi2) / 4)
    assert pseudocounts_from_counts(s1, s2, raw1 + 1, raw2 + 1) == 1e-10  # no quiet gene
    assert pseudocounts_from_counts(s1, s2, raw1, raw2, threshold_counts=0.0) == 1e-10


def test_fdr_flags():
    p = np.array([0.99, 0.5, 0.97, 0.9, 0.2])
    # sorted 0.99, 0.97, 0.9, 0.5: expected FDR 0.01, 0.02, 0.0467, 0.16
    np.testing.assert_array_equal(fdr_flags(p, 0.05), [True, False, True, True, False])
    np.testing.assert_array_equal(fdr_flags(p, 0.015), [True, False, False, False, False])
    assert not fdr_flags(np.array([0.5, 0.4]), 0.05).any()


def test_raw_count_statistics_dense_and_sparse():
    counts = np.array([[1.0, 0.0, 3.0], [0.0, 0.0, 4.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    m1, m2 = np.array([True, True, False, False]), np.array([False, False, True, True])
    out = raw_count_statistics(counts, m1, m2)
    np.testing.assert_allclose(out["raw_mean1"], [0.5, 0.0, 3.5])
    np.testing.assert_allclose(out["raw_mean2"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(out["non_zeros_proportion1"], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(out["non_zeros_proportion2"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(out["raw_normalized_mean1"], [1e4 / 4 / 2, 0.0, (3e4 / 4 + 1e4) / 2])
    np.testing.assert_allclose(out["raw_normalized_mean2"], [2500.0, 2500.0, 0.0])  # empty cell counts as 0
    sparse = raw_count_statistics(sp.csr_matrix(counts), m1, m2)
    for key in out:
        np.testing.assert_allclose(sparse[key], out[key])


def test_pair_samples():
    a = {None: np.arange(10.0)[:, None]}
    b = {None: np.arange(8.0)[:, None]}
    x, y = pair_samples(a, b, batch_correction=False)
    assert x.shape == y.shape == (8, 1)
    np.random.seed(0)
    x, y = pair_samples(a, b, batch_correction=False, use_permutation=True, m_permutation=50)
    assert x.shape == y.shape == (50, 1)
    a = {"b0": np.zeros((4, 1)), "b1": np.ones((4, 1))}
    b = {"b1": np.ones((4, 1)) * 10, "b0": np.zeros((4, 1)) * 10}
    x, y = pair_samples(a, b, batch_correction=True)
    np.testing.assert_array_equal(x == 0, y == 0)  # paired within each batch


# ------------------------------------------------------------------------------- known answer
@pytest.fixture(scope="module")
def de_model():
    """600 generated cells, 200 genes, 2 batches, 2 labels with 20 marker genes each (|LFC| = 2 nats)."""
    settings.seed = 0
    adata = synthetic_iid(batch_size=300, n_genes=200, n_batches=2, n_labels=2, seed=3)
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    model = SCVI(adata)
    model.train(max_epochs=150, enable_progress_bar=False)
    return model


def test_change_mode_recovers_known_de_genes(de_model):
    from sklearn.metrics import roc_auc_score

    adata = de_model.adata
    result = de_model.differential_expression(groupby="labels", group1="label_0", mode="change", silent=True)
    assert list(result.columns) == CHANGE_COLUMNS + RAW_COLUMNS + [
        "is_de_fdr_0.05",
        "comparison",
        "group1",
        "group2",
    ]
    assert (result["comparison"] == "label_0 vs Rest").all()
    assert result["proba_de"].is_monotonic_decreasing
    result = result.loc[adata.var_names]
    marker = (adata.var["marker_of"] != "").to_numpy()  # with 2 labels every marker is DE between them
    auroc = roc_auc_score(marker, result["proba_de"])
    declared = result["is_de_fdr_0.05"].to_numpy()
    empirical_fdr = (declared & ~marker).sum() / max(declared.sum(), 1)
    power = (declared & marker).sum() / marker.sum()
    truth = adata.varm["true_expression"]
    true_lfc = np.log2(truth[:, 0] / truth[:, 1])
    correlation = np.corrcoef(true_lfc, result["lfc_mean"])[0, 1]
    print(
        f"\n[DE known answer] AUROC={auroc:.3f} declared={declared.sum()} empirical FDR={empirical_fdr:.3f} "
        f"power={power:.3f} corr(lfc_mean, true lfc)={correlation:.3f}"
    )
    assert auroc >= 0.9
    assert empirical_fdr <= 0.15
    assert power >= 0.8
    assert correlation >= 0.9


def test_batch_correction_and_options(de_model):
    adata = de_model.adata
    marker = (adata.var["marker_of"] != "").to_numpy()
    corrected = de_model.differential_expression(
        groupby="labels",
        group1="label_0",
        group2="label_1",
        mode="change",
        batch_correction=True,
        silent=True,
        n_samples_overall=2000,
    )
    assert (corrected["comparison"] == "label_0 vs label_1").all()
    top = corrected.index[: marker.sum()]
    assert adata.var.loc[top, "marker_of"].ne("").mean() >= 0.9
    one_batch = de_model.differential_expression(
        groupby="labels",
        group1="label_0",
        batch_correction=True,
        batchid1=["batch_0"],
        batchid2="batch_0",
        silent=True,
        n_samples_overall=500,
    )
    assert list(one_batch.columns) == VANILLA_COLUMNS + RAW_COLUMNS + ["comparison", "group1", "group2"]
    with pytest.warns(UserWarning, match="differ but overlap"):
        de_model.differential_expression(groupby="labels", group1="label_0", batch_correction=True,
                                         batchid1=["batch_0", "batch_1"], batchid2="batch_0", silent=True,
                                         n_samples_overall=200)
    options = de_model.differential_expression(
        idx1="labels == 'label_0'", mode="change", delta=None, all_stats=False, fdr_target=0.1,
        filter_outlier_cells=True, use_permutation=True, m_permutation=1000, cred_interval_lvls=[0.5, 0.9],
        test_mode="two", n_samples_overall=500, silent=True,
    )
    assert list(options.columns) == CHANGE_COLUMNS + [
        "lfc_confidence_interval_0.5_min", "lfc_confidence_interval_0.5_max",
        "lfc_confidence_interval_0.9_min", "lfc_confidence_interval_0.9_max", "is_de_fdr_0.1"]
    assert options["delta"].nunique() == 1 and options["delta"].iloc[0] >= 0.1
    inner = options[["lfc_confidence_interval_0.5_min", "lfc_confidence_interval_0.5_max"]].to_numpy()
    outer = options[["lfc_confidence_interval_0.9_min", "lfc_confidence_interval_0.9_max"]].to_numpy()
    assert (outer[:, 0] <= inner[:, 0] + 1e-6).all() and (outer[:, 1] >= inner[:, 1] - 1e-6).all()


def test_groups_from_idx_forms_agree(de_model):
    adata = de_model.adata
    mask = (adata.obs["labels"] == "label_1").to_numpy()
    results = []
    for idx1, idx2 in [
        (mask, ~mask),
        (np.flatnonzero(mask), None),
        ("labels == 'label_1'", "labels != 'label_1'"),
    ]:
        settings.seed = 7
        results.append(
            de_model.differential_expression(idx1=idx1, idx2=idx2, n_samples_overall=300, silent=True)
        )
    for other in results[1:]:
        pd.testing.assert_frame_equal(results[0], other)
    assert list(results[0].columns) == VANILLA_COLUMNS + RAW_COLUMNS
    assert results[0]["bayes_factor"].is_monotonic_decreasing
    settings.seed = 7
    grouped = de_model.differential_expression(
        groupby="labels", group1="label_1", n_samples_overall=300, silent=True
    )
    pd.testing.assert_frame_equal(results[0], grouped.drop(columns=["comparison", "group1", "group2"]))
    # seeded: the same call twice gives the same table
    settings.seed = 3
    first = de_model.differential_expression(
        groupby="labels", mode="change", n_samples_overall=300, silent=True
    )
    settings.seed = 3
    second = de_model.differential_expression(
        groupby="labels", mode="change", n_samples_overall=300, silent=True
    )
    pd.testing.assert_frame_equal(first, second)
    assert list(first["comparison"].unique()) == ["label_0 vs Rest", "label_1 vs Rest"]
    assert len(first) == 2 * adata.n_vars


def test_bad_groups_raise_clear_errors(de_model):
    adata = de_model.adata
    de = lambda **kw: de_model.differential_expression(silent=True, n_samples_overall=50, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="not found"):
        de(groupby="labels", group1="label_9")
    with pytest.raises(ValueError, match="not found"):
        de(groupby="labels", group1="label_0", group2="nope")
    with pytest.raises(ValueError, match="not a column"):
        de(groupby="cell_type")
    with pytest.raises(ValueError, match="groupby"):
        de()
    with pytest.raises(ValueError, match="Inconsistent batch policy"):
        de(groupby="labels", batchid1=["batch_0"])
    with pytest.raises(ValueError, match="batch categories"):
        de(groupby="labels", batch_correction=True, batchid1=["batch_7"])
    with pytest.raises(ValueError, match="idx1 selects no cell"):
        de(idx1="labels == 'label_7'")
    with pytest.raises(ValueError, match="idx1 selects no cell"):
        de(idx1=np.zeros(adata.n_obs, dtype=bool))
    with pytest.raises(ValueError, match="idx2 selects no cell"):
        de(idx1=[0, 1], idx2=[])
    with pytest.raises(ValueError, match="empty"):
        de(idx1=np.ones(adata.n_obs, dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        de(idx1=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="mode"):
        de(groupby="labels", mode="fancy")
    with pytest.raises(TypeError, match="unexpected"):
        de(groupby="labels", n_sample=5)
    adata.obs["single"] = pd.Categorical(["only"] * adata.n_obs)
    adata.obs["unused"] = pd.Categorical(
        adata.obs["labels"].astype(str), categories=["label_0", "label_1", "ghost"]
    )
    try:
        with pytest.raises(ValueError, match="single category"):
            de(groupby="single")
        with pytest.raises(ValueError, match="rest .* is empty"):
            de(groupby="single", group1="only")
        with pytest.raises(ValueError, match="'ghost' .* has no cell"):
            de(groupby="unused")
    finally:
        del adata.obs["single"], adata.obs["unused"]


# ------------------------------------------------------------------------------- scvi-tools fixture
@pytest.mark.skipif(not FIXTURE.exists(), reason=f"scvi-tools fixture not found at {FIXTURE}")
@pytest.mark.parametrize("mode, key", [("vanilla", "bayes_factor"), ("change", "lfc_mean")])
def test_agrees_with_scvi_tools_fixture(mode, key):
    from scipy.stats import spearmanr

    model = SCVI.load(FIXTURE / "model")
    reference = pd.read_csv(FIXTURE / f"de_{mode}_cell_line.csv", index_col=0)
    settings.seed = 0
    ours = model.differential_expression(groupby="cell_line", mode=mode, silent=True)
    assert list(ours.columns) == list(reference.columns)
    assert list(ours["comparison"].unique()) == list(reference["comparison"].unique())
    correlations = {}
    for comparison, expected in reference.groupby("comparison", sort=False):
        got = ours[ours["comparison"] == comparison]
        assert set(got.index) == set(expected.index)
        got = got.loc[expected.index]
        correlations[comparison] = spearmanr(expected[key], got[key]).statistic
        np.testing.assert_allclose(got["raw_mean1"], expected["raw_mean1"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["non_zeros_proportion2"], expected["non_zeros_proportion2"], atol=1e-9)
        np.testing.assert_allclose(
            got["raw_normalized_mean2"], expected["raw_normalized_mean2"], rtol=1e-4, atol=1e-3
        )
        if mode == "change":
            agreement = (got["is_de_fdr_0.05"] == expected["is_de_fdr_0.05"]).mean()
            assert agreement >= 0.98, (comparison, agreement)
    print(
        f"\n[DE vs scvi-tools, {mode}, Spearman on {key}] "
        + ", ".join(f"{c}: {r:.4f}" for c, r in correlations.items())
    )
    assert min(correlations.values()) >= 0.9


def test_importance_weights_run(de_model):
    result = de_model.differential_expression(
        groupby="labels",
        group1="label_0",
        weights="importance",
        importance_weighting_kwargs={"max_cells": 128, "n_mc_samples": 50},
        n_samples_overall=300,
        silent=True,
    )
    assert list(result.columns) == VANILLA_COLUMNS + RAW_COLUMNS + ["comparison", "group1", "group2"]
    strongest = (
        result["bayes_factor"].abs().sort_values(ascending=False, kind="stable").index[:40]
    )  # up or down
    # random ranking: 0.2. The importance-weighted ranking is unstable: 0.55–0.8 across float-level
    # changes of the trained weights (fused vs multi-tensor Adam) and ~0.6 with 2000 draws (the
    # aggregate-posterior weights degenerate onto few draws); the bar checks it stays well above random.
    assert de_model.adata.var.loc[strongest, "marker_of"].ne("").mean() >= 0.45
