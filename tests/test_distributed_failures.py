"""A failing rank stops the whole data-parallel run: nobody waits forever in a collective.

Two gloo processes are started directly (``RANK``/``WORLD_SIZE``/``MASTER_*`` set by the test, as a
cluster launcher would; torchrun would stop the survivor itself). Rank 1's model raises, or the
process kills itself, at optimiser step 8 (epoch 1); rank 0 must stop within seconds and name rank
1 and its exception. The rank that raises catches its error and stays alive until rank 0 has
stopped, as a notebook would: rank 0 must not depend on the failed process ending. The
store-reading logic behind the messages (including a rank that hangs until the collectives'
timeout) is checked in-process on a ``HashStore``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pyro_scvi.infer import distributed
from pyro_scvi.infer.distributed import DataParallel, DataParallelError, collective_timeout

REPO = Path(__file__).resolve().parents[1]
FAIL_STEP = 8  # 6 steps per epoch (90 training cells per rank, batch 16): step 8 is in epoch 1

WORKER = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    import torch

    torch.set_num_threads(1)
    from pyro_scvi import SCVI, settings
    from pyro_scvi.data import synthetic_iid
    from pyro_scvi.models import scvi_model

    how, fail_step, rank = sys.argv[1], int(sys.argv[2]), int(os.environ["RANK"])
    steps = 0


    def model_fn(module, batch, transform_batch=None):
        global steps
        if torch.is_grad_enabled():  # a training step (the contract check and validation run without grad)
            if rank == 1 and steps == fail_step:
                print(f"FAILING AT {time.time()}", file=sys.stderr, flush=True)
                if how == "raise":
                    raise ValueError("boom")
                os.kill(os.getpid(), signal.SIGKILL)
            steps += 1
        return scvi_model(module, batch, transform_batch=transform_batch)


    settings.seed = 0
    adata = synthetic_iid(batch_size=100, n_genes=20, n_batches=2, n_labels=2, seed=1)  # 200 cells
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=8, n_latent=2, model_fn=model_fn)
    try:
        model.train(max_epochs=100, batch_size=16, devices=2, strategy="ddp", accelerator="cpu",
                    enable_progress_bar=False)
    except ValueError:
        # stay alive, as a notebook would, until rank 0 (the rendezvous store's host) has stopped
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", int(os.environ["MASTER_PORT"])), timeout=1).close()
            except OSError:
                print("RANK 0 STOPPED FIRST", file=sys.stderr)
                break
            time.sleep(0.1)
        raise
    print("TRAINING FINISHED", file=sys.stderr)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script: Path, how: str) -> list[subprocess.Popen]:
    """Two ranks of one run, started directly (no torchrun)."""
    port = str(_free_port())
    ranks = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "PYRO_SCVI_DDP"))}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO),
                   CUDA_VISIBLE_DEVICES="")
        ranks.append(subprocess.Popen([sys.executable, str(script), how, str(FAIL_STEP)], env=env,
                                      cwd=script.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return ranks


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory):
    """Both scenarios at once: {how: [(returncode, stderr, exit time) of rank 0, of rank 1]}."""
    script = tmp_path_factory.mktemp("ddp_failures") / "worker.py"
    script.write_text(WORKER)
    runs = {how: _launch(script, how) for how in ("raise", "kill")}
    processes = [p for ranks in runs.values() for p in ranks]
    ended: dict[int, float] = {}
    deadline = time.time() + 150  # no hang can stall the suite: whatever still runs then is killed
    while len(ended) < len(processes) and time.time() < deadline:
        for process in processes:
            if process.pid not in ended and process.poll() is not None:
                ended[process.pid] = time.time()
        time.sleep(0.05)
    results = {}
    for how, ranks in runs.items():
        results[how] = []
        for process in ranks:
            if process.pid not in ended:
                process.kill()
            _, stderr = process.communicate()
            results[how].append((process.returncode, stderr, ended.get(process.pid)))
    return results


def _stop_delay(results) -> float:
    """Seconds from rank 1's failure to rank 0's exit."""
    (_, _, rank0_end), (_, stderr1, _) = results
    assert rank0_end is not None, "rank 0 did not stop (killed by the test)"
    failed_at = re.search(r"FAILING AT ([0-9.]+)", stderr1)
    assert failed_at, stderr1[-3000:]
    return rank0_end - float(failed_at.group(1))


def test_a_rank_that_raises_stops_the_others_with_its_error(failed_runs):
    (code0, stderr0, _), (code1, stderr1, _) = failed_runs["raise"]
    assert code1 != 0 and "ValueError: boom" in stderr1, stderr1[-3000:]
    assert "DataParallelError" not in stderr1  # rank 1 raises its own error
    assert "RANK 0 STOPPED FIRST" in stderr1  # rank 0 did not wait for rank 1's process to end
    assert code0 != 0, stderr0[-3000:]
    assert f"DataParallelError: data-parallel rank 1 failed at step {FAIL_STEP} (epoch 1): ValueError: boom" \
        in stderr0, stderr0[-3000:]
    assert "TRAINING FINISHED" not in stderr0 + stderr1
    assert _stop_delay(failed_runs["raise"]) < 30


def test_a_killed_rank_stops_the_others(failed_runs):
    (code0, stderr0, _), (code1, stderr1, _) = failed_runs["kill"]
    assert code1 == -9, stderr1[-3000:]
    assert code0 != 0, stderr0[-3000:]
    assert "DataParallelError: data-parallel rank 1 stopped responding (died or was killed)" in stderr0, \
        stderr0[-3000:]
    assert _stop_delay(failed_runs["kill"]) < 30


# -- the diagnosis, in one process ---------------------------------------------------------------
@pytest.fixture
def pair(monkeypatch):
    """Ranks 0 and 1 of a world of 2 that share a store but no process group."""
    monkeypatch.setattr(distributed, "_GRACE_S", 0.2)
    store = dist.HashStore()
    ranks = [DataParallel(rank, 2, torch.device("cpu")) for rank in (0, 1)]
    for parallel in ranks:
        parallel._store = store
    return ranks


def _failing(message: str):
    def operation(tensor, **kwargs):
        raise RuntimeError(message)

    return operation


def test_peer_failure_names_the_failed_rank_and_its_error(pair):
    rank0, rank1 = pair
    rank1.step, rank1.epoch = 7, 2
    with pytest.raises(ValueError, match="boom"), rank1.reporting_failures():
        raise ValueError("boom")
    rank0.step = 7
    with pytest.raises(DataParallelError, match=r"^data-parallel rank 1 failed at step 7 \(epoch 2\): "
                                                r"ValueError: boom; rank 0 stops as well \(at step 7\)$"):
        rank0._collective(_failing("Connection closed by peer"), torch.zeros(1))
    # rank 0 passes rank 1's failure on; it does not publish it as a failure of its own
    rank0._report_failure = None
    with pytest.raises(DataParallelError, match="rank 1 failed"), rank0.reporting_failures():
        rank0._collective(_failing("Connection closed by peer"), torch.zeros(1))


def test_silent_rank_is_reported_as_dead_or_hanging(pair):
    rank0, _ = pair
    with pytest.raises(DataParallelError, match="rank 1 stopped responding \\(died or was killed\\)"):
        rank0._collective(_failing("Read error: Connection reset by peer"), torch.zeros(1))
    with pytest.raises(DataParallelError, match="rank 1 did not respond within the collectives' timeout "
                                                "\\(PYRO_SCVI_DDP_TIMEOUT; RuntimeError: Timed out"):
        rank0._collective(_failing("Timed out waiting 4000ms for recv operation to complete"), torch.zeros(1))


def test_an_error_of_this_rank_is_not_blamed_on_others(pair):
    rank0, rank1 = pair
    rank1._store.set("left/1", "1")  # rank 1 answered and reported no failure
    with pytest.raises(RuntimeError, match="unsupported dtype") as caught:
        rank0._collective(_failing("unsupported dtype"), torch.zeros(1))
    assert not isinstance(caught.value, DataParallelError)


def test_lost_store_means_its_host_died(pair):
    rank0, _ = pair

    class Gone:
        def set(self, key, value):
            raise ConnectionResetError("Connection reset by peer")

    rank0._store = Gone()
    with pytest.raises(DataParallelError, match="lost contact with the other ranks and with the rendezvous"):
        rank0._collective(_failing("Connection closed by peer"), torch.zeros(1))


def test_collective_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYRO_SCVI_DDP_TIMEOUT", raising=False)
    assert collective_timeout().total_seconds() == 300
    monkeypatch.setenv("PYRO_SCVI_DDP_TIMEOUT", "2.5")
    assert collective_timeout().total_seconds() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("PYRO_SCVI_DDP_TIMEOUT", bad)
        with pytest.raises(ValueError, match="PYRO_SCVI_DDP_TIMEOUT"):
            collective_timeout()
