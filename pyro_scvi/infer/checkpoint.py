"""Checkpoints of a training run, and what a run needs to continue from one bit for bit.

A checkpoint is taken at the end of an epoch (after validation, early stopping and the learning
rate schedule have seen it) and holds the whole state the rest of the run depends on:

* the weights (``module.state_dict()``) and the plain ``pyro.param`` values of the model's store;
* the optimiser's state (Adam's moments and step counts) and the learning-rate scheduler's;
* the epoch and optimiser-step counters, from which the KL warm-up weight follows;
* the random states of Python, NumPy and torch (CPU and every initialised CUDA device): the next
  epoch's shuffle and every Monte-Carlo draw come from them;
* the early-stopping state (best value, checks without improvement) and the history so far;
* what the caller adds (the train/validation/test split, the data-parallel seed, ...).

Resuming happens at an epoch boundary: a run killed in the middle of epoch ``k`` restarts epoch
``k`` from the checkpoint of epoch ``k - 1``, with the random state of that moment, so it repeats
exactly the steps the killed run took. On the CPU the resumed run ends bitwise where an
uninterrupted run ends (same library versions, thread count and NB-kernel choice:
``$PYRO_SCVI_NB_KERNEL`` pins the latter).

:class:`Checkpointer` copies the state (into buffers it reuses) and writes it in a background
thread at a lower scheduling priority, so training goes on while the file is written; at most one
write is in flight.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..io.checkpoint_file import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    prune_checkpoints,
    remove_temporaries,
    write_checkpoint,
)

__all__ = ["Checkpointer", "rng_state", "set_rng_state", "check_same_run"]


def rng_state() -> dict:
    """The random states of Python, NumPy and torch (CPU, and each CUDA device when CUDA is in use)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


#: niceness of the writer thread (Linux): it takes the CPU time training leaves idle rather than
#: slowing the training threads down
WRITER_NICENESS = 10


def lower_thread_priority() -> None:
    """Lower the scheduling priority of the calling thread (Linux, where threads have their own
    niceness); elsewhere do nothing."""
    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        except OSError:
            pass


def _copy_into(value, previous=None):
    """A copy of a nested structure of dicts, lists, tuples and tensors; tensors are copied into
    those of ``previous`` (a copy made earlier) where shapes and dtypes match, else cloned to the CPU."""
    if isinstance(value, torch.Tensor):
        if (isinstance(previous, torch.Tensor) and previous.shape == value.shape
                and previous.dtype == value.dtype):
            return previous.copy_(value.detach())
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        previous = previous if isinstance(previous, dict) else {}
        return {key: _copy_into(item, previous.get(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        previous = previous if isinstance(previous, (list, tuple)) and len(previous) == len(value) else None
        items = [_copy_into(item, None if previous is None else previous[i]) for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return value


def check_same_run(saved: dict, current: dict, directory) -> None:
    """``ValueError`` when the settings a checkpoint was written with differ from this run's."""
    differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if differing:
        details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
                            for key in differing)
        raise ValueError(
            f"The checkpoint in {directory} belongs to a different run ({details}). Resume with the model "
            "arguments, data and training settings it was written with, or use another checkpoint_dir."
        )


class Checkpointer:
    """Writes the checkpoints of one run into ``directory`` every ``every_n_epochs`` epochs.

    ``static``: entries added to every checkpoint (the split, the run's settings). ``writes``:
    whether this process writes (rank 0 of a data-parallel run); the others only take part in
    the collectives. ``keep``: checkpoints kept (older ones are deleted once a newer one is written).
    """

    def __init__(self, directory, every_n_epochs: int = 1, static: dict | None = None, writes: bool = True,
                 keep: int = 2) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, (int, np.integer)) \
                or every_n_epochs < 1:
            raise ValueError(f"checkpoint_every_n_epochs must be a positive integer, got {every_n_epochs!r}.")
        self.directory, self.every_n_epochs = Path(directory), int(every_n_epochs)
        self.static, self.writes, self.keep = dict(static or {}), writes, max(int(keep), 2)
        self._buffer: dict | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if writes:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_temporaries(self.directory)

    def due(self, epoch: int, last: bool) -> bool:
        """Whether the run writes a checkpoint after ``epoch`` (always after its last one)."""
        return last or (epoch + 1) % self.every_n_epochs == 0

    def save(self, epoch: int, state: dict, gather: Callable[[dict], list] | None = None) -> None:
        """Copy ``state`` and write it in the background (after the previous write has finished).

        ``gather(rng)``: the random states of every data-parallel process, from this one's (all
        processes call it); without it, this process's states are written.
        """
        rng = rng_state()
        by_rank = [rng] if gather is None else gather(rng)
        if not self.writes:
            return
        self.wait()
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": int(epoch),
                   **self.static, **state, "rng_by_rank": by_rank}
        self._buffer = _copy_into(payload, self._buffer)
        self._thread = threading.Thread(target=self._write, args=(epoch, self._buffer),
                                        name="pyro-scvi-checkpoint", daemon=True)
        self._thread.start()

    def _write(self, epoch: int, payload: dict) -> None:
        try:
            lower_thread_priority()
            write_checkpoint(self.directory, epoch, payload)
            prune_checkpoints(self.directory, self.keep)
        except BaseException as error:  # re-raised in the training thread by wait()
            self._error = error

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"Writing a checkpoint to {self.directory} failed: {error}") from error
