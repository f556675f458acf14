"""Inference: the ELBO, the SVI training loop and posterior queries."""

from .elbo import CellMeanELBO, elbo_terms
from .training import EarlyStopping, TrainingPlan, kl_weight_at, max_epochs_heuristic, run_training

__all__ = ["CellMeanELBO", "elbo_terms", "TrainingPlan", "EarlyStopping", "kl_weight_at",
           "max_epochs_heuristic", "run_training"]
