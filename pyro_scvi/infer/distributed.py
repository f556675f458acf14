"""Data-parallel training over ``torch.distributed`` processes started by ``torchrun``.

How to run it: put the usual training code in a script, call ``model.train(devices=N,
strategy="ddp")`` and start the script once per device with torchrun::

    torchrun --nproc_per_node=N my_script.py            # N processes on this machine
    torchrun --nproc_per_node=N -m pyro_scvi train data.h5ad --devices N --strategy ddp

Every process builds the same model and calls ``train``; training then works as PyTorch's
``DistributedDataParallel`` does:

* the processes join one process group (``gloo`` on CPU, ``nccl`` on CUDA, where process
  ``LOCAL_RANK`` uses GPU ``LOCAL_RANK``); rank 0's initial weights and buffers are broadcast
  so every rank starts identical;
* each epoch every rank draws the same seeded permutation of the training cells, pads it (by
  wrapping around, as ``DistributedSampler`` does) to a multiple of the number of processes and
  takes every ``world_size``-th cell from its rank on: equal shards, so every rank runs the same
  number of steps. Step ``k`` of the ``N`` ranks together sees cells ``perm[k·N·b : (k+1)·N·b]``
  (``b`` = ``batch_size`` per process), so N-process training follows one-process training with
  ``batch_size = N·b`` over the same permutation;
* after each backward pass the gradients are averaged across the ranks (one all-reduce of a
  flattened buffer per dtype) before the optimiser step, so the ranks' weights stay identical;
* the per-epoch sums behind the history (train and validation ELBO terms and cell counts) are
  summed across ranks, so every rank records the same history, and early stopping, the learning
  rate schedule and the non-finite checks decide the same way on every rank;
* BatchNorm uses per-process batch statistics (no ``SyncBatchNorm``); its running statistics are
  broadcast from rank 0 at the end of each epoch (the effect of DDP's ``broadcast_buffers``);
* rank ``r > 0`` reseeds its torch RNG (from a seed rank 0 draws) so that the ranks' Monte-Carlo
  noise and dropout masks are independent.

After training every rank holds the same weights; only rank 0 shows a progress bar. Saving is
the caller's job: write files from rank 0 only (``is_main_process()``).

When a rank fails, every rank stops (no process waits forever in a collective):

* a rank whose training raises (inside ``train``) publishes the failure (its rank, step, epoch
  and exception) in the process group's rendezvous store (the c10d ``TCPStore``), leaves the
  process group (so the others' pending collectives fail at once) and, after the others have
  read the failure (or a few seconds), re-raises its own exception;
* the other ranks' collective then fails; they read the store and raise
  :class:`DataParallelError`, e.g. ``data-parallel rank 1 failed at step 7 (epoch 0):
  ValueError: boom``. Steps count the optimiser steps of this ``train`` call from 0, epochs are
  the run's (also after a resume);
* a rank that dies (killed, out of memory) closes its connections, and the others raise
  ``DataParallelError: data-parallel rank 1 stopped responding (died or was killed)`` within a
  few seconds; when the dead rank is rank 0, which hosts the store under a plain launch, they
  report that they lost contact with it;
* a rank that hangs: every collective has a timeout, ``PYRO_SCVI_DDP_TIMEOUT`` seconds (default
  300; read when ``train`` creates the process group, so a group the caller created keeps its own
  timeout), after which the others raise ``DataParallelError`` naming it.

The process group is gone after a failure (``train`` destroys it on every rank, also one the caller
created); start the run again. torchrun itself stops the remaining processes of a node once one
of them exits with an error. With NCCL a dead rank does not make the others' GPU collectives fail:
they stop when the timeout expires (NCCL's watchdog ends the process), or when torchrun stops them.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from itertools import count
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from .device import resolve_device, use_cuda

__all__ = [
    "DataParallel",
    "DataParallelError",
    "reporting_failures",
    "collective_timeout",
    "data_parallel_for",
    "launched_by_torchrun",
    "launch_instructions",
    "is_main_process",
    "shard_order",
    "STRATEGIES",
]

#: values of ``train(strategy=...)``
STRATEGIES = ("auto", "ddp")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: environment variable with the collectives' timeout in seconds, and its default
TIMEOUT_ENV, DEFAULT_TIMEOUT_S = "PYRO_SCVI_DDP_TIMEOUT", 300.0
#: seconds a rank waits for the others to report, after a failure, before it raises
_GRACE_S = 3.0
#: one key prefix in the rendezvous store per DataParallel, so runs in one process group never mix
_RUN_IDS = count()


class DataParallelError(RuntimeError):
    """Another rank of the data-parallel run failed, died or stopped responding."""


def collective_timeout() -> timedelta:
    """The collectives' timeout: ``PYRO_SCVI_DDP_TIMEOUT`` seconds (default 300)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds (default "
                         f"{DEFAULT_TIMEOUT_S:g}).")
    return timedelta(seconds=seconds)


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its rendezvous variables are set)."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def is_main_process() -> bool:
    """True on rank 0 of a data-parallel run and in an ordinary single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def launch_instructions(n: int | str = "N") -> str:
    """How to start ``n`` data-parallel processes."""
    return (
        f"start one process per device with torchrun, e.g. `torchrun --nproc_per_node={n} your_script.py` "
        f"(the script calls model.train(devices={n}, strategy='ddp')) or `torchrun --nproc_per_node={n} "
        f"-m pyro_scvi train DATA.h5ad --devices {n} --strategy ddp`"
    )


def _count_devices(devices) -> int | None:
    """Number of devices asked for; ``None`` for "auto" / -1 (take what the launch gives)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices in ("auto", None, -1, "-1"):
        return None
    if isinstance(devices, str) and devices.startswith("cuda"):
        return 1
    try:
        n = int(devices)
    except (TypeError, ValueError):
        raise ValueError(f"devices={devices!r} is not a number of devices, a list of device indices or "
                         "'auto'.") from None
    return max(n, 1)  # 0 (or another index below 1): one device, which resolve_device picks or rejects


def data_parallel_for(accelerator: str, devices, strategy: str | None) -> "DataParallel | None":
    """The data-parallel setup that ``train(accelerator, devices, strategy)`` asks for, or ``None``.

    * ``strategy="auto"`` (default) with one device (or ``"auto"``): ordinary single-device
      training, ``None``.
    * ``strategy="ddp"``, or ``devices=N > 1`` (which, as in scvi-tools / Lightning, means DDP):
      data-parallel training when the process was launched by torchrun (or a process group is
      already initialised) with ``N`` processes; ``ValueError`` with the torchrun command otherwise.
    * ``strategy="ddp"`` with one device and no torchrun: the data-parallel code path with one
      process (no process group); useful to check that ``N`` processes with ``batch_size=b``
      match one process with ``batch_size=N·b``.
    """
    strategy = "auto" if strategy is None else strategy
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy={strategy!r} is not available: use 'auto' (one device) or 'ddp' (data-parallel "
            f"training; {launch_instructions()})."
        )
    n = _count_devices(devices)
    grouped = dist.is_available() and dist.is_initialized()
    launched = grouped or launched_by_torchrun()
    if strategy == "auto" and (n is None or n == 1):
        if launched and _world_size() > 1:
            warnings.warn(
                f"This process is one of {_world_size()} started by torchrun, but train() was called without "
                "strategy='ddp': every process trains its own copy of the model on all cells. Pass "
                f"devices={_world_size()}, strategy='ddp' for data-parallel training.",
                UserWarning,
                stacklevel=3,
            )
        return None
    if not launched:
        if n is None or n == 1:
            return DataParallel(rank=0, world_size=1, device=resolve_device(accelerator, devices))
        raise ValueError(
            f"devices={devices!r} trains data-parallel (DDP) with {n} processes, which pyro-scvi does not "
            f"spawn itself: {launch_instructions(n)}."
        )
    world_size = _world_size()
    if n is not None and n != world_size:
        raise ValueError(
            f"devices={devices!r} but {world_size} process(es) were started (WORLD_SIZE={world_size}): pass "
            f"devices={world_size} or start {n} processes ({launch_instructions(n)})."
        )
    return DataParallel.from_environment(accelerator, devices if isinstance(devices, (list, tuple)) else None)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard_order(indices: np.ndarray, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's cells for one epoch, in minibatch order: ``torch.utils.data.DistributedSampler``'s.

    A permutation of ``indices`` seeded by ``seed + epoch`` (the same on every rank), padded by
    wrapping around to a multiple of ``world_size``, then every ``world_size``-th entry from
    ``rank`` on. All shards have ``ceil(n / world_size)`` cells.
    """
    indices = np.asarray(indices)
    sampler = DistributedSampler(range(len(indices)), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=int(seed))
    sampler.set_epoch(int(epoch))
    return indices[np.fromiter(sampler, dtype=np.int64, count=sampler.num_samples)]


def _by_dtype(tensors: Iterable[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return groups


class DataParallel:
    """One rank of a data-parallel run: its device, collectives and data shard.

    Build it with :func:`data_parallel_for`. With ``world_size == 1`` every collective is a no-op.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = int(rank), int(world_size), torch.device(device)
        #: seed of the per-epoch permutations, agreed by :meth:`prepare`
        self.seed = 0
        #: epoch number of the first epoch the training loop asks for (> 0 when resuming a run)
        self.start_epoch = 0
        #: optimiser steps (gradient averages) and training epochs completed: where a failure happened
        self.step = self.epoch = 0
        self._parameters: list[torch.nn.Parameter] = []
        self._module: torch.nn.Module | None = None
        #: where ranks report failures: the process group's rendezvous store (none: no reports)
        self._store = _failure_store() if self.world_size > 1 else None

    @classmethod
    def from_environment(cls, accelerator: str = "auto", device_indices=None) -> "DataParallel":
        """Join (or reuse) the process group of a torchrun launch and pick this rank's device."""
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this build of PyTorch.")
        if dist.is_initialized():
            cuda = dist.get_backend() == "nccl" or use_cuda(accelerator)
        else:
            cuda = use_cuda(accelerator)
        if cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            index = int(device_indices[local_rank]) if device_indices else local_rank
            if index >= torch.cuda.device_count():
                raise ValueError(
                    f"Process with LOCAL_RANK={local_rank} needs GPU {index} but only "
                    f"{torch.cuda.device_count()} are visible: start at most one process per GPU "
                    "(torchrun --nproc_per_node)."
                )
            device = torch.device(f"cuda:{index}")
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=collective_timeout())
            atexit.register(_destroy_process_group)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        """Where collectives' tensors must live (CUDA for NCCL)."""
        return self.device if self.world_size > 1 and dist.get_backend() == "nccl" else torch.device("cpu")

    # -- collectives --------------------------------------------------------------------------
    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return int(value)
        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self._comm_device)
        self._collective(dist.broadcast, tensor, src=0)
        return int(tensor.item())

    def shared_seed(self) -> int:
        """A seed drawn from rank 0's torch RNG (every rank draws, so their RNGs advance alike)."""
        return self.broadcast_int(int(torch.randint(0, 2**62, (1,)).item()))

    @torch.no_grad()
    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (one broadcast per dtype)."""
        if self.world_size == 1:
            return
        for group in _by_dtype(tensors).values():
            flat = torch.cat([t.detach().reshape(-1).to(self._comm_device) for t in group])
            self._collective(dist.broadcast, flat, src=0)
            offset = 0
            for tensor in group:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def broadcast_module(self, module: torch.nn.Module, buffers_only: bool = False) -> None:
        """Rank 0's parameters (unless ``buffers_only``) and buffers on every rank."""
        tensors = list(module.buffers())
        if not buffers_only:
            tensors = list(module.parameters()) + tensors
        self.broadcast_tensors(t for t in tensors if t is not None)

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Replace each gradient of the prepared module by its mean over the ranks.

        One all-reduce per dtype over a flattened buffer. The buffer layout is fixed (every
        parameter that requires a gradient, in module order; a missing gradient counts as zeros
        and stays missing), so ranks always agree on it.
        """
        if self.world_size == 1:
            return
        for group in _by_dtype(self._parameters).values():
            grads = [p.grad for p in group]
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                              for p, g in zip(group, grads)])
            flat = flat.to(self._comm_device)
            self._collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for parameter, grad in zip(group, grads):
                if grad is not None:
                    grad.copy_(flat[offset : offset + parameter.numel()].view_as(grad))
                offset += parameter.numel()
        self.step += 1

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        self._collective(dist.all_gather_object, gathered, obj)
        return gathered

    def sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``values`` over the ranks (a new tensor on ``values``' device)."""
        if self.world_size == 1:
            return values
        reduced = values.detach().to(self._comm_device, copy=True)
        self._collective(dist.all_reduce, reduced, op=dist.ReduceOp.SUM)
        return reduced.to(values.device)

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank; at each epoch's end."""
        if self._module is not None:
            self.broadcast_module(self._module, buffers_only=True)
        self.epoch += 1

    # -- failures -------------------------------------------------------------------------------
    def _collective(self, operation: Callable, *args, **kwargs) -> None:
        """``operation(*args, **kwargs)``; when it fails because another rank failed, died or hangs,
        :class:`DataParallelError` naming that rank (no extra work while it succeeds)."""
        try:
            operation(*args, **kwargs)
        except RuntimeError as error:  # gloo: "Connection closed (reset) by peer", "Timed out ..."
            message = self._peer_failure(error)
            if message is None:
                raise
            raise DataParallelError(message) from error

    def _peer_failure(self, error: BaseException) -> str | None:
        """Why a collective failed, from the store: the failure another rank published, or the ranks
        that did not answer within a few seconds; ``None`` when no rank failed and all answered."""
        if self._store is None:
            return None
        stops = f"rank {self.rank} stops as well (at step {self.step})"
        try:
            self._store.set(f"left/{self.rank}", "1")
            deadline = time.monotonic() + _GRACE_S
            while True:
                if self._store.check(["failure"]):
                    return _failure_message(json.loads(self._store.get("failure")), stops)
                silent = [r for r in range(self.world_size) if not self._store.check([f"left/{r}"])]
                if not silent or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except Exception as store_error:  # the store went too: its host (rank 0 under a plain launch)
            return (f"data-parallel training lost contact with the other ranks and with the rendezvous "
                    f"store ({_first_line(store_error)}): the rank that hosts it (rank 0, unless torchrun's "
                    f"agent does) died or was killed; {stops}")
        if not silent:
            return None
        who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}"
        if "timed out" in str(error).lower():
            return (f"data-parallel {who} did not respond within the collectives' timeout ({TIMEOUT_ENV}; "
                    f"{_first_line(error)}): it hangs, or died or was killed; {stops}")
        return f"data-parallel {who} stopped responding (died or was killed); {stops}"

    def _report_failure(self, error: BaseException) -> None:
        """Publish that this rank's training raised ``error``, leave the process group (the others'
        pending collectives then fail at once) and give the others a few seconds to read it."""
        record = {"rank": self.rank, "step": self.step, "epoch": self.start_epoch + self.epoch,
                  "error": _describe(error)}
        try:
            self._store.compare_set("failure", "", json.dumps(record))  # the first failure wins
            self._store.set(f"left/{self.rank}", "1")
        except Exception:  # the store's host is gone: the others learn of it from their own errors
            pass
        self.leave()
        deadline = time.monotonic() + _GRACE_S
        try:  # the store may live in this process (rank 0): stay until the others have read it
            while time.monotonic() < deadline and not all(
                self._store.check([f"left/{r}"]) for r in range(self.world_size)
            ):
                time.sleep(0.05)
        except Exception:
            pass

    def leave(self) -> None:
        """Leave (destroy) the process group after a failure, so that no rank waits on this one."""
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        try:
            if dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()  # shutting NCCL down could wait on the GPU
            else:
                dist.destroy_process_group()
        except Exception:
            pass

    @contextmanager
    def reporting_failures(self):
        """Around training: an exception of this rank is published to the others (see the module
        docstring) before it propagates; on any failure this rank leaves the process group."""
        if self._store is None:
            yield
            return
        try:
            yield
        except DataParallelError:  # another rank's failure, already read from the store
            self.leave()
            raise
        except BaseException as error:
            self._report_failure(error)
            raise

    # -- training set-up ----------------------------------------------------------------------
    def prepare(self, module: torch.nn.Module) -> None:
        """Before training ``module``: identical start on every rank, agreed permutation seed,
        and independent Monte-Carlo noise per rank."""
        self._module = module
        self._parameters = [p for p in module.parameters() if p.requires_grad]
        self.step = self.epoch = 0
        self.broadcast_module(module)
        self.seed = self.shared_seed()
        if self.rank > 0:
            torch.manual_seed((self.seed + 104_729 * self.rank) % 2**63)

    def resume_at(self, seed: int, epoch: int) -> None:
        """Continue a checkpointed run (after :meth:`prepare`): its permutation seed, from ``epoch`` on."""
        self.seed, self.start_epoch = int(seed), int(epoch)

    def finish(self) -> None:
        """After training: rank 0's buffers everywhere. The weights need no sync: averaged
        gradients keep them identical (the tests check this bitwise)."""
        self.sync_buffers()

    def shard_length(self, n_cells: int) -> int:
        return math.ceil(n_cells / self.world_size)

    def epoch_batches(self, indices: np.ndarray, make_batches: Callable[[np.ndarray], Iterable]
                      ) -> Callable[[], Iterator]:
        """A ``train_batches`` factory for ``run_training``: each call is the next epoch over this
        rank's shard; ``make_batches(order)`` turns the ordered cells into minibatches."""
        epochs = count()

        def batches():
            epoch = self.start_epoch + next(epochs)
            order = shard_order(indices, self.seed, epoch, self.rank, self.world_size)
            return iter(make_batches(order))

        return batches

    def validation_shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's part of the validation cells (unpadded: only sums are reduced)."""
        return np.asarray(indices)[self.rank :: self.world_size]


def _failure_store():
    """A fresh key space in the default process group's store, or ``None`` without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # a group without a store: failures are still bounded by the timeout
        return None
    return dist.PrefixStore(f"pyro_scvi/ddp/{next(_RUN_IDS)}/", store)


def reporting_failures(parallel: DataParallel | None):
    """``parallel.reporting_failures()``; a context that does nothing for one device (``None``)."""
    return nullcontext() if parallel is None else parallel.reporting_failures()


def _describe(error: BaseException) -> str:
    text = str(error).split("\nTrace Shapes:")[0].strip()  # less the shapes Pyro appends
    name = type(error).__name__
    return (f"{name}: {text}" if text else name)[:2000]


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return _describe(error) if not lines else f"{type(error).__name__}: {lines[0][:500]}"


def _failure_message(record: dict, stops: str) -> str:
    return (f"data-parallel rank {record['rank']} failed at step {record['step']} (epoch {record['epoch']}): "
            f"{record['error']}; {stops}")


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
