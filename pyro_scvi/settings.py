"""Global settings: random seed, default inference batch size, progress bars.

``pyro_scvi.settings.seed = 0`` seeds Python's ``random``, NumPy, torch (CPU and CUDA) and
Pyro at once, and makes the train/validation split reproducible.
"""

from __future__ import annotations

import numpy as np
import pyro
import torch

__all__ = ["settings", "Settings"]


class Settings:
    """Process-wide defaults, mirroring ``scvi.settings`` where the names overlap."""

    def __init__(self) -> None:
        self._seed: int | None = None
        #: minibatch size of the inference methods when they get ``batch_size=None``
        self.batch_size: int = 128
        #: show tqdm progress bars during training
        self.progress_bar: bool = True

    @property
    def seed(self) -> int | None:
        """The last seed set, or ``None`` (the default: nothing seeded, splits random)."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        if value is not None:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"settings.seed must be an int or None, got {value!r}.")
            value = int(value)
            pyro.set_rng_seed(value)  # Python's random, NumPy and torch (which seeds every CUDA device too)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self._seed = value

    def __repr__(self) -> str:
        return f"Settings(seed={self._seed}, batch_size={self.batch_size}, progress_bar={self.progress_bar})"


settings = Settings()
