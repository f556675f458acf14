"""What training shows while it runs: a progress bar on stderr and the ``pyro_scvi`` logger.

The bar counts epochs and shows the last training loss and validation ELBO; at the end one summary
line follows it. Both go to stderr, so a pipeline's stdout stays clean; ``enabled=False`` (the
CLI's ``--quiet``, ``enable_progress_bar=False``) silences them. The same summary, and the reason
early stopping gave, are logged at INFO level under the ``pyro_scvi`` logger, so notebooks and
pipelines can route or silence them with :mod:`logging` (nothing is configured by the library:
without a handler, Python shows only warnings and errors).
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

__all__ = ["TrainingProgress", "logger"]

#: the package's logger; modules log under children of it (``pyro_scvi.infer``, ...)
logger = logging.getLogger("pyro_scvi")


def _last(records: dict, key: str) -> float | None:
    rows = records.get(key)
    return rows[-1][1] if rows else None


class TrainingProgress:
    """Progress of one training run from epoch ``start`` (0, or where a resumed run continues)."""

    def __init__(self, start: int, max_epochs: int, enabled: bool = True) -> None:
        self.start, self.max_epochs, self.enabled = start, max_epochs, enabled
        self.started = time.perf_counter()
        self.epochs_run = 0
        self.bar = tqdm(total=max_epochs, initial=start, desc="Training", unit="epoch", file=sys.stderr,
                        disable=not enabled, leave=True, dynamic_ncols=True)
        self._validation: float | None = None

    def update(self, epoch: int, values: dict) -> None:
        """After ``epoch``: advance the bar and show its loss (and validation ELBO when it has one)."""
        self.epochs_run += 1
        if "elbo_validation" in values:
            self._validation = values["elbo_validation"]
        postfix = {"loss": f"{values['train_loss']:.4g}"}
        if self._validation is not None:
            postfix["val_elbo"] = f"{self._validation:.4g}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def summary(self, records: dict, stop_reason: str | None) -> str:
        """One line: epochs, time, last losses and why training stopped."""
        seconds = time.perf_counter() - self.started
        last_epoch = self.start + self.epochs_run
        text = f"Trained epochs {self.start + 1}-{last_epoch} of {self.max_epochs} in {seconds:.1f} s"
        if self.epochs_run == 0:
            text = f"Nothing to train: the run had already ended at epoch {self.start} of {self.max_epochs}"
        parts = []
        for key, name in (("train_loss", "train loss"), ("elbo_validation", "validation ELBO")):
            value = _last(records, key)
            if value is not None:
                parts.append(f"{name} {value:.4g}")
        if parts:
            text += ": " + ", ".join(parts)
        if stop_reason:
            text += " (stopped early: no improvement)"
        return text

    def close(self, records: dict, stop_reason: str | None) -> None:
        """Close the bar, then write the summary line (stderr) and log it."""
        self.bar.close()
        line = self.summary(records, stop_reason)
        if self.enabled:
            print(line, file=sys.stderr, flush=True)
        logger.info(line)
        if stop_reason:
            logger.info(stop_reason)
