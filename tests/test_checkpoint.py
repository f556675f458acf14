"""Checkpoints and resume: files written whole or refused, and resumed runs that end bitwise where
uninterrupted runs end, including runs whose process was killed with SIGKILL.

The killed and resumed runs are child processes (tests/checkpoint_worker.py) with one torch thread
and the NB kernel pinned (``PYRO_SCVI_NB_KERNEL``), so that every process computes alike.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_scvi import SCVI, settings
from pyro_scvi.cli import main
from pyro_scvi.data import synthetic_iid
from pyro_scvi.infer.checkpoint import Checkpointer, rng_state, set_rng_state
from pyro_scvi.io.checkpoint_file import list_checkpoints, read_checkpoint, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("checkpoint_worker.py")
EPOCHS = 6
TIMEOUT = 240


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="",
               PYRO_SCVI_NB_KERNEL="torch")
    return env


def _start(out: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(out), str(EPOCHS), *options], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> int:
    try:
        _, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"worker hung:\n{stderr[-4000:]}") from None
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker failed ({process.returncode}):\n{stderr[-4000:]}")
    return process.returncode


def _assert_same_run(result: dict, reference: dict) -> None:
    assert result["epochs"] == reference["epochs"]
    assert result["history"] == reference["history"]  # every float bitwise
    for name, value in reference["weights"].items():
        assert torch.equal(result["weights"][name], value), name


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The uninterrupted run, and two runs killed with SIGKILL and resumed in new processes: one kills
    itself before step 13 (in epoch 2; 5 steps per epoch), the parent kills the other once its
    epoch-2 checkpoint is on disk. The runs share the two cores."""
    root = tmp_path_factory.mktemp("killed")
    reference = _start(root / "reference.pt")
    self_killed = _start(root / "never.pt", "--checkpoint-dir", str(root / "self"), "--kill-at-step", "13")
    outside = _start(root / "never.pt", "--checkpoint-dir", str(root / "outside"), "--slow")
    deadline = time.monotonic() + TIMEOUT
    while not (root / "outside" / "epoch-00002.json").exists():
        assert outside.poll() is None, "the child ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    outside.send_signal(signal.SIGKILL)
    assert _finish(outside) == -signal.SIGKILL
    assert _finish(self_killed) == -signal.SIGKILL
    assert not (root / "never.pt").exists()
    left = {name: [epoch for epoch, _ in list_checkpoints(root / name)] for name in ("self", "outside")}
    resumed = {name: _start(root / f"{name}.pt", "--checkpoint-dir", str(root / name), "--resume")
               for name in ("self", "outside")}
    assert _finish(reference) == 0
    assert all(_finish(process) == 0 for process in resumed.values())

    def load(name):
        return torch.load(root / f"{name}.pt", weights_only=True)

    return load("reference"), {name: load(name) for name in resumed}, left


def test_run_killed_mid_epoch_resumes_exactly(killed_and_resumed):
    reference, resumed, left = killed_and_resumed
    assert left["self"][-1] in (0, 1)  # the epoch-1 checkpoint may still have been in flight
    _assert_same_run(resumed["self"], reference)


def test_run_killed_from_outside_resumes_exactly(killed_and_resumed):
    reference, resumed, left = killed_and_resumed
    assert left["outside"][-1] >= 2
    _assert_same_run(resumed["outside"], reference)


# ----------------------------------------------------------------------------- in one process
def _model(adata):
    settings.seed = 0
    return SCVI(adata, n_hidden=16, n_latent=4)


TRAIN = dict(batch_size=64, check_val_every_n_epoch=1, enable_progress_bar=False,
             plan_kwargs={"lr": 5e-3, "n_epochs_kl_warmup": 3})


@pytest.fixture(scope="module")
def small():
    adata = synthetic_iid(batch_size=100, n_genes=40, n_batches=2, n_labels=2, seed=2)
    SCVI.setup_anndata(adata, batch_key="batch")
    settings.seed = 0
    uninterrupted = _model(adata)
    uninterrupted.train(max_epochs=4, **TRAIN)
    return adata, uninterrupted


def _assert_same_model(model, reference) -> None:
    for key, frame in reference.history.items():
        assert model.history[key].equals(frame), key
    for name, value in reference.module.state_dict().items():
        assert torch.equal(model.module.state_dict()[name], value), name


def test_train_in_two_calls_across_models_is_exact(small, tmp_path):
    adata, reference = small
    _model(adata).train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [0, 1]
    resumed = _model(adata)
    resumed.train(max_epochs=4, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    _assert_same_model(resumed, reference)
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [2, 3]  # the two newest are kept
    np.testing.assert_array_equal(resumed.train_indices, reference.train_indices)


def test_resuming_a_finished_run_trains_nothing(small, tmp_path):
    adata, reference = small
    _model(adata).train(max_epochs=4, checkpoint_dir=tmp_path, **TRAIN)
    again = _model(adata)
    again.train(max_epochs=4, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    _assert_same_model(again, reference)


def test_backed_data_resumes_exactly(tmp_path):
    import anndata

    adata = synthetic_iid(batch_size=100, n_genes=40, n_batches=2, seed=4)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    SCVI.setup_anndata(backed, batch_key="batch")
    reference = _model(backed)
    reference.train(max_epochs=3, **TRAIN)
    _model(backed).train(max_epochs=1, checkpoint_dir=tmp_path / "ckpt", **TRAIN)
    resumed = _model(backed)
    resumed.train(max_epochs=3, checkpoint_dir=tmp_path / "ckpt", resume=True, **TRAIN)
    _assert_same_model(resumed, reference)


def test_corrupt_checkpoint_is_refused_and_the_previous_one_works(small, tmp_path):
    adata, reference = small
    _model(adata).train(max_epochs=2, checkpoint_dir=tmp_path, **TRAIN)
    slot = tmp_path / "slot-1.bin"  # epoch 1's tensors (epoch 0's are in slot-0.bin)
    manifest = json.loads((tmp_path / "epoch-00001.json").read_text())
    largest = max(manifest["tensors"], key=lambda entry: entry["bytes"])
    data = bytearray(slot.read_bytes())
    middle = largest["offset"] + largest["bytes"] // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    slot.write_bytes(bytes(data))
    refused = r"epoch 1 .* refused: tensor \d+ in slot-1.bin does not match .*previous checkpoint \(epoch 0\)"
    with pytest.raises(ValueError, match=refused):
        _model(adata).train(max_epochs=4, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    slot.write_bytes(bytes(data[: middle]))  # a truncated file
    with pytest.raises(ValueError, match="truncated"):
        _model(adata).train(max_epochs=4, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])  # undone
    end = manifest["rest"]["offset"] + manifest["rest"]["bytes"]
    data[end - 3] ^= 0x01  # one bit of the pickled rest (counters, history, settings)
    slot.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="epoch 1 .* refused: the pickled rest in slot-1.bin does not match"):
        _model(adata).train(max_epochs=4, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    (tmp_path / "epoch-00001.json").unlink()  # as the message says
    resumed = _model(adata)
    resumed.train(max_epochs=4, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    _assert_same_model(resumed, reference)


def test_resume_refuses_a_different_run_and_a_missing_checkpoint(small, tmp_path):
    adata, _ = small
    with pytest.raises(FileNotFoundError, match="No checkpoint to resume from"):
        _model(adata).train(max_epochs=2, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        _model(adata).train(max_epochs=2, resume=True, **TRAIN)
    _model(adata).train(max_epochs=1, checkpoint_dir=tmp_path, **TRAIN)
    with pytest.raises(ValueError, match=r"different run \(batch_size: checkpoint 64, now 32"):
        _model(adata).train(max_epochs=2, checkpoint_dir=tmp_path, resume=True, **{**TRAIN, "batch_size": 32})
    settings.seed = 0
    with pytest.raises(ValueError, match="init_params"):
        SCVI(adata, n_hidden=8, n_latent=4).train(max_epochs=2, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    with pytest.raises(ValueError, match="checkpoint_every_n_epochs must be a positive integer"):
        _model(adata).train(max_epochs=2, checkpoint_dir=tmp_path, checkpoint_every_n_epochs=0, **TRAIN)


def test_checkpoint_every_n_epochs_and_the_last_one(small, tmp_path):
    adata, _ = small
    _model(adata).train(max_epochs=5, checkpoint_dir=tmp_path, checkpoint_every_n_epochs=3, **TRAIN)
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [2, 4]


def test_scanvi_resumes_exactly(tmp_path):
    from pyro_scvi import SCANVI

    adata = synthetic_iid(batch_size=80, n_genes=30, n_batches=2, n_labels=3, seed=5)
    adata.obs["labels"] = adata.obs["labels"].astype(str)
    adata.obs.loc[adata.obs_names[::3], "labels"] = "Unknown"
    SCANVI.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown", batch_key="batch")

    def scanvi():
        settings.seed = 0
        return SCANVI(adata, n_hidden=16, n_latent=4)

    reference = scanvi()
    reference.train(max_epochs=3, **TRAIN)
    scanvi().train(max_epochs=1, checkpoint_dir=tmp_path, **TRAIN)
    resumed = scanvi()
    resumed.train(max_epochs=3, checkpoint_dir=tmp_path, resume=True, **TRAIN)
    _assert_same_model(resumed, reference)


# ----------------------------------------------------------------------------- the pieces
def test_random_states_round_trip():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert __import__("random").random() == expected[2]


def test_files_round_trip_and_temporaries_are_removed(tmp_path):
    large = torch.randn(300, 100)
    rest = {"n": 3, "f": float("nan"), "t": (1, "a", None), "inf": [float("-inf")], "b": True}
    write_checkpoint(tmp_path, 0, {"format": "pyro-scvi-checkpoint", "x": torch.arange(5), "w": [large],
                                   "flag": torch.tensor(True), "empty": torch.empty(0, 3), **rest})
    epoch, payload = read_checkpoint(tmp_path)
    assert epoch == 0 and torch.equal(payload["x"], torch.arange(5)) and torch.equal(payload["w"][0], large)
    assert payload["flag"].dtype == torch.bool and payload["flag"].item() and payload["empty"].shape == (0, 3)
    assert payload["t"] == (1, "a", None) and payload["inf"] == [float("-inf")]
    assert payload["f"] != payload["f"]  # NaN
    (tmp_path / ".partial-epoch-00001.json").write_bytes(b"half a file")
    with Checkpointer(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "epoch-00000.json", "slot-0.bin"]
    for epoch in (1, 2, 3):  # the slots are used in turn; the two newest checkpoints are kept
        write_checkpoint(tmp_path, epoch, {"format": "pyro-scvi-checkpoint", "w": large + epoch})
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert torch.equal(read_checkpoint(tmp_path)[1]["w"], large + 3)
    manifest = json.loads((tmp_path / "epoch-00003.json").read_text())
    (tmp_path / "epoch-00003.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(ValueError, match="format version 1, and this pyro-scvi reads version 2"):
        read_checkpoint(tmp_path)
    (tmp_path / "epoch-00003.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest epoch-00003.json is unreadable.*previous checkpoint"):
        read_checkpoint(tmp_path)


def test_one_run_at_a_time_writes_into_a_directory(small, tmp_path):
    adata, _ = small
    with Checkpointer(tmp_path / "ckpt"):
        with pytest.raises(RuntimeError, match="Another run is writing checkpoints to .*own checkpoint_dir"):
            _model(adata).train(max_epochs=1, **TRAIN, checkpoint_dir=tmp_path / "ckpt")
    assert list_checkpoints(tmp_path / "ckpt") == []
    _model(adata).train(max_epochs=1, **TRAIN, checkpoint_dir=tmp_path / "ckpt")  # released: both times
    _model(adata).train(max_epochs=2, **TRAIN, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert [epoch for epoch, _ in list_checkpoints(tmp_path / "ckpt")] == [0, 1]


def test_a_rank_that_does_not_write_writes_nothing(tmp_path):
    writer = Checkpointer(tmp_path / "ckpt", writes=False)
    writer.save(0, {"x": torch.ones(2)})
    assert not (tmp_path / "ckpt").exists()


def test_write_errors_name_the_directory(tmp_path, monkeypatch):
    import pyro_scvi.infer.checkpoint as checkpoint

    def failing(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "write_checkpoint", failing)
    with pytest.raises(RuntimeError, match="Writing a checkpoint .* failed: No space left"):
        with Checkpointer(tmp_path) as writer:
            writer.save(0, {"x": torch.ones(2)})


# ----------------------------------------------------------------------------- progress and CLI
def test_progress_bar_summary_and_logging(small, capsys, caplog):
    adata, _ = small
    caplog.set_level(logging.INFO, logger="pyro_scvi")
    _model(adata).train(max_epochs=2, **{**TRAIN, "enable_progress_bar": True})
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "loss=" in captured.err and "val_elbo=" in captured.err
    summary = captured.err.strip().splitlines()[-1]
    assert summary.startswith("Trained epochs 1-2 of 2 in ") and "validation ELBO" in summary
    assert any(record.name == "pyro_scvi" and record.getMessage() == summary for record in caplog.records)
    _model(adata).train(max_epochs=1, **TRAIN)  # enable_progress_bar=False: silent
    assert capsys.readouterr().err == ""


def test_cli_checkpoint_dir_and_resume(tmp_path, capsys):
    synthetic_iid(batch_size=60, n_genes=30, n_batches=2, seed=3).write_h5ad(tmp_path / "cells.h5ad")
    common = [str(tmp_path / "cells.h5ad"), "--n-hidden", "8", "--seed", "0", "--quiet",
              "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main(["train", *common, "--max-epochs", "2", "--out", str(tmp_path / "first")]) == 0
    assert [epoch for epoch, _ in list_checkpoints(tmp_path / "ckpt")] == [0, 1]
    assert main(["train", *common, "--max-epochs", "3", "--resume", "--out", str(tmp_path / "second")]) == 0
    assert [epoch for epoch, _ in list_checkpoints(tmp_path / "ckpt")] == [1, 2]
    assert capsys.readouterr().err == ""
    assert main(["train", str(tmp_path / "cells.h5ad"), "--resume", "--out", str(tmp_path / "x")]) == 1
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data-parallel
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(out: Path, epochs: int, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", str(WORKER), str(out), str(epochs), "--devices", "2",
               *options]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_data_parallel_run_killed_and_resumed_matches_on_every_rank(tmp_path):
    """Two gloo ranks kill themselves (SIGKILL) before step 7 of 3 per epoch; torchrun ends the run.
    Rank 0 wrote the checkpoints (with both ranks' random states); both ranks resume from them."""
    reference = _torchrun(tmp_path / "reference-RANK.pt", 3)
    killed = _torchrun(tmp_path / "never-RANK.pt", 3, "--checkpoint-dir", str(tmp_path / "ckpt"),
                       "--kill-at-step", "7")
    _, stderr = killed.communicate(timeout=TIMEOUT)
    assert killed.returncode != 0, stderr[-3000:]
    assert list_checkpoints(tmp_path / "ckpt"), stderr[-3000:]
    resumed = _torchrun(tmp_path / "resumed-RANK.pt", 3, "--checkpoint-dir", str(tmp_path / "ckpt"),
                        "--resume")
    for process in (reference, resumed):
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, stderr[-4000:]
    for rank in (0, 1):
        _assert_same_run(torch.load(tmp_path / f"resumed-{rank}.pt", weights_only=True),
                         torch.load(tmp_path / f"reference-{rank}.pt", weights_only=True))
