"""The tensors of one minibatch of cells, as the model and guide functions see them."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["Minibatch"]


@dataclass(frozen=True)
class Minibatch:
    """Registered data of ``n`` cells (everything on one device).

    Attributes
    ----------
    x
        Counts ``(n, G)`` float, or ``None`` when the counts are to be sampled.
    batch_index
        Batch codes ``(n, 1)`` int64.
    labels
        Label codes ``(n, 1)`` int64.
    log_library
        Observed log total counts ``log Σ_g x_ng``, ``(n, 1)`` float.
    size_factor
        Registered size factor ``(n, 1)`` float, or ``None``.
    categorical_covariates
        Codes of the extra categorical covariates ``(n, m)`` int64, or ``None``.
    continuous_covariates
        Extra continuous covariates ``(n, C)`` float, or ``None``.
    latent_loc, latent_scale
        A stored posterior of z ``(n, d)`` (minified data), or ``None``.
    """

    x: torch.Tensor | None
    batch_index: torch.Tensor
    labels: torch.Tensor
    log_library: torch.Tensor
    size_factor: torch.Tensor | None = None
    categorical_covariates: torch.Tensor | None = None
    continuous_covariates: torch.Tensor | None = None
    latent_loc: torch.Tensor | None = None
    latent_scale: torch.Tensor | None = None

    @property
    def n_cells(self) -> int:
        return self.batch_index.shape[0]

    def categorical(self, batch_index: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Categorical inputs of the networks: batch codes first, then one ``(n, 1)`` per covariate."""
        first = self.batch_index if batch_index is None else batch_index
        covariates = self.categorical_covariates
        rest = [] if covariates is None else list(covariates.split(1, dim=-1))
        return [first, *rest]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Minibatch":
        """Copy every tensor to ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Minibatch(**{name: None if value is None else value.to(device, non_blocking=non_blocking)
                            for name, value in values.items()})

    def pin_memory(self) -> "Minibatch":
        """The same tensors in page-locked host memory (needs CUDA), for asynchronous copies to the GPU
        (``to(device, non_blocking=True)``); sparse tensors are left as they are."""
        def pinned(value):
            return value if value is None or value.layout != torch.strided else value.pin_memory()

        return Minibatch(**{f.name: pinned(getattr(self, f.name)) for f in fields(self)})

    def with_batch(self, code: int) -> "Minibatch":
        """The same cells, every one assigned to batch ``code``."""
        return replace(self, batch_index=torch.full_like(self.batch_index, int(code)))
