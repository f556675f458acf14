"""Stochastic variational inference for scVI: KL warm-up, validation, early stopping, history.

The loop is ``pyro.infer.SVI`` with :class:`~pyro_scvi.infer.elbo.CellMeanELBO` and one torch
Adam (or AdamW) over all parameters (:class:`~pyro_scvi.infer.optim.JointOptimizer`). Per-epoch
metrics are accumulated as tensors on the training device and read once per epoch, so no step
waits for the host. History keys and signs follow scvi-tools: ``elbo_*``
are *negative* ELBOs (positive numbers, lower is better).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import SVI

from ..data.minibatch import Minibatch
from ..models.contract import param_store_from_safe, param_store_to_safe
from ..models.sites import Z
from .checkpoint import Checkpointer, set_rng_state
from .elbo import OBJECTIVES, CellMeanELBO, elbo_parts, iwae_parts
from .optim import JointOptimizer
from .progress import TrainingProgress

__all__ = ["TrainingPlan", "EarlyStopping", "FrozenEntries", "kl_weight_at", "max_epochs_heuristic",
           "run_training", "append_history"]


def max_epochs_heuristic(n_obs: int, epochs_cap: int = 400, decay_at_n_obs: int = 20000) -> int:
    """scvi-tools' default number of epochs: ``max(1, min(round(20000 / n_obs · 400), 400))``."""
    n_epochs = max(1, int(min(round((decay_at_n_obs / max(n_obs, 1)) * epochs_cap), epochs_cap)))
    if n_epochs == 1:
        warnings.warn("The default number of epochs is 1 for this many cells; pass max_epochs to train "
                      "longer.", UserWarning, stacklevel=3)
    return n_epochs


def kl_weight_at(epoch: int, step: int, n_epochs_kl_warmup: int | None, n_steps_kl_warmup: int | None,
                 min_kl_weight: float = 0.0, max_kl_weight: float = 1.0) -> float:
    """Linear KL warm-up by epoch (takes precedence) or by optimiser step, as in scvi-tools."""
    if min_kl_weight > max_kl_weight:
        raise ValueError(f"min_kl_weight ({min_kl_weight}) must not exceed max_kl_weight ({max_kl_weight}).")
    span = max_kl_weight - min_kl_weight
    if n_epochs_kl_warmup:
        if epoch < n_epochs_kl_warmup:
            return min_kl_weight + span * epoch / n_epochs_kl_warmup
        return max_kl_weight
    if n_steps_kl_warmup:
        if step < n_steps_kl_warmup:
            return min_kl_weight + span * step / n_steps_kl_warmup
        return max_kl_weight
    return max_kl_weight


@dataclass
class TrainingPlan:
    """Optimiser and objective settings (scvi-tools' ``plan_kwargs``)."""

    optimizer: str = "Adam"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_steps_kl_warmup: int | None = None
    n_epochs_kl_warmup: int | None = 400
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    #: ``"elbo"`` (scvi-tools' loss) or ``"iwae"`` (importance-weighted bound, DReG gradient)
    objective: str = "elbo"
    #: draws per cell and step, vectorised in a ``"particles"`` plate
    num_particles: int = 1

    def __post_init__(self) -> None:
        if self.optimizer not in ("Adam", "AdamW"):
            raise ValueError(f"optimizer={self.optimizer!r} is not supported; use 'Adam' or 'AdamW'.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not one of {OBJECTIVES}.")
        particles = self.num_particles
        if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {particles!r}.")
        if self.min_kl_weight > self.max_kl_weight:
            raise ValueError(f"min_kl_weight ({self.min_kl_weight}) must not exceed max_kl_weight "
                             f"({self.max_kl_weight}).")

    def make_optimizer(self) -> JointOptimizer:
        """One torch Adam/AdamW over all parameters, optionally behind ReduceLROnPlateau."""
        torch_optim = torch.optim.Adam if self.optimizer == "Adam" else torch.optim.AdamW
        optim_args = {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay}
        plateau = None
        if self.reduce_lr_on_plateau:
            plateau = {"mode": "min", "factor": self.lr_factor, "patience": self.lr_patience,
                       "threshold": self.lr_threshold, "threshold_mode": "abs", "min_lr": self.lr_min}
        return JointOptimizer(torch_optim, optim_args, plateau)

    def kl_weight(self, epoch: int, step: int) -> float:
        return kl_weight_at(epoch, step, self.n_epochs_kl_warmup, self.n_steps_kl_warmup, self.min_kl_weight,
                            self.max_kl_weight)


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` validation checks."""

    monitor: str = "elbo_validation"
    patience: int = 45
    min_delta: float = 0.0
    mode: str = "min"
    warmup_epochs: int = 0
    best: float = field(default=math.inf, init=False)
    wait: int = field(default=0, init=False)
    reason: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"early_stopping_mode must be 'min' or 'max', got {self.mode!r}.")
        self.best = math.inf if self.mode == "min" else -math.inf

    def should_stop(self, epoch: int, metrics: dict[str, float]) -> bool:
        if epoch < self.warmup_epochs or self.monitor not in metrics:
            return False
        value = metrics[self.monitor]
        if self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.reason = (
                f"Monitored metric {self.monitor} did not improve in the last {self.patience} records. "
                f"Best score: {self.best:.3f}. Signaling Trainer to stop."
            )
            return True
        return False


class _EpochMetrics:
    """Sums of the ELBO terms over an epoch, kept as device tensors until ``compute``."""

    def __init__(self) -> None:
        self.n_cells = 0
        self.loss = 0.0
        self.reconstruction = 0.0
        self.kl_local = 0.0
        self.kl_global = 0.0
        self.bound = None
        #: name → [sum of value × n_cells, n_cells] of the objective's extra metrics (e.g. a classifier's)
        self.extra: dict[str, list] = {}

    def add(self, loss: torch.Tensor, reconstruction: dict, kl: dict, n_cells: int, kl_global=0.0,
            bound: torch.Tensor | None = None) -> None:
        """``kl_global``: the global KL per cell of this step (``Σ KL_global / N``); ``bound``: the
        per-cell IWAE bound ``(n,)`` when training on it."""
        self.n_cells += n_cells
        if bound is not None:
            self.bound = (0.0 if self.bound is None else self.bound) + bound.sum() - kl_global * n_cells
        self.loss = self.loss + loss.detach() * n_cells
        self.reconstruction = self.reconstruction + sum((t.sum() for t in reconstruction.values()), 0.0)
        self.kl_local = self.kl_local + sum((t.sum() for t in kl.values()), 0.0)
        self.kl_global = self.kl_global + kl_global * n_cells

    def add_extra(self, metrics: dict, n_cells: int) -> None:
        """Metrics of one step (``{name: scalar}``), averaged over the epoch weighted by ``n_cells``."""
        for name, value in metrics.items():
            total = self.extra.setdefault(name, [0.0, 0])
            total[0], total[1] = total[0] + value * n_cells, total[1] + n_cells

    def compute(self, split: str, loss_name: str,
                reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        sums = (self.loss, self.reconstruction, self.kl_local, self.kl_global,
                0.0 if self.bound is None else self.bound, self.n_cells)
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in sums])
        if reduce_sums is not None:  # data-parallel: sums and cell counts over all processes
            values = reduce_sums(values)
        loss, rec, kl, kl_global, bound = (values[:5] / max(float(values[5]), 1.0)).tolist()
        metrics = {
            loss_name: loss,
            f"elbo_{split}": rec + kl + kl_global,
            f"reconstruction_loss_{split}": rec,
            f"kl_local_{split}": kl,
            f"kl_global_{split}": kl_global,
        }
        if self.bound is not None:  # the negative IWAE bound per cell, signed like elbo_*
            metrics[f"iwae_{split}"] = -bound
        for name, (total, n_cells) in self.extra.items():  # scvi-tools' names: train_accuracy, ...
            metrics[f"{split}_{name}"] = float(total) / max(n_cells, 1)
        return metrics


class FrozenEntries:
    """Entries of parameters that training leaves bitwise unchanged.

    ``masks`` maps a parameter name of ``module`` to a boolean tensor of its shape (True = frozen).
    After every optimiser step :meth:`restore` writes the frozen entries back, so neither the
    gradient nor Adam's weight decay can move them; the other entries train as usual (Adam is
    elementwise, so they evolve exactly as if the frozen ones were absent).
    """

    def __init__(self, module: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
        parameters = dict(module.named_parameters())
        unknown = sorted(set(masks) - set(parameters))
        if unknown:
            raise ValueError(f"frozen_parameters names unknown parameters: {unknown}.")
        self._entries = []
        #: wholly frozen parameters: no gradient is computed for them while training (see ``hold``)
        self._whole = []
        for name, mask in masks.items():
            parameter = parameters[name]
            mask = torch.as_tensor(mask, dtype=torch.bool, device=parameter.device).expand_as(parameter)
            if bool(mask.all()):
                self._whole.append(parameter)
            else:
                self._entries.append((parameter, mask, parameter.detach().clone()))

    def __bool__(self) -> bool:
        return bool(self._entries)

    @contextlib.contextmanager
    def hold(self):
        """Within the block, wholly frozen parameters have ``requires_grad=False``: backward skips
        their weight gradients and Adam (which skips parameters without a gradient) leaves them
        bitwise unchanged, weight decay included."""
        previous = [parameter.requires_grad for parameter in self._whole]
        for parameter in self._whole:
            parameter.requires_grad_(False)
        try:
            yield
        finally:
            for parameter, flag in zip(self._whole, previous):
                parameter.requires_grad_(flag)

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen entries of partly frozen parameters back (after an optimiser step)."""
        for parameter, mask, value in self._entries:
            parameter.copy_(torch.where(mask, value, parameter))


def _validate(module, model, guide, batches: Iterable[Minibatch], kl_weight: float, reduce_sums=None,
              plan: TrainingPlan | None = None, elbo=None) -> dict[str, float]:
    """Validation metrics with the plan's objective and number of particles (one ELBO draw by default),
    or with ``elbo``, a model's own objective (see ``run_training``)."""
    module.eval()
    metrics = _EpochMetrics()
    iwae = plan is not None and plan.objective == "iwae"
    particles = 1 if plan is None else plan.num_particles
    with torch.no_grad():
        for batch in batches:
            if elbo is not None:
                elbo.kl_weights[Z] = kl_weight
                loss = elbo.loss(model, guide, batch)
                metrics.add(loss, elbo.last_reconstruction, elbo.last_kl, batch.n_cells)
                metrics.add_extra(getattr(elbo, "last_metrics", {}), batch.n_cells)
                continue
            if iwae:
                terms = iwae_parts(model, guide, batch, num_particles=particles, kl_weights={Z: kl_weight})
                parts, loss, bound = terms.elbo, terms.loss, terms.bound
            else:
                parts = elbo_parts(model, guide, batch, kl_weights={Z: kl_weight}, num_particles=particles)
                loss, bound = parts.loss, None
            metrics.add(loss, parts.reconstruction, parts.kl, batch.n_cells, parts.kl_global_per_cell, bound)
    module.train()
    return metrics.compute("validation", "validation_loss", reduce_sums)


def run_training(
    module,
    train_batches: Callable[[], Iterable[Minibatch]],
    validation_batches: Callable[[], Iterable[Minibatch]] | None,
    max_epochs: int,
    plan: TrainingPlan,
    check_val_every_n_epoch: int | None = None,
    early_stopping: EarlyStopping | None = None,
    progress_bar: bool = True,
    gradient_hook: Callable[[], None] | None = None,
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
    epoch_end_hook: Callable[[], None] | None = None,
    elbo=None,
    checkpoints: Checkpointer | None = None,
    resume: dict | None = None,
    gather: Callable[[dict], list] | None = None,
) -> tuple[dict[str, list], str | None]:
    """Train ``module`` (its ``model``/``guide``) with SVI inside the caller's param-store scope.

    Entries listed in ``module.frozen_parameters`` (name → boolean mask) stay fixed (see
    :class:`FrozenEntries`). ``train_batches()`` / ``validation_batches()`` return fresh iterables
    over minibatches already on the module's device. Returns ``(records, stop_reason)`` where
    ``records`` maps each history key to a list of ``(epoch, value)``. The records gathered so far
    are kept when training is interrupted (Ctrl-C) or fails; the exception is re-raised after they
    are attached to it as ``exc.partial_history``. When an epoch ends with a non-finite loss or
    non-finite weights, the weights of the start of that epoch are restored and
    ``FloatingPointError`` is raised (finiteness is checked once per epoch, never per step).

    Data-parallel hooks (see :mod:`pyro_scvi.infer.distributed`): ``gradient_hook()`` runs after
    each backward pass, before the optimiser step (gradient averaging); ``reduce_sums(t)`` maps the
    float64 vector of per-epoch sums (loss, ELBO terms, IWAE bound, n_cells) to its sum over the
    processes; ``epoch_end_hook()`` runs after each training epoch, before validation;
    ``gather(obj)`` returns every process's ``obj`` (for the random states in checkpoints).

    ``elbo``: the model's own objective instead of :class:`CellMeanELBO` (e.g. scANVI's
    :class:`~pyro_scvi.infer.scanvi.SemiSupervisedELBO`), with its interface (``kl_weights``,
    ``last_reconstruction``, ``last_kl``, ``last_kl_global``, ``last_bound``) and optionally
    ``last_metrics`` (``{name: scalar}``, logged as ``train_<name>``/``validation_<name>``).

    ``checkpoints``: writes the run's state at the end of its epochs (see
    :mod:`pyro_scvi.infer.checkpoint`); ``resume``: such a state (with this process's random
    state under ``"rng"``), from which the run continues at the epoch after it.
    """
    records: dict[str, list] = {}
    stop_reason, start_epoch = None, 0
    if resume is not None:  # weights first: frozen entries keep the values they are restored to
        _restore_parameters(module, resume)
    run = _SVIRun(module, plan, gradient_hook, elbo)
    if resume is not None:
        records, start_epoch, stop_reason = _restore_run(run, early_stopping, resume)
    snapshot = None
    module.train()
    progress = TrainingProgress(start_epoch, max_epochs, enabled=progress_bar)
    end_epoch = max_epochs if stop_reason is None else start_epoch  # a finished run has nothing left
    # Argument checks of distributions are a pass over each tensor plus a host sync (on CUDA) per
    # site and step; training runs without them and checks finiteness once per epoch instead.
    with pyro.validation_enabled(False), run.frozen.hold():
        try:
            for epoch in range(start_epoch, end_epoch):
                # weights (and BatchNorm statistics) at the start of the epoch: restored if it goes non-finite
                snapshot = _snapshot(module, snapshot)
                metrics = run.train_epoch(epoch, train_batches(), snapshot)
                values = metrics.compute("train", "train_loss", reduce_sums)
                values["kl_weight"] = run.kl_weight
                _check_epoch_finite(module, values["train_loss"], snapshot, epoch)
                if epoch_end_hook is not None:
                    epoch_end_hook()
                if validation_batches is not None and _validation_epoch(epoch, check_val_every_n_epoch):
                    values.update(run.validate(validation_batches(), reduce_sums))
                if plan.reduce_lr_on_plateau:
                    values["lr-" + plan.optimizer] = _current_lr(run.optim, plan.lr)
                for key, value in values.items():
                    records.setdefault(key, []).append((epoch, value))
                progress.update(epoch, values)
                if early_stopping is not None and early_stopping.should_stop(epoch, values):
                    stop_reason = early_stopping.reason
                last = stop_reason is not None or epoch == max_epochs - 1
                if checkpoints is not None and checkpoints.due(epoch, last):
                    checkpoints.save(epoch, _run_state(run, records, early_stopping, stop_reason), gather)
                if stop_reason is not None:
                    break
        except BaseException as error:
            error.partial_history = records
            raise
        finally:
            progress.close(records, stop_reason)
            module.eval()
    return records, stop_reason


def _run_state(run: _SVIRun, records: dict, early_stopping: EarlyStopping | None, stop_reason) -> dict:
    """What a checkpoint holds of the training loop (the caller adds the random states)."""
    stopper = None if early_stopping is None else {"best": early_stopping.best, "wait": early_stopping.wait}
    return {
        "module": run.module.state_dict(),
        "pyro_params": param_store_to_safe(pyro.get_param_store().get_state()),
        "optimizer": run.optim.get_state(),
        "step": run.step,
        "kl_weight": run.kl_weight,
        "early_stopping": stopper,
        "stop_reason": stop_reason,
        "records": records,
    }


def _restore_parameters(module, state: dict) -> None:
    """The weights and plain Pyro parameters of a checkpoint, into ``module`` and the current store."""
    module.load_state_dict(state["module"])
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    pyro.get_param_store().set_state(param_store_from_safe(state["pyro_params"], device))


def _restore_run(run: _SVIRun, early_stopping: EarlyStopping | None, state: dict):
    """Optimiser, counters, early stopping, history and random state of a checkpoint; returns
    ``(records, first epoch to run, stop reason)``."""
    run.optim.set_state(state["optimizer"])
    run.step, run.kl_weight = int(state["step"]), float(state["kl_weight"])
    if early_stopping is not None and state["early_stopping"] is not None:
        early_stopping.best = state["early_stopping"]["best"]
        early_stopping.wait = int(state["early_stopping"]["wait"])
    records = {key: [tuple(row) for row in rows] for key, rows in state["records"].items()}
    set_rng_state(state["rng"])
    return records, int(state["epoch"]) + 1, state["stop_reason"] or None


class _SVIRun:
    """The SVI state of one ``run_training`` call: objective, optimiser, step count and KL weight."""

    def __init__(self, module, plan: TrainingPlan, gradient_hook: Callable[[], None] | None,
                 elbo=None) -> None:
        self.module, self.plan, self.gradient_hook = module, plan, gradient_hook
        self.custom_elbo = elbo is not None
        self.elbo = elbo if elbo is not None else CellMeanELBO(num_particles=plan.num_particles,
                                                                objective=plan.objective)
        self.optim = plan.make_optimizer()
        self.svi = SVI(module.model, module.guide, self.optim, loss=self.elbo)
        self.frozen = FrozenEntries(module, getattr(module, "frozen_parameters", {}))
        self.step_parameters = _StepParameters()
        self.step = 0
        #: KL warm-up weight of the last step (kept over an epoch without minibatches)
        self.kl_weight = plan.kl_weight(0, 0)

    def train_epoch(self, epoch: int, batches: Iterable[Minibatch], snapshot: dict) -> _EpochMetrics:
        """One optimiser step per minibatch; on non-finite values, restore ``snapshot`` and raise
        ``FloatingPointError``."""
        metrics = _EpochMetrics()
        elbo = self.elbo
        try:
            for batch in batches:
                self.kl_weight = self.plan.kl_weight(epoch, self.step)
                elbo.kl_weights[Z] = self.kl_weight
                loss = _svi_step(self.svi, batch, self.gradient_hook, self.step_parameters)
                if self.frozen:
                    self.frozen.restore()
                metrics.add(loss, elbo.last_reconstruction, elbo.last_kl, batch.n_cells, elbo.last_kl_global,
                            elbo.last_bound)
                metrics.add_extra(getattr(elbo, "last_metrics", {}), batch.n_cells)
                self.step += 1
        except Exception as error:  # NaN weights or inputs trip the distributions' argument checks mid-epoch
            if _NON_FINITE_MARK in str(error) or not _all_finite(self.module):
                self.module.load_state_dict(snapshot)
                message = _non_finite_message("values became NaN or infinite", epoch)
                raise FloatingPointError(message) from error
            raise
        return metrics

    def validate(self, batches: Iterable[Minibatch], reduce_sums=None) -> dict[str, float]:
        """Validation metrics; advances the learning-rate schedule when it monitors one of them."""
        values = _validate(self.module, self.svi.model, self.svi.guide, batches, self.kl_weight, reduce_sums,
                           self.plan, self.elbo if self.custom_elbo else None)
        if self.plan.reduce_lr_on_plateau and self.plan.lr_scheduler_metric in values:
            self.optim.step(values[self.plan.lr_scheduler_metric])
        return values


def _validation_epoch(epoch: int, every: int | None) -> bool:
    """Whether validation runs after ``epoch`` (every ``every`` epochs; never when ``every`` is 0 or None)."""
    return bool(every) and (epoch + 1) % every == 0


def _check_epoch_finite(module, train_loss: float, snapshot: dict, epoch: int) -> None:
    """Restore ``snapshot`` and raise ``FloatingPointError`` when the epoch's loss or weights are not
    finite."""
    if not math.isfinite(train_loss) or not _all_finite(module):
        module.load_state_dict(snapshot)
        what = f"loss became {train_loss}" if not math.isfinite(train_loss) else "weights became non-finite"
        raise FloatingPointError(_non_finite_message(what, epoch))


#: how torch's distributions report a NaN/inf argument
_NON_FINITE_MARK = "found invalid values"


def _non_finite_message(what: str, epoch: int) -> str:
    return (
        f"The training {what} in epoch {epoch}; training stopped and the model keeps the weights of the last "
        "finite epoch (its history so far is kept). Likely causes: the registered layer is not raw counts "
        "(normalised or log data: register the raw counts with `layer=`), NaN or infinite values in the "
        "data, or a learning rate that is too high (lower it with plan_kwargs={'lr': ...})."
    )


def _all_finite(module) -> bool:
    """Whether every floating-point parameter and buffer of ``module`` is finite (one host sync).

    A tensor's sum is finite when all its entries are, so one reduction per tensor settles the
    usual case; only when a sum is not finite (a NaN or inf entry, or an overflowing sum of
    finite ones) are that model's entries checked one by one.
    """
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    if not tensors or bool(torch.isfinite(torch.stack([t.sum().float() for t in tensors])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _snapshot(module, previous: dict | None) -> dict:
    """A copy of ``module``'s state dict, written into ``previous`` when it has the same entries
    (no new allocation each epoch)."""
    state = module.state_dict()
    if (
        previous is not None
        and previous.keys() == state.keys()
        and all(previous[k].shape == v.shape and previous[k].dtype == v.dtype for k, v in state.items())
    ):
        for name, value in state.items():
            previous[name].copy_(value)
        return previous
    return {name: value.detach().clone() for name, value in state.items()}


class _StepParameters:
    """The unconstrained parameters an SVI step optimises: those of the param store.

    Training runs inside a param-store scope private to one model, so its store holds exactly the
    parameters its model and guide register (``pyro.module``/``pyro.param``); those a step does not
    use have no gradient and the optimiser leaves them alone. The list is rebuilt only when the
    store grows, which spares a parameter-recording trace around every step. It is ordered by
    name, not by registration, so that a run resumed from a checkpoint (whose plain ``pyro.param``
    values are restored before the first step) hands the optimiser its parameters in the same
    order as the run that wrote it.
    """

    def __init__(self) -> None:
        self._size = -1
        self._params: list[torch.Tensor] = []

    def __call__(self) -> list[torch.Tensor]:
        store = pyro.get_param_store()
        if len(store) != self._size:
            named = sorted(store.named_parameters(), key=lambda item: item[0])
            self._params = list(dict.fromkeys(value for _, value in named))
            self._size = len(store)
        return self._params


def _svi_step(
    svi: SVI,
    batch: Minibatch,
    gradient_hook: Callable[[], None] | None = None,
    step_parameters: _StepParameters | None = None,
) -> torch.Tensor:
    """``SVI.step`` without reading the loss back to the host: returns the loss as a tensor."""
    loss = svi.loss_and_grads(svi.model, svi.guide, batch)
    if gradient_hook is not None:  # e.g. average the gradients across data-parallel processes
        gradient_hook()
    params = (step_parameters or _StepParameters())()
    svi.optim(params)
    for param in params:  # drop the gradients (cheaper than zero-filling them; Adam skips None)
        param.grad = None
    return loss


def _current_lr(optim, default: float) -> float:
    lr = getattr(optim, "lr", None)
    return default if lr is None else lr


def append_history(
    history: dict[str, pd.DataFrame] | None, records: dict[str, list]
) -> dict[str, pd.DataFrame]:
    """Append per-epoch records to a history of one-column DataFrames indexed by ``epoch``.

    Epochs continue after the last recorded one, so training twice appends rather than overwrites.
    """
    history = {} if history is None else dict(history)
    offset = 0
    if history:
        offset = 1 + max(int(frame.index.max()) for frame in history.values() if len(frame))
    for key, rows in records.items():
        epochs = np.array([epoch for epoch, _ in rows], dtype=np.int64) + offset
        frame = pd.DataFrame({key: [value for _, value in rows]}, index=pd.Index(epochs, name="epoch"))
        history[key] = pd.concat([history[key], frame]) if key in history else frame
    return history
