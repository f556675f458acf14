"""Data-parallel training (``train(devices=N, strategy="ddp")`` under torchrun, gloo on CPU).

Two processes with ``batch_size=b`` must follow one process with ``batch_size=2b`` over the same
cell order (the ranks' shards at step k together are the k-th chunk of 2b cells of the epoch's
permutation), end with bitwise-identical weights and record the same history. The comparison is
deterministic because the children use no dropout, no BatchNorm and zero reparameterisation noise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata
import numpy as np
import pytest

from pyro_scvi import SCVI
from pyro_scvi.cli import main
from pyro_scvi.data import synthetic_iid
from pyro_scvi.infer.distributed import DataParallel, data_parallel_for, shard_order

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributions.normal

    torch.set_num_threads(1)
    # zero reparameterisation noise: z = posterior mean, so the runs can be compared exactly
    torch.distributions.normal._standard_normal = lambda shape, dtype, device: torch.zeros(
        shape, dtype=dtype, device=device
    )

    from pyro_scvi import SCVI, settings
    from pyro_scvi.data import synthetic_iid

    out, batch_size, devices = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings.seed = 0
    adata = synthetic_iid(batch_size=100, n_genes=50, n_batches=2, n_labels=2, seed=1)  # 200 cells
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4, use_batch_norm="none", dropout_rate=0.0)
    model.train(max_epochs=4, batch_size=batch_size, devices=devices, strategy="ddp", accelerator="cpu",
                early_stopping=True, enable_progress_bar=False, plan_kwargs={"lr": 5e-3})
    rank = int(os.environ.get("RANK", "0"))
    weights = {name: value.detach().cpu().numpy() for name, value in model.module.state_dict().items()}
    np.savez(os.path.join(out, f"rank{rank}.npz"), latent=model.get_latent_representation(), **weights)
    history = {key: frame.iloc[:, 0].tolist() for key, frame in model.history.items()}
    with open(os.path.join(out, f"history{rank}.json"), "w") as handle:
        json.dump(history, handle)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    return env


def _check(process: subprocess.Popen, name: str) -> None:
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, (
        f"{name} failed ({process.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two gloo ranks with batch 32 and one process (world size 1) with batch 64."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "worker.py"
    script.write_text(WORKER)
    (root / "two").mkdir()
    (root / "one").mkdir()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              f"--master_port={_free_port()}", str(script), str(root / "two"), "32", "2"]
    two = subprocess.Popen(launch, env=_child_env(), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    one = subprocess.Popen([sys.executable, str(script), str(root / "one"), "64", "1"], env=_child_env(),
                           cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    synthetic_iid(batch_size=60, n_genes=30, n_batches=2, n_labels=2, seed=3).write_h5ad(root / "cells.h5ad")
    cli = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "pyro_scvi", "train", str(root / "cells.h5ad"),
           "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--max-epochs", "2",
           "--n-hidden", "8", "--out", str(root / "cli")]
    cli_run = subprocess.Popen(cli, env=_child_env(), cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _check(two, "torchrun --nproc_per_node=2")
    _check(one, "one process")
    cli_stdout, cli_stderr = cli_run.communicate(timeout=240)
    assert cli_run.returncode == 0, f"{cli_stdout}\n{cli_stderr[-6000:]}"

    def load(folder, rank):
        weights = dict(np.load(root / folder / f"rank{rank}.npz"))
        history = json.loads((root / folder / f"history{rank}.json").read_text())
        return weights, history

    return {
        "rank0": load("two", 0),
        "rank1": load("two", 1),
        "single": load("one", 0),
        "cli": (root / "cli", cli_stdout),
    }


def test_ranks_end_identical(runs):
    (w0, h0), (w1, h1) = runs["rank0"], runs["rank1"]
    assert set(w0) == set(w1)
    for name in w0:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)
    assert h0 == h1
    assert len(h0["elbo_train"]) == 4 and len(h0["elbo_validation"]) == 4


def test_two_processes_match_one_process_with_twice_the_batch(runs):
    (w2, h2), (w1, h1) = runs["rank0"], runs["single"]
    for name in w1:
        if name == "latent":
            continue
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(w2["latent"], w1["latent"], rtol=1e-4, atol=1e-5)
    assert set(h2) == set(h1)
    for key in h1:
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # and training moved the weights at all (the comparison is not between two untouched models)
    assert h1["elbo_train"][-1] < h1["elbo_train"][0]


def test_shards_are_equal_and_cover_the_permutation():
    indices = np.arange(100, 203)  # 103 cells: padded to 104
    shards = [shard_order(indices, seed=5, epoch=2, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in shards} == {26}
    assert set(np.concatenate(shards)) == set(indices)
    one = shard_order(indices, seed=5, epoch=2, rank=0, world_size=1)
    b = 8  # step k of the 4 ranks with batch b = cells one[k*4b : (k+1)*4b]
    for k in range(3):
        together = np.concatenate([s[k * b : (k + 1) * b] for s in shards])
        assert sorted(together) == sorted(one[k * 4 * b : (k + 1) * 4 * b])
    assert not np.array_equal(one, shard_order(indices, seed=5, epoch=3, rank=0, world_size=1))


def test_ddp_without_torchrun_says_how_to_launch(adata, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        model.train(max_epochs=1, devices=2, strategy="ddp")
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=3"):
        model.train(max_epochs=1, devices=3)  # devices > 1 means DDP, as in scvi-tools
    with pytest.raises(ValueError, match="strategy='ddp_spawn' is not available"):
        model.train(max_epochs=1, strategy="ddp_spawn")
    assert not model.is_trained_
    assert data_parallel_for("cpu", "auto", "auto") is None
    single = data_parallel_for("cpu", 1, "ddp")  # the data-parallel path in one process
    assert isinstance(single, DataParallel) and single.world_size == 1


def test_torchrun_world_size_must_match_devices(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        data_parallel_for("cpu", 4, "ddp")
    with pytest.warns(UserWarning, match="without strategy='ddp'"):
        assert data_parallel_for("cpu", "auto", None) is None


def test_cli_trains_data_parallel_and_rank_0_writes(runs, tmp_path, capsys, monkeypatch):
    out, stdout = runs["cli"]
    assert (out / "model" / "model.pt").is_file()
    assert anndata.read_h5ad(out / "cells_scvi.h5ad").obsm["X_scVI"].shape == (120, 10)
    assert stdout.count("trained 2 epochs") == 1  # one report, from rank 0
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", str(out.parent / "cells.h5ad"), "--devices", "2", "--out", str(tmp_path),
                 "-q"]) == 1
    assert "torchrun --nproc_per_node=2" in capsys.readouterr().err
