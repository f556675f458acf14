"""One torch optimiser for all parameters of a model, behind Pyro's optimiser interface.

``pyro.optim.PyroOptim`` creates one torch optimiser per parameter, so a step of scVI (27
parameter tensors) runs 27 optimiser steps, each with its own Python overhead. Adam and AdamW
are elementwise, so one optimiser over all parameters takes the same steps; :class:`JointOptimizer`
does that with torch's fused implementation (one kernel for all tensors, CPU and CUDA), and
optionally drives a ``ReduceLROnPlateau`` scheduler. ``pyro.infer.SVI`` accepts it like any
``PyroOptim``.
"""

from __future__ import annotations

from typing import Iterable

import pyro.optim
import torch

# torch.optim.Optimizer.__init__ imports torch._dynamo on its first call (~0.7 s on a 2-core CPU),
# which would land inside the first train(); import it with the package instead, as Lightning
# (and so scvi-tools) does.
import torch._dynamo  # noqa: E402,F401

__all__ = ["JointOptimizer"]


class JointOptimizer(pyro.optim.PyroOptim):
    """A single ``optimizer_class(params, **optim_args)`` over every parameter it is called with.

    Parameters seen for the first time join as a new parameter group (same settings).
    ``plateau_args`` (``mode``, ``factor``, ``patience``, ...) add a
    ``torch.optim.lr_scheduler.ReduceLROnPlateau``, advanced with :meth:`step` ``(metric)``.
    """

    def __init__(self, optimizer_class: type[torch.optim.Optimizer], optim_args: dict,
                 plateau_args: dict | None = None) -> None:
        super().__init__(optimizer_class, dict(optim_args))
        self.plateau_args = None if plateau_args is None else dict(plateau_args)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._seen: set[int] = set()
        self._pending_state: dict | None = None

    def _add(self, params: list[torch.Tensor]) -> None:
        if self.optimizer is None:
            args = dict(self.pt_optim_args)
            if "foreach" not in args and "fused" not in args and all(p.is_floating_point() for p in params):
                args["fused"] = True  # one kernel over all tensors (torch picks a per-tensor loop on CPU)
            groups = [{"params": params}]
            if self._pending_state is not None:  # rebuild the saved parameter groups (same order)
                sizes = [len(group["params"]) for group in self._pending_state["optimizer"]["param_groups"]]
                if sum(sizes) == len(params):
                    starts = [sum(sizes[:i]) for i in range(len(sizes))]
                    groups = [{"params": params[start:start + size]} for start, size in zip(starts, sizes)]
            self.optimizer = self.pt_optim_constructor(groups, **args)
            if self.plateau_args is not None:
                plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
                self.scheduler = plateau(self.optimizer, **self.plateau_args)
            if self._pending_state is not None:
                self._load(self._pending_state)
                self._pending_state = None
        else:
            self.optimizer.add_param_group({"params": params})
        self._seen.update(id(p) for p in params)

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """One optimiser step on ``params`` (those without a gradient are left alone)."""
        params = list(params)
        new = [p for p in params if id(p) not in self._seen]
        if new:
            self._add(new)
        self.optimizer.step()

    def step(self, metric: float) -> None:
        """Advance the learning-rate scheduler with the monitored ``metric`` (no-op without one)."""
        if self.scheduler is not None:
            self.scheduler.step(metric)

    @property
    def lr(self) -> float | None:
        """Current learning rate (``None`` before the first step)."""
        return None if self.optimizer is None else float(self.optimizer.param_groups[0]["lr"])

    def get_state(self) -> dict:
        """The optimiser's state (and the scheduler's, when there is one); ``{}`` before the first step."""
        if self.optimizer is None:
            return {}
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def set_state(self, state: dict) -> None:
        """Load a state from :meth:`get_state` (applied at the first step if none was taken yet)."""
        if not state:
            return
        if self.optimizer is None:
            self._pending_state = state
        else:
            self._load(state)

    def _load(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
