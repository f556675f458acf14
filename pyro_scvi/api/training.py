"""The training part: ``train()`` with scvi-tools' arguments, on one device or data-parallel.

It turns the user's arguments into minibatch iterators, a :class:`~pyro_scvi.infer.training.TrainingPlan`
and an optional :class:`~pyro_scvi.infer.training.EarlyStopping`, and runs
:func:`~pyro_scvi.infer.training.run_training` in the model's parameter store. The statistics
(loss, KL warm-up, optimiser) live in :mod:`pyro_scvi.infer`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..data.loader import RegisteredData, check_training_minibatches, minibatch_from_dict, split_indices
from ..data.minibatch import Minibatch
from ..infer.checkpoint import Checkpointer, check_same_run
from ..infer.device import resolve_device
from ..infer.distributed import data_parallel_for, reporting_failures
from ..infer.progress import logger
from ..infer.training import EarlyStopping, TrainingPlan, append_history, max_epochs_heuristic, run_training
from ..io.checkpoint_file import read_checkpoint
from ..models.contract import check_model_guide
from ..settings import settings

__all__ = ["TrainingMixin", "count_cells"]

TRAINER_KWARGS = (
    "check_val_every_n_epoch", "enable_progress_bar", "early_stopping_monitor", "early_stopping_patience",
    "early_stopping_min_delta", "early_stopping_mode", "early_stopping_warmup_epochs", "strategy",
)


class TrainingData(NamedTuple):
    """Where one ``train()`` call takes its minibatches from."""

    train: Callable[[], Iterator[Minibatch]]  #: one epoch of training minibatches
    validation: Callable[[], Iterator[Minibatch]] | None  #: the validation minibatches, if any
    indices: tuple  #: (train, validation, test) cell indices; ``None`` each with a datamodule
    n_cells: int | None  #: cells registered (for the default number of epochs)


class CheckpointRequest(NamedTuple):
    """Where a ``train()`` call writes checkpoints, and the state it resumes from."""

    directory: Path | None  #: ``checkpoint_dir`` (``None``: no checkpoints)
    every_n_epochs: int  #: ``checkpoint_every_n_epochs``
    resumed: dict | None  #: the newest checkpoint's payload when ``resume=True``
    run: dict  #: the settings that must match between a run and its resumption


def _as_json(value) -> str:
    """A stable text form of settings (functions by their qualified name), for comparing runs."""
    return json.dumps(value, sort_keys=True, default=lambda o: getattr(o, "__qualname__", type(o).__name__))


def read_resume_state(checkpoint_dir, resume: bool) -> dict | None:
    """The newest checkpoint in ``checkpoint_dir`` when ``resume`` (verified; see
    :func:`pyro_scvi.io.checkpoint_file.read_checkpoint`), else ``None``."""
    if not resume:
        return None
    if checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir=..., the directory the interrupted run wrote its "
                         "checkpoints to.")
    epoch, state = read_checkpoint(checkpoint_dir)
    logger.info("resuming from the checkpoint of epoch %d in %s", epoch, checkpoint_dir)
    return state


def count_cells(indices) -> int:
    """Number of cells selected by integer positions or a boolean mask."""
    indices = np.asarray(indices)
    return int(indices.sum()) if indices.dtype == bool else len(indices)


def epochs_of(
    data: RegisteredData,
    indices: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    device="cpu",
    sparse: bool = False,
) -> Callable[[], Iterator[Minibatch]]:
    """A function that yields one epoch of minibatches of ``indices`` each time it is called."""

    def epoch() -> Iterator[Minibatch]:
        for _, batch in data.iterate(indices, batch_size, shuffle, drop_last, device, sparse):
            yield batch

    return epoch


def datamodule_batches(datamodule, device) -> TrainingData:
    """Minibatches from a datamodule with ``train_dataloader()`` (and optionally ``val_dataloader()``)."""

    def train() -> Iterator[Minibatch]:
        return (minibatch_from_dict(tensors, device) for tensors in datamodule.train_dataloader())

    val_loader = getattr(datamodule, "val_dataloader", None)

    def validation() -> Iterator[Minibatch]:
        return (minibatch_from_dict(tensors, device) for tensors in val_loader())

    return TrainingData(train, None if val_loader is None else validation, (None, None, None), None)


def _datasplitter_options(datasplitter_kwargs: dict | None) -> tuple[bool, tuple | None]:
    """``drop_last`` and ``external_indexing`` from scvi-tools' ``datasplitter_kwargs``."""
    options = dict(datasplitter_kwargs or {})
    drop_last = bool(options.pop("drop_last", False))
    external = options.pop("external_indexing", None)
    if options:
        raise TypeError(
            f"Unknown datasplitter_kwargs {sorted(options)}; accepted: drop_last, external_indexing."
        )
    return drop_last, external


def _early_stopping(trainer_kwargs: dict) -> EarlyStopping:
    return EarlyStopping(
        monitor=trainer_kwargs.get("early_stopping_monitor", "elbo_validation"),
        patience=trainer_kwargs.get("early_stopping_patience", 45),
        min_delta=trainer_kwargs.get("early_stopping_min_delta", 0.0),
        mode=trainer_kwargs.get("early_stopping_mode", "min"),
        warmup_epochs=trainer_kwargs.get("early_stopping_warmup_epochs", 0),
    )


class TrainingMixin:
    """``train()`` for a model following :class:`~pyro_scvi.api.protocol.ModelProtocol`.

    The module must have ``n_train_cells`` (the size of the training split, which scales the
    KL of global latents) and ``has_custom_model``/``has_custom_guide``.
    """

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every_n_epochs: int = 1,
        resume: bool = False,
        **trainer_kwargs,
    ) -> None:
        """Fit the model by stochastic variational inference (Adam, per-cell-mean ELBO, KL warm-up).

        Checkpoints: with ``checkpoint_dir``, the run's whole state (weights, optimiser, counters, random
        states, early stopping, history, split) is written there every ``checkpoint_every_n_epochs``
        epochs and after the last one (the two newest are kept; files are written atomically and in the
        background). ``resume=True`` continues the run whose checkpoints are in ``checkpoint_dir`` from
        the newest one: a new model built with the same arguments and data, trained with the same
        arguments, ends where the uninterrupted run ends (bitwise on the CPU). A run resumes at an
        epoch boundary: an epoch that was cut short is run again from its start. See
        :mod:`pyro_scvi.infer.checkpoint`.

        ``plan_kwargs``: ``lr`` (1e-3), ``weight_decay`` (1e-6), ``eps`` (0.01), ``optimizer``
        (``"Adam"``/``"AdamW"``), ``n_epochs_kl_warmup`` (400), ``n_steps_kl_warmup``,
        ``min_kl_weight``/``max_kl_weight``, ``reduce_lr_on_plateau`` and its ``lr_*`` settings.
        ``trainer_kwargs``: ``check_val_every_n_epoch``, ``enable_progress_bar``,
        ``early_stopping_monitor`` ("elbo_validation"), ``early_stopping_patience`` (45),
        ``early_stopping_min_delta``, ``early_stopping_mode``, ``early_stopping_warmup_epochs``.
        ``datamodule``: an object with ``train_dataloader()`` (and optionally ``val_dataloader()``)
        yielding dicts with scvi-tools' keys (``"X"``, ``"batch"``, ``"labels"``, ...).

        Data-parallel training: ``devices=N, strategy="ddp"`` (``devices=N > 1`` alone also means
        DDP, as in scvi-tools) in a script started with ``torchrun --nproc_per_node=N script.py``;
        each process trains on its shard of the cells (``batch_size`` cells per process and step)
        with gradients averaged before every optimiser step, and ends with the same weights and
        history (see :mod:`pyro_scvi.infer.distributed`). Without torchrun this raises
        ``ValueError`` with the command to use. Only rank 0 shows progress; save from rank 0 only.
        """
        if datamodule is None:
            self.check_not_minified("train")
        unknown = sorted(set(trainer_kwargs) - set(TRAINER_KWARGS))
        if unknown:
            raise TypeError(
                f"train got unexpected keyword argument(s) {unknown}; accepted: {list(TRAINER_KWARGS)}."
            )
        parallel = data_parallel_for(accelerator, devices, trainer_kwargs.get("strategy"))  # None: one device
        if parallel is not None and datamodule is not None:
            raise ValueError(
                "A datamodule cannot be sharded across data-parallel processes; "
                "train on the registered AnnData."
            )
        plan = TrainingPlan(**(plan_kwargs or {}))
        resumed = read_resume_state(checkpoint_dir, resume)
        if plan.objective == "iwae" and getattr(self.module, "guide_family", "normal") == "full_rank":
            warnings.warn("guide='full_rank' with objective='iwae' was unstable on CellBench "
                          "(benchmarks/bench_posteriors.py: 38-56 nats below the default, or a nan loss); "
                          "prefer the full-rank guide with the ELBO, or the IWAE with guide='normal'.",
                          UserWarning, stacklevel=2)
        device = resolve_device(accelerator, devices) if parallel is None else parallel.device
        self.module.to(device)
        drop_last, external = _datasplitter_options(datasplitter_kwargs)
        if resumed is not None and resumed.get("split") is not None and datamodule is None:
            # the split of the run being resumed
            external = tuple(i.numpy() for i in resumed["split"])
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if datamodule is not None:
            data = self._datamodule_training_data(datamodule, device)
        else:
            data = self._registered_training_data(
                train_size, validation_size, batch_size, shuffle_set_split, drop_last, external,
                load_sparse_tensor, device, parallel,
            )
        if early_stopping and data.validation is None:
            raise ValueError("Can't run Early Stopping with validation monitor with no validation set")
        check_val = trainer_kwargs.get("check_val_every_n_epoch")
        if check_val is None and (early_stopping or plan.reduce_lr_on_plateau):
            check_val = 1
        progress = trainer_kwargs.get("enable_progress_bar", settings.progress_bar)
        stopper = _early_stopping(trainer_kwargs) if early_stopping else None
        run = {"model": type(self).__name__, "init_params": _as_json(self.init_params_),
               "n_obs": self.registry_.n_cells, "n_vars": self.registry_.n_vars,
               "batch_size": int(batch_size), "plan": _as_json(dataclasses.asdict(plan)),
               "check_val_every_n_epoch": check_val,
               "early_stopping": _as_json(None if stopper is None else dataclasses.asdict(stopper)),
               "world_size": 1 if parallel is None else parallel.world_size,
               "datamodule": datamodule is not None}
        self._run_training(
            data,
            plan,
            max_epochs
            if max_epochs is not None
            else max_epochs_heuristic(data.n_cells or self.registry_.n_cells),
            stopper=stopper,
            check_val=check_val,
            progress=progress and (parallel is None or parallel.is_main),
            parallel=parallel,
            checkpoint=CheckpointRequest(None if checkpoint_dir is None else Path(checkpoint_dir),
                                         checkpoint_every_n_epochs, resumed, run),
        )

    def _datamodule_training_data(self, datamodule, device) -> TrainingData:
        """The minibatches of a user's ``datamodule``; a model whose objective needs more than one
        stream (scANVI's labelled cells) replaces this."""
        return datamodule_batches(datamodule, device)

    def _registered_training_data(
        self,
        train_size,
        validation_size,
        batch_size: int,
        shuffle_set_split: bool,
        drop_last: bool,
        external,
        sparse: bool,
        device,
        parallel,
    ) -> TrainingData:
        """Split the model's AnnData and return its training and validation minibatches."""
        _, data = self.registered_data()
        if external is not None:
            train_idx, val_idx, test_idx = (np.asarray(i, dtype=np.int64) for i in external)
        else:
            split_seed = (
                settings.seed if parallel is None or settings.seed is not None else parallel.shared_seed()
            )
            train_idx, val_idx, test_idx = split_indices(
                data.n_obs, train_size, validation_size, batch_size, shuffle_set_split, split_seed, drop_last
            )
        n_shard = len(train_idx) if parallel is None else parallel.shard_length(len(train_idx))
        check_training_minibatches(self.module, n_shard, batch_size, drop_last)
        if parallel is None:
            train = epochs_of(data, train_idx, batch_size, True, drop_last, device, sparse)
            val_cells = val_idx
        else:  # this process's shard of a fresh permutation each epoch
            train = parallel.epoch_batches(
                train_idx,
                lambda order: epochs_of(data, order, batch_size, False, drop_last, device, sparse)(),
            )
            val_cells = parallel.validation_shard(val_idx)
        validation = (
            None
            if len(val_idx) == 0
            else epochs_of(data, val_cells, batch_size, device=device, sparse=sparse)
        )
        return TrainingData(train, validation, (train_idx, val_idx, test_idx), data.n_obs)

    def _run_training(
        self,
        data: TrainingData,
        plan: TrainingPlan,
        max_epochs: int,
        stopper,
        check_val,
        progress: bool,
        parallel,
        checkpoint: CheckpointRequest | None = None,
    ) -> None:
        """Run SVI in the model's parameter store and record the history, also when interrupted."""
        if self.module.has_custom_model or self.module.has_custom_guide:
            self._check_custom_functions(next(iter(data.train()), None))
        self.train_indices_, self.validation_indices_, self.test_indices_ = data.indices
        if data.indices[0] is not None:
            self.module.n_train_cells = count_cells(data.indices[0])
        hooks = {}
        if parallel is not None:
            parallel.prepare(self.module)  # rank 0's weights everywhere, shared permutation seed
            hooks = dict(
                gradient_hook=parallel.average_gradients,
                reduce_sums=parallel.sum_across_ranks,
                epoch_end_hook=parallel.sync_buffers,
                gather=parallel.gather_objects,
            )
        hooks.update(self._checkpoint_hooks(checkpoint, data, parallel))
        try:
            with self.pyro_scope(), reporting_failures(parallel):  # a failure stops every rank
                records, _ = run_training(
                    self.module,
                    data.train,
                    data.validation,
                    max_epochs,
                    plan,
                    check_val_every_n_epoch=check_val,
                    early_stopping=stopper,
                    progress_bar=progress,
                    elbo=self._training_objective(plan),
                    **hooks,
                )
            if parallel is not None:
                parallel.finish()
        except BaseException as error:
            partial = getattr(error, "partial_history", None)
            if partial:
                self.history_ = append_history(self.history_, partial)
                self.is_trained_ = True
            raise
        finally:
            if "checkpoints" in hooks:
                hooks["checkpoints"].close()  # the slot files, and the directory for the next run
        self.history_ = append_history(self.history_, records)
        self.is_trained_ = True

    def _checkpoint_hooks(self, request: CheckpointRequest | None, data: TrainingData, parallel) -> dict:
        """``run_training``'s ``checkpoints`` (a writer when ``checkpoint_dir`` is set) and ``resume``
        (the state to continue from, with this process's random state)."""
        if request is None or (request.directory is None and request.resumed is None):
            return {}
        hooks = {}
        resumed = request.resumed
        if resumed is not None:
            check_same_run(resumed["run"], request.run, request.directory)
            rank = 0 if parallel is None else parallel.rank
            resumed = dict(resumed, rng=resumed["rng_by_rank"][rank])
            if parallel is not None:  # the run's permutation seed, and its epochs from where it stopped
                parallel.resume_at(int(resumed["parallel_seed"]), int(resumed["epoch"]) + 1)
            hooks["resume"] = resumed
        if request.directory is not None:
            split = tuple(None if i is None else torch.as_tensor(np.asarray(i)) for i in data.indices)
            static = {"run": request.run, "split": split if data.indices[0] is not None else None,
                      "parallel_seed": 0 if parallel is None else parallel.seed}
            hooks["checkpoints"] = Checkpointer(request.directory, request.every_n_epochs, static,
                                                writes=parallel is None or parallel.is_main)
        return hooks

    def _training_objective(self, plan: TrainingPlan):
        """The loss ``run_training`` optimises: ``None`` for the default per-cell ELBO of ``plan``; a
        model class with its own objective (scANVI) returns it here."""
        return None

    def _check_custom_functions(self, batch: Minibatch | None) -> None:
        """Trace a custom model/guide once on ``batch`` and raise ``ValueError`` naming a missing site."""
        if batch is None:
            return
        self.module.eval()
        with self.pyro_scope(), torch.no_grad():
            check_model_guide(self.module, batch)
