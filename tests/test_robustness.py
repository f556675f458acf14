"""Bad input and faults (issue 8): every case gets a clear error or the documented warning, and a
failing check leaves the user's AnnData and files unchanged.

Cases already covered elsewhere are not repeated here: NaN/inf/negative counts and the
non-integer warning (test_registry.test_invalid_values_raise_naming_the_layer,
test_non_integer_warning_for_x_and_layer), views at setup (test_view_is_rejected), missing layer
(test_unknown_layer_and_obs_key), small categories (test_small_category_warning), unseen
categories (test_model_api.test_queries_on_a_new_anndata_transfer_the_setup), save overwrite /
failed save / truncated / pickle payloads (test_model_api, test_io_scvi_tools), split remainders
(test_training.test_split_never_leaves_a_tiny_training_minibatch) and reproducibility
(test_training.test_same_seed_same_numbers_on_cpu).
"""

from __future__ import annotations

import copy
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pyro_scvi import SCVI, settings
from pyro_scvi.data import synthetic_iid
from pyro_scvi.data.loader import RegisteredData, minibatch_from_dict
from pyro_scvi.data.registry import setup_registry

torch.set_num_threads(2)
QUIET = {"enable_progress_bar": False}


def small(n_per_batch=40, n_genes=25, n_batches=2, seed=1):
    return synthetic_iid(batch_size=n_per_batch, n_genes=n_genes, n_batches=n_batches, n_labels=2, seed=seed)


def setup_quietly(adata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SCVI.setup_anndata(adata, **kwargs)


def state(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def assert_finite_model(model):
    for name, value in model.module.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    assert np.isfinite(model.get_latent_representation()).all()


def snapshot_adata(adata):
    """Everything a failed check must leave as it was."""
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return (X, adata.obs.copy(), {k: np.array(v) for k, v in adata.obsm.items()},
            copy.deepcopy(dict(adata.uns)), list(adata.layers), list(adata.var_names), list(adata.obs_names))


def assert_unchanged(adata, before):
    X, obs, obsm, uns, layers, var_names, obs_names = before
    now = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(now, X)
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.obsm) == set(obsm) and all(
        np.array_equal(np.asarray(adata.obsm[k]), v) for k, v in obsm.items()
    )
    assert set(adata.uns) == set(uns) and all(adata.uns[k] == uns[k] for k in uns)
    assert (
        list(adata.layers) == layers
        and list(adata.var_names) == var_names
        and list(adata.obs_names) == obs_names
    )


class ListModule:
    """A datamodule over ``adata``'s counts in minibatches of 20.

    ``hook(epoch, i)`` runs before each batch.
    """

    def __init__(self, adata, hook=None, on_epoch=None):
        self.X, self.codes = np.asarray(adata.X, dtype=np.float32), adata.obs["_scvi_batch"].to_numpy()
        self.hook, self.on_epoch, self.epoch = hook, on_epoch, -1

    def train_dataloader(self):
        self.epoch += 1
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)
        for i, start in enumerate(range(0, len(self.X), 20)):
            x = torch.tensor(self.X[start:start + 20])
            if self.hook is not None:
                x = self.hook(self.epoch, i, x)
            yield {"X": x, "batch": torch.tensor(self.codes[start:start + 20])[:, None]}


# ---------------------------------------------------------------------------------- faults in training


def test_nan_loss_keeps_last_finite_weights_and_history():
    adata = small()
    setup_quietly(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16)
    expected = {}

    def poison(epoch, i, x):  # epoch 2 feeds NaN counts (as if the data were corrupted)
        return x * float("nan") if epoch == 2 else x

    def on_epoch(epoch):  # the weights at the start of the failing epoch
        if epoch == 2:
            expected.update(state(model))

    with pytest.raises(
        FloatingPointError, match=r"(?s)epoch 2.*last finite.*raw counts.*learning rate.*plan_kwargs"
    ):
        model.train(max_epochs=5, datamodule=ListModule(adata, poison, on_epoch), **QUIET)
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert model.is_trained and len(model.history["train_loss"]) == 2
    assert np.isfinite(model.history["train_loss"].to_numpy()).all()
    assert_finite_model(model)
    model.train(max_epochs=1, **QUIET)  # still trainable, history goes on
    assert list(model.history["train_loss"].index) == [0, 1, 2]


def test_absurd_learning_rate_stops_with_a_clear_error():
    adata = small()
    setup_quietly(adata)
    model = SCVI(adata, n_hidden=16)
    model.train(max_epochs=1, **QUIET)
    with pytest.raises(
        FloatingPointError, match=r"(?s)normalised or log data.*learning rate that is too high"
    ):
        model.train(max_epochs=30, plan_kwargs={"lr": 1e4}, **QUIET)
    assert_finite_model(model)
    assert np.isfinite(model.history["train_loss"].to_numpy()).all()


def test_nan_in_the_first_epoch_leaves_an_untrained_model_with_its_initial_weights():
    adata = small()
    setup_quietly(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16)
    initial = state(model)
    with pytest.raises(FloatingPointError):
        model.train(max_epochs=3, datamodule=ListModule(adata, lambda e, i, x: x * float("inf")), **QUIET)
    assert not model.is_trained and model.history is None
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)


def test_ctrl_c_leaves_a_usable_model_with_its_history():
    adata = small()
    setup_quietly(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16)

    def interrupt(epoch, i, x):
        if epoch == 3 and i == 1:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        model.train(max_epochs=10, datamodule=ListModule(adata, interrupt), **QUIET)
    assert model.is_trained and list(model.history["train_loss"].index) == [0, 1, 2]
    assert not model.module.training  # back in eval mode
    assert_finite_model(model)
    model.train(max_epochs=1, **QUIET)
    assert len(model.history["train_loss"]) == 4


# ---------------------------------------------------------------------------------- odd but valid data


@pytest.mark.parametrize("likelihood", ["zinb", "poisson"])
def test_empty_cells_and_never_expressed_genes_train_with_a_warning(likelihood):
    adata = small()
    adata.X[:3] = 0  # 3 empty cells
    adata.X[:, :2] = 0  # 2 genes never expressed
    with pytest.warns(UserWarning, match=r"empty cells.*filter_cells.*3 cell\(s\) have zero total counts"):
        SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, gene_likelihood=likelihood)
    model.train(max_epochs=4, **QUIET)  # log(0) library would give NaN gradients with Poisson
    assert np.isfinite(model.history["train_loss"].to_numpy()).all()
    assert_finite_model(model)
    expression = model.get_normalized_expression(return_numpy=True)
    assert np.isfinite(expression).all() and expression.shape == adata.shape
    np.testing.assert_allclose(model.get_latent_library_size()[:3], 1.0)  # an empty cell counts as 1 count
    assert np.isfinite(float(model.get_elbo()))


def test_never_expressed_genes_alone_give_no_warning():
    adata = small()
    adata.X[:, :5] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SCVI.setup_anndata(adata)


def test_empty_row_in_a_datamodule_minibatch_has_a_finite_library():
    batch = minibatch_from_dict({"X": torch.tensor([[0.0, 0.0], [1.0, 3.0]])})
    torch.testing.assert_close(batch.log_library, torch.tensor([[0.0], [np.log(4.0)]], dtype=torch.float32))
    # SciPy COO is densified
    coo = minibatch_from_dict({"X": sp.coo_matrix(np.array([[0.0, 2.0], [1.0, 3.0]]))})
    torch.testing.assert_close(coo.x, torch.tensor([[0.0, 2.0], [1.0, 3.0]]))


def test_every_matrix_format_gives_the_same_model():
    base = small(n_per_batch=30)
    dense = np.asarray(base.X)
    latents = {}
    for name, matrix in [("float32", dense.astype(np.float32)), ("float64", dense.astype(np.float64)),
                         ("int32", dense.astype(np.int32)), ("int64", dense.astype(np.int64)),
                         ("csr", sp.csr_matrix(dense)), ("csc", sp.csc_matrix(dense)),
                         ("csr_array", sp.csr_array(dense))]:
        adata = base.copy()
        adata.X = matrix
        setup_quietly(adata, batch_key="batch")
        settings.seed = 3
        model = SCVI(adata, n_hidden=16)
        model.train(max_epochs=2, **QUIET)
        latents[name] = model.get_latent_representation()
    for name, latent in latents.items():
        np.testing.assert_array_equal(latent, latents["float32"], err_msg=name)
    # AnnData itself refuses COO (convert with .tocsr()); COO minibatches from a datamodule work (above)
    with pytest.raises(ValueError, match="CSR and CSC"):
        base.X = sp.coo_matrix(dense)


def test_views_are_copied_by_model_methods():
    adata = small()
    setup_quietly(adata, batch_key="batch")
    with pytest.raises(ValueError, match=r"adata = adata.copy\(\)"):
        SCVI.setup_anndata(adata[:10])
    model = SCVI(adata, n_hidden=16)
    model.train(max_epochs=1, **QUIET)
    view = adata[:10]
    np.testing.assert_allclose(model.get_latent_representation(view),
                               model.get_latent_representation(indices=np.arange(10)), rtol=1e-5, atol=1e-6)
    assert_unchanged(adata, snapshot_adata(adata))


def test_category_with_one_cell_trains():
    adata = small()
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.obs.iloc[0, adata.obs.columns.get_loc("batch")] = "solo"
    with pytest.warns(UserWarning, match="Category solo .* fewer than 3 cells"):
        SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16)
    assert model.summary_stats["n_batch"] == 3
    model.train(max_epochs=2, **QUIET)
    assert_finite_model(model)


# ---------------------------------------------------------------------------------- tiny data, BatchNorm


def test_a_single_cell_is_a_clear_error():
    adata = synthetic_iid(batch_size=1, n_genes=10, n_batches=1, n_labels=1, seed=1)
    setup_quietly(adata)
    model = SCVI(adata, n_hidden=8)
    with pytest.raises(ValueError, match="BatchNorm"):
        model.train(max_epochs=1, **QUIET)
    assert not model.is_trained


def test_fewer_cells_than_batch_size():
    adata = synthetic_iid(batch_size=9, n_genes=10, n_batches=1, n_labels=1, seed=1)
    setup_quietly(adata)
    model = SCVI(adata, n_hidden=8)
    model.train(max_epochs=2, batch_size=128, **QUIET)
    assert len(model.train_indices) == 9 and len(model.validation_indices) == 0
    assert_finite_model(model)


@pytest.mark.parametrize(
    "n_obs, train_size, validation_size", [(17, 1.0, None), (18, 0.9, None), (21, 0.8, 0.1), (33, 1.0, 0.0)]
)
def test_one_cell_left_over_never_reaches_batchnorm(n_obs, train_size, validation_size):
    adata = synthetic_iid(batch_size=n_obs, n_genes=10, n_batches=1, n_labels=1, seed=1)
    setup_quietly(adata)
    model = SCVI(adata, n_hidden=8)
    with pytest.warns(UserWarning, match="moved"):
        model.train(
            max_epochs=1, batch_size=16, train_size=train_size, validation_size=validation_size, **QUIET
        )
    assert len(model.train_indices) % 16 not in (1, 2)
    assert len(model.train_indices) + len(model.validation_indices) + len(model.test_indices) == n_obs


def test_impossible_minibatches_are_clear_errors():
    adata = synthetic_iid(batch_size=40, n_genes=10, n_batches=1, n_labels=1, seed=1)
    setup_quietly(adata)
    model = SCVI(adata, n_hidden=8)
    with pytest.raises(ValueError, match="BatchNorm"):  # external indices with one cell left over
        model.train(
            max_epochs=1,
            batch_size=16,
            datasplitter_kwargs={"external_indexing": [np.arange(17), [], []]},
            **QUIET,
        )
    with pytest.raises(ValueError, match="BatchNorm"):
        model.train(max_epochs=1, batch_size=1, **QUIET)
    with pytest.raises(ValueError, match="no training minibatch"):
        model.train(max_epochs=1, batch_size=128, datasplitter_kwargs={"drop_last": True}, **QUIET)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            model.train(max_epochs=1, batch_size=bad, **QUIET)
    assert not model.is_trained
    # without BatchNorm one-cell minibatches are fine
    plain = SCVI(adata, n_hidden=8, use_batch_norm="none")
    plain.train(max_epochs=1, batch_size=1, train_size=0.1, **QUIET)
    assert_finite_model(plain)


# ---------------------------------------------------------------------------------- names, keys, transfer


def test_duplicated_names_warn_and_still_work():
    adata = small()
    adata.var_names = ["g0", "g0"] + [f"g{i}" for i in range(2, adata.n_vars)]
    with pytest.warns(UserWarning, match=r"1 gene name\(s\) are duplicated .*'g0'.*var_names_make_unique"):
        setup_quietly_except_names(adata)
    adata.var_names_make_unique()
    adata.obs_names = ["c"] * adata.n_obs
    with pytest.warns(UserWarning, match=r"cell name\(s\) are duplicated .*obs_names_make_unique"):
        setup_quietly_except_names(adata)
    model = SCVI(adata, n_hidden=8)
    model.train(max_epochs=1, **QUIET)
    assert model.get_latent_representation().shape == (adata.n_obs, 10)


def setup_quietly_except_names(adata):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?!.*duplicated)")
        SCVI.setup_anndata(adata)


def test_missing_obs_key_names_it_and_lists_the_columns():
    adata = small()
    before = snapshot_adata(adata)
    with pytest.raises(
        KeyError,
        match=r"btch not found in adata\.obs\. Available columns: \['batch', 'labels', 'library_size'\]",
    ):
        SCVI.setup_anndata(adata, batch_key="btch")
    assert_unchanged(adata, before)


@pytest.fixture(scope="module")
def fitted():
    settings.seed = 0
    adata = small(seed=4)
    setup_quietly(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16)
    model.train(max_epochs=2, **QUIET)
    return model


def fresh_copy(adata):
    other = adata.copy()
    del other.uns["_scvi_uuid"]
    for column in ("_scvi_batch", "_scvi_labels"):
        del other.obs[column]
    return other


def test_gene_order_changed_is_an_error_naming_the_fix(fitted):
    other = fresh_copy(fitted.adata)
    permuted = other[:, other.var_names[::-1]].copy()
    before = snapshot_adata(permuted)
    with pytest.raises(ValueError, match=r"different order.*adata\[:, model\.adata\.var_names\]"):
        fitted.get_latent_representation(permuted)
    assert_unchanged(permuted, before)
    fixed = permuted[:, fitted.adata.var_names].copy()  # the suggested fix works
    np.testing.assert_allclose(
        fitted.get_latent_representation(fixed), fitted.get_latent_representation(), rtol=1e-5, atol=1e-6
    )


def test_unseen_genes_are_an_error_naming_them(fitted):
    other = fresh_copy(fitted.adata)
    other.var_names = ["new_gene"] + list(other.var_names[1:])
    before = snapshot_adata(other)
    with pytest.raises(
        ValueError, match=r"1 of the model's genes are missing.*new_gene.*prepare_query_anndata"
    ):
        fitted.get_normalized_expression(other)
    assert_unchanged(other, before)


def test_failing_transfer_of_an_unseen_category_leaves_the_anndata_unchanged(fitted):
    other = fresh_copy(fitted.adata)
    other.obs["batch"] = pd.Categorical(["batch_9"] * other.n_obs)
    before = snapshot_adata(other)
    with pytest.raises(ValueError, match="batch_9"):
        fitted.get_latent_representation(other)
    assert_unchanged(other, before)


def test_failing_setup_leaves_the_anndata_unchanged():
    adata = small()
    adata.X[3, 4] = np.nan
    before = snapshot_adata(adata)
    with pytest.raises(ValueError, match="NaN"):
        SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    np.testing.assert_array_equal(np.isnan(adata.X), np.isnan(before[0]))
    pd.testing.assert_frame_equal(adata.obs, before[1])
    assert dict(adata.obsm) == {} and set(adata.uns) == set(before[3])


def test_load_with_other_gene_order_only_warns(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    other = fresh_copy(fitted.adata)[:, fitted.adata.var_names[::-1]].copy()
    with pytest.warns(UserWarning, match="`var_names` for the loaded `model` does not match"):
        SCVI.load(tmp_path / "m", adata=other)


# ------------------------------------------------------------------------------------------ files


def test_refused_overwrite_and_foreign_files(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(ValueError, match="already exists"):
        fitted.save(tmp_path / "m", save_anndata=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    for name, write in [("text", lambda p: p.write_text("hello, not a model")),
                        ("list", lambda p: torch.save([1, 2, 3], p)),
                        ("tensor", lambda p: torch.save(torch.zeros(3), p))]:
        (tmp_path / name).mkdir()
        write(tmp_path / name / "model.pt")
        with pytest.raises(ValueError, match="model file"):
            SCVI.load(tmp_path / name, adata=fitted.adata)


# ------------------------------------------------------------------------------------------ property test


@hsettings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    n_cells=st.integers(1, 30),
    n_genes=st.integers(1, 6),
    density=st.floats(0.0, 1.0),
    layout=st.sampled_from(["dense", "csr", "csc"]),
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_minibatches_reproduce_the_counts_for_any_matrix(n_cells, n_genes, density, layout, dtype, seed):
    rng = np.random.default_rng(seed)
    counts = (rng.poisson(3.0, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)).astype(dtype)
    matrix = {"dense": counts, "csr": sp.csr_matrix(counts), "csc": sp.csc_matrix(counts)}[layout]
    adata = anndata.AnnData(matrix, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = setup_registry(adata)
    empty = counts.sum(1) == 0
    assert any("empty cells" in str(w.message) for w in caught) == bool(empty.any())
    data = RegisteredData(adata, registry)
    order = rng.permutation(n_cells)
    rows = [batch for _, batch in data.iterate(order, batch_size=7)]
    x = torch.cat([b.x for b in rows])
    np.testing.assert_array_equal(x.numpy(), counts[order].astype(np.float32))
    log_library = torch.cat([b.log_library for b in rows]).numpy().ravel()
    assert np.isfinite(log_library).all()
    totals = counts[order].sum(1).astype(np.float64)
    np.testing.assert_allclose(log_library, np.log(np.where(totals > 0, totals, 1.0)), rtol=1e-6)
