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

:class:`Checkpointer` writes in the training thread: the tensors are copied once, straight into a
preallocated file it keeps mapped (:mod:`pyro_scvi.io.slot_file`), which costs as much as copying
them in memory. (A background writer was tried first: on two cores its thread slowed the two
training threads by far more than the write itself costs.) It holds the directory's lock from
its creation to :meth:`Checkpointer.close`, so two runs never write into one directory.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..io.checkpoint_file import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    lock_directory,
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
    the collectives. The two newest checkpoints are kept (see :mod:`pyro_scvi.io.checkpoint_file`).
    :meth:`close` (or ``with``) when the run ends: it releases the files and the directory.
    """

    def __init__(self, directory, every_n_epochs: int = 1, static: dict | None = None,
                 writes: bool = True) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, (int, np.integer)) \
                or every_n_epochs < 1:
            raise ValueError(f"checkpoint_every_n_epochs must be a positive integer, got {every_n_epochs!r}.")
        self.directory, self.every_n_epochs = Path(directory), int(every_n_epochs)
        self.static, self.writes = dict(static or {}), writes
        self._slots: dict = {}
        self._lock = None
        if writes:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = lock_directory(self.directory)
            remove_temporaries(self.directory)

    def close(self) -> None:
        """Close the slot files and release the directory (idempotent)."""
        for slot_file in self._slots.values():
            slot_file.close()
        self._slots.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def due(self, epoch: int, last: bool) -> bool:
        """Whether the run writes a checkpoint after ``epoch`` (always after its last one)."""
        return last or (epoch + 1) % self.every_n_epochs == 0

    def save(self, epoch: int, state: dict, gather: Callable[[dict], list] | None = None) -> None:
        """Write ``state`` (with the random states) as the checkpoint of ``epoch``.

        ``gather(rng)``: the random states of every data-parallel process, from this one's (all
        processes call it); without it, this process's states are written.
        """
        rng = rng_state()
        by_rank = [rng] if gather is None else gather(rng)
        if not self.writes:
            return
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": int(epoch),
                   **self.static, **state, "rng_by_rank": by_rank}
        try:
            write_checkpoint(self.directory, epoch, payload, self._slots)
        except OSError as error:
            raise RuntimeError(f"Writing a checkpoint to {self.directory} failed: {error}") from error
