"""Out-of-core data: an AnnData opened with ``read_h5ad(path, backed="r")`` is set up, trained and
queried by streaming rows from the file, with the same results as in memory for the same weights."""

from __future__ import annotations

import warnings

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pyro_scvi import SCVI
from pyro_scvi.data import backed, synthetic_iid
from pyro_scvi.data.loader import RegisteredData, split_indices
from pyro_scvi.data.registry import format_registry, library_size_prior
from pyro_scvi.differential import raw_count_statistics

FORMATS = ["csr", "dense"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 300 generated cells × 60 genes written with CSR X and with dense X."""
    folder = tmp_path_factory.mktemp("backed")
    paths = {}
    for name, sparse_format in (("csr", "csr_matrix"), ("dense", None)):
        adata = synthetic_iid(
            batch_size=150, n_genes=60, n_batches=2, n_labels=3, sparse_format=sparse_format, seed=4
        )
        paths[name] = folder / f"{name}.h5ad"
        adata.write_h5ad(paths[name])
    return paths


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of one minibatch and windows of two blocks, so that 300 cells make several blocks."""
    monkeypatch.setattr(backed, "BLOCK_BATCHES", 1)
    monkeypatch.setattr(backed, "WINDOW_BLOCKS", 2)


def _open(path, **setup):
    disk = anndata.read_h5ad(path, backed="r")
    memory = anndata.read_h5ad(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SCVI.setup_anndata(disk, **setup)
        SCVI.setup_anndata(memory, **setup)
    return disk, memory


def _dense(matrix):
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


@pytest.mark.parametrize("fmt", FORMATS)
def test_setup_on_backed_matches_memory(files, fmt):
    disk, memory = _open(files[fmt], batch_key="batch", labels_key="labels")
    assert disk.isbacked and backed.is_backed(disk.X)
    registry_disk, registry_memory = SCVI._registry_of(disk), SCVI._registry_of(memory)
    assert format_registry(registry_disk) == format_registry(registry_memory)
    np.testing.assert_array_equal(disk.obs["_scvi_batch"], memory.obs["_scvi_batch"])
    data_disk, data_memory = RegisteredData(disk, registry_disk), RegisteredData(memory, registry_memory)
    assert data_disk.backed is not None and data_memory.backed is None
    torch.testing.assert_close(data_disk.log_library, data_memory.log_library, rtol=0, atol=0)
    for a, b in zip(library_size_prior(disk, registry_disk), library_size_prior(memory, registry_memory)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_read_in_increasing_order_come_back_in_requested_order(files, fmt):
    disk, memory = _open(files[fmt])
    reader = backed.BackedCounts(disk.X)
    wanted = np.array([5, 3, 250, 3, 100, 101, 299, 0])
    np.testing.assert_array_equal(_dense(reader.read_rows(wanted)), _dense(memory.X[wanted]))
    np.testing.assert_array_equal(_dense(reader.read_rows(np.arange(10, 40))), _dense(memory.X[10:40]))
    assert reader.n_reads == 1 + 4  # runs {0, 3, 5}, {100, 101}, {250}, {299}; then one slice


def test_block_shuffled_epoch_visits_every_training_cell_once(files):
    disk, memory = _open(files["csr"])
    reader = backed.BackedCounts(disk.X)
    train, _, _ = split_indices(disk.n_obs, 0.9, batch_size=32, seed=0)
    torch.manual_seed(0)
    batches = list(backed.block_shuffled(reader, train, batch_size=32))
    cells = np.concatenate([c for c, _ in batches])
    np.testing.assert_array_equal(np.sort(cells), np.sort(train))  # each once
    assert [len(c) for c, _ in batches] == [32] * (len(train) // 32) + [len(train) % 32]
    assert not np.array_equal(cells, np.sort(train))  # shuffled
    for c, rows in batches:  # the rows are those of the cells
        np.testing.assert_array_equal(_dense(rows), memory.X[c].toarray())
    assert reader.max_rows_read < 64  # blocks of 32 training cells (plus the cells between)
    dropped = list(backed.block_shuffled(reader, train, batch_size=32, drop_last=True))
    assert [len(c) for c, _ in dropped] == [32] * (len(train) // 32)
    torch.manual_seed(0)  # seeded: the same epoch again
    again = np.concatenate([c for c, _ in backed.block_shuffled(reader, train, batch_size=32)])
    np.testing.assert_array_equal(again, cells)


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_and_query_backed_match_memory(files, fmt, monkeypatch):
    disk, memory = _open(files[fmt], batch_key="batch")
    n_values = int(np.prod(disk.shape))
    largest = []
    original = h5py.Dataset.__getitem__

    def spy(self, selection):  # every read from the file, anndata's and ours
        out = original(self, selection)
        largest.append(np.size(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    monkeypatch.setattr(backed, "SCAN_ELEMENTS", 2000)
    monkeypatch.setattr(backed, "MAX_GAP", 2)  # tiny file: random validation cells are read run by run
    model = SCVI(disk, n_hidden=32, n_latent=5)
    model.train(max_epochs=1, batch_size=32, check_val_every_n_epoch=1, enable_progress_bar=False)
    latent = model.get_latent_representation(batch_size=32)
    assert disk.isbacked and backed.is_backed(disk.X)  # never loaded into memory
    big = [n for n in largest if n > disk.n_vars + 1]  # indptr (n_obs + 1 values) is read whole
    assert big and max(big) < n_values / 4, "a read took a large part of the matrix"

    np.testing.assert_allclose(latent, model.get_latent_representation(adata=memory), rtol=1e-5, atol=1e-6)
    for method in ("get_elbo", "get_reconstruction_error"):
        torch.manual_seed(1)
        on_disk = getattr(model, method)()
        torch.manual_seed(1)
        in_memory = getattr(model, method)(adata=memory)
        on_disk = on_disk if isinstance(on_disk, dict) else {"value": on_disk}
        in_memory = in_memory if isinstance(in_memory, dict) else {"value": in_memory}
        for key in on_disk:
            np.testing.assert_allclose(np.asarray(on_disk[key]), np.asarray(in_memory[key]), rtol=1e-5)
    torch.manual_seed(2)
    scale_disk = model.get_normalized_expression(indices=[7, 3, 200])
    torch.manual_seed(2)
    scale_memory = model.get_normalized_expression(adata=memory, indices=[7, 3, 200])
    np.testing.assert_allclose(np.asarray(scale_disk), np.asarray(scale_memory), rtol=1e-5, atol=1e-7)
    assert len(model.history["elbo_train"]) == 1
    assert np.isfinite(model.history["elbo_validation"].values).all()


def test_raw_count_statistics_streamed(files):
    disk, memory = _open(files["csr"])
    mask1 = np.arange(disk.n_obs) % 3 == 0
    mask2 = np.arange(disk.n_obs) % 5 == 1
    streamed = raw_count_statistics(disk.X, mask1, mask2)
    in_memory = raw_count_statistics(memory.X, mask1, mask2)
    for key in in_memory:
        np.testing.assert_allclose(streamed[key], in_memory[key], rtol=1e-10)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_bad_counts_in_backed_file_are_caught(tmp_path, fmt, bad):
    sparse_format = "csr_matrix" if fmt == "csr" else None
    adata = synthetic_iid(batch_size=20, n_genes=10, n_batches=1, sparse_format=sparse_format)
    x = adata.X.astype(np.float32)
    if sp.issparse(x):
        x.data[3] = -1.0 if bad == "negative" else np.nan
    else:
        x[2, 3] = -1.0 if bad == "negative" else np.nan
    adata.X = x
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError) as in_memory:
        SCVI.setup_anndata(anndata.read_h5ad(tmp_path / "bad.h5ad"))
    with pytest.raises(ValueError) as on_disk:
        SCVI.setup_anndata(anndata.read_h5ad(tmp_path / "bad.h5ad", backed="r"))
    assert str(on_disk.value) == str(in_memory.value)


def test_non_integer_and_empty_cells_warn_as_in_memory(tmp_path):
    adata = synthetic_iid(batch_size=20, n_genes=10, n_batches=1, sparse_format="csr_matrix")
    x = adata.X.toarray().astype(np.float32)
    x[0, 0] += 0.5
    x[5] = 0  # an empty cell
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(tmp_path / "odd.h5ad")
    messages = []
    for backed_mode in (None, "r"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SCVI.setup_anndata(anndata.read_h5ad(tmp_path / "odd.h5ad", backed=backed_mode))
        messages.append(sorted(str(w.message) for w in caught))
    assert messages[0] == messages[1]
    assert any("unnormalized" in m for m in messages[1]) and any("empty cells" in m for m in messages[1])


def test_in_memory_shuffle_is_unchanged(files):
    _, memory = _open(files["csr"])
    data = RegisteredData(memory, SCVI._registry_of(memory))
    indices = np.arange(10, 250)
    torch.manual_seed(3)
    cells = np.concatenate([c for c, _ in data.iterate(indices, 32, shuffle=True)])
    torch.manual_seed(3)
    np.testing.assert_array_equal(cells, indices[torch.randperm(len(indices)).numpy()])
