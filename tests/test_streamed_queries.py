"""Streamed expression queries and DE reductions (issue 17, item 4) equal the unstreamed computation.

``get_normalized_expression`` no longer stacks ``(S, n, G)`` draws for ``return_mean=True``, and
with ``n_samples_overall`` it chooses the rows first and decodes only the distinct draws they use;
the model replay stops once the queried sites are recorded; DE count statistics reuse one
preparation of the counts; ``lfc_std`` is summed by blocks. Each is checked against the direct
computation on small generated data, bitwise where the arithmetic is the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from pyro.poutine.messenger import Messenger

from pyro_scvi import SCVI, settings
from pyro_scvi.api.queries import _distinct_draw_plan, _gather_rows
from pyro_scvi.data import synthetic_iid
from pyro_scvi.differential import PreparedCounts, _std_over_draws, raw_count_statistics
from pyro_scvi.infer.posterior import posterior_sites, posterior_traces
from pyro_scvi.models import sites

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model():
    """A briefly trained model on 150 generated cells × 40 genes, 2 batches, 2 labels."""
    settings.seed = 0
    adata = synthetic_iid(batch_size=75, n_genes=40, n_batches=2, n_labels=2, seed=5)
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    scvi = SCVI(adata)
    scvi.train(max_epochs=3, enable_progress_bar=False)
    return scvi


class _LatentAtMean(Messenger):
    """Every ``z`` draw replaced by its distribution's mean: each draw of a cell decodes alike."""

    def _pyro_sample(self, msg):
        if msg["name"] == sites.Z:
            msg["value"] = msg["fn"].mean
            msg["done"] = True


def test_gather_rows_equals_indexing_the_stacked_draws():
    rng = np.random.default_rng(0)
    blocks = [torch.as_tensor(rng.random((4, n, 6), dtype=np.float32)) for n in (5, 3, 7)]
    stacked = torch.cat(blocks, dim=1).numpy()  # (S, n, G)
    rows = rng.integers(0, stacked.shape[0] * stacked.shape[1], size=50)
    expected = stacked.reshape(-1, 6)[rows]
    np.testing.assert_array_equal(_gather_rows(iter(blocks), *np.divmod(rows, 15)), expected)


def test_distinct_draw_plan_keeps_which_rows_share_a_draw():
    rng = np.random.default_rng(1)
    n_cells, n_samples, batch_size = 37, 6, 8
    rows = rng.integers(0, n_samples * n_cells, size=150)
    visit, draws, draw, position = _distinct_draw_plan(rows, n_samples, n_cells, batch_size)
    samples, cells = np.divmod(rows, n_cells)
    np.testing.assert_array_equal(visit[position], cells)  # each row keeps its cell
    old = cells * n_samples + samples
    new = position * n_samples + draw
    np.testing.assert_array_equal(old[:, None] == old[None], new[:, None] == new[None])
    assert np.all(draw < np.asarray(draws)[position // batch_size])  # within its minibatch's draws
    assert len(np.unique(new)) == len(np.unique(old))
    decoded = sum(m * min(batch_size, len(visit) - i * batch_size) for i, m in enumerate(draws))
    assert decoded < n_samples * n_cells  # fewer draws decoded than all S·n


@pytest.mark.parametrize("kwargs", [{}, {"indices": np.arange(10, 140), "batch_size": 32},
                                    {"transform_batch": ["batch_0", "batch_1"]}])
def test_n_samples_overall_rows_are_draws_of_their_cells(model, kwargs, monkeypatch):
    """With z at its mean every draw of a cell decodes to the same ρ: each resampled row must be
    its own cell's ρ, the cells being those of numpy's row choice."""
    cells = np.asarray(kwargs.get("indices", np.arange(model.adata.n_obs)))
    k = 700
    monkeypatch.setattr(model.module, "guide", _LatentAtMean()(model.module.guide))
    settings.seed = 4
    resampled = model.get_normalized_expression(n_samples_overall=k, return_numpy=True, **kwargs)
    settings.seed = 4
    rows = np.random.choice((k // len(cells) + 1) * len(cells), k, replace=True)  # the query's choice
    per_cell = model.get_normalized_expression(return_numpy=True, **kwargs)  # (n, G) at the mean z
    assert resampled.shape == (k, model.adata.n_vars)
    np.testing.assert_allclose(resampled, per_cell[rows % len(cells)], rtol=1e-5, atol=1e-7)


def test_n_samples_overall_rows_share_draws_like_the_chosen_rows(model):
    k = 700
    per_cell = k // model.adata.n_obs + 1
    settings.seed = 5
    resampled = model.get_normalized_expression(n_samples_overall=k, return_numpy=True)
    settings.seed = 5
    rows = np.random.choice(per_cell * model.adata.n_obs, k, replace=True)
    same_row = rows[:, None] == rows[None]
    same_value = (resampled[:, None] == resampled[None]).all(-1)
    np.testing.assert_array_equal(same_value, same_row)  # a repeated row is the same draw, others differ
    np.testing.assert_allclose(resampled.sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("n_samples", [1, 5])
def test_streamed_mean_equals_mean_of_stacked_draws(model, n_samples):
    settings.seed = 2
    mean = model.get_normalized_expression(n_samples=n_samples, return_mean=True, batch_size=40,
                                           return_numpy=True)
    settings.seed = 2
    stacked = model.get_normalized_expression(n_samples=n_samples, return_mean=False, batch_size=40,
                                              return_numpy=True)
    stacked = stacked.reshape(n_samples, *mean.shape)
    np.testing.assert_array_equal(mean, stacked.mean(0))


def test_partial_replay_stops_after_the_queried_sites_with_the_same_values(model):
    batch = next(model.minibatches(batch_size=30))
    module = model.module
    with model.pyro_scope():
        torch.manual_seed(0)
        _, (full,) = posterior_traces(module.model, module.guide, batch, 3)
        torch.manual_seed(0)
        _, (partial,) = posterior_traces(module.model, module.guide, batch, 3,
                                         stop_after=[sites.Z, sites.NORMALIZED_EXPRESSION])
        torch.manual_seed(0)
        (values,) = posterior_sites(module.model, module.guide, batch, 3, [sites.NORMALIZED_EXPRESSION])
    assert sites.X in full.nodes and sites.MEAN in full.nodes
    assert sites.X not in partial.nodes and sites.MEAN not in partial.nodes  # the replay ended early
    for name in (sites.Z, sites.NORMALIZED_EXPRESSION):
        torch.testing.assert_close(partial.nodes[name]["value"], full.nodes[name]["value"], rtol=0, atol=0)
    torch.testing.assert_close(values[sites.NORMALIZED_EXPRESSION],
                               full.nodes[sites.NORMALIZED_EXPRESSION]["value"], rtol=0, atol=0)


@pytest.mark.parametrize("sparse", [False, True])
def test_prepared_counts_statistics_equal_the_direct_means(sparse):
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.7, size=(30, 12)).astype(np.float64)
    dense[3] = 0  # a cell without counts contributes 0 to the normalized means
    counts = sp.csr_matrix(dense.astype(np.float32)) if sparse else dense.astype(np.float32)
    mask1 = rng.random(30) < 0.4
    mask2 = ~mask1
    totals = dense.sum(1, dtype=np.float64)
    scaled = np.divide(1e4 * dense, totals[:, None], out=np.zeros(dense.shape), where=totals[:, None] > 0)
    for stats in (raw_count_statistics(counts, mask1, mask2),
                  raw_count_statistics(PreparedCounts.of(counts), mask1, mask2)):
        for suffix, mask in (("1", mask1), ("2", mask2)):
            np.testing.assert_allclose(stats["raw_mean" + suffix], dense[mask].mean(0), rtol=1e-12)
            np.testing.assert_allclose(stats["non_zeros_proportion" + suffix], (dense[mask] != 0).mean(0),
                                       rtol=1e-12)
            np.testing.assert_allclose(stats["raw_normalized_mean" + suffix], scaled[mask].mean(0),
                                       rtol=1e-12)


def test_blockwise_std_equals_numpy_std():
    values = np.random.default_rng(2).normal(3.0, 2.0, size=(5003, 17)).astype(np.float32)
    mean = values.mean(0, dtype=np.float64)
    std = _std_over_draws(values, mean)
    assert std.dtype == np.float32
    np.testing.assert_allclose(std, values.astype(np.float64).std(0), rtol=1e-6)


@pytest.mark.parametrize("mode, columns", [
    ("vanilla", ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]),
    ("change", ["proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
                "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max"]),
])
def test_de_columns_are_unchanged(model, mode, columns):
    raw = ["raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2",
           "raw_normalized_mean1", "raw_normalized_mean2"]
    table = model.differential_expression(groupby="labels", mode=mode, silent=True, n_samples_overall=300)
    extra = ["is_de_fdr_0.05"] if mode == "change" else []
    assert list(table.columns) == columns + raw + extra + ["comparison", "group1", "group2"]
    assert len(table) == 2 * model.adata.n_vars
