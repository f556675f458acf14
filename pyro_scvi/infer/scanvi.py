"""scANVI's training objective: the ELBO with the label summed out, plus the classification term.

Term by term, for a minibatch of ``n`` cells and a separate minibatch of ``m`` labelled cells
(scvi-tools' ``SCANVAE.loss``; ``π_n = q(y | z1_n)``, one draw z1_n ~ q(z1 | x_n), one draw
z2_nk ~ q(z2 | z1_n, k) per label k)::

    reconstruction_n = −log p(x_n | z1_n, l_n)                      model site "x"
                     + log q(z1_n | x_n)                            guide site "z"
                     − Σ_k π_nk log p(z1_n | z2_nk, k)              model site "z", (L, n), weighted
    kl_n             = Σ_k π_nk KL(q(z2 | z1_n, k) ‖ N(0, I))        sites "z2", (L, n), weighted
                     + KL(Cat(π_n) ‖ Cat(y_prior))                  sites "y", exact
                     + KL(q(l_n | x_n) ‖ p(l_n))                    sites "library" (latent library)
    loss = mean_n [reconstruction_n + kl_weight · kl_n] + classification_ratio · CE_m

with ``CE_m`` the mean cross-entropy of the classifier at the encoder mean on the labelled
minibatch (``SCANVIModule.classification_loss``). The sum over labels is Pyro's parallel
enumeration: the guide is traced under ``poutine.enum`` so its ``y`` site holds all ``L`` labels
(dim −2), the model is replayed on that trace, and the weights ``π`` are the guide's ``y``
probabilities. This is exactly what ``TraceEnum_ELBO`` computes for a guide-enumerated site, with
the KLs of ``z2`` and ``y`` taken in closed form (as the reference) instead of as
``log q − log p``, and with the KL warm-up weight on ``y``, ``z2`` and the library but not on z1.
Labels of labelled cells are not observed in the ELBO, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from pyro import plate, poutine
from pyro.infer import ELBO
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from ..data.minibatch import Minibatch
from ..models.scanvi import Z2, Y
from ..models.sites import LIBRARY, PARTICLES, X, Z
from .importance import MAX_PASS_ELEMENTS

__all__ = ["SemiSupervisedBatch", "SemiSupervisedELBO", "categorical_kl", "labelled_part",
           "scanvi_cell_terms", "scanvi_log_importance_weights"]


@dataclass(frozen=True)
class SemiSupervisedBatch(Minibatch):
    """A minibatch of cells and, in ``labelled``, a minibatch of labelled cells for the classifier."""

    labelled: Minibatch | None = None

    @classmethod
    def of(cls, batch: Minibatch, labelled: Minibatch | None) -> "SemiSupervisedBatch":
        return cls(**{f.name: getattr(batch, f.name) for f in fields(Minibatch)}, labelled=labelled)


def labelled_part(batch: Minibatch, n_labels: int, min_cells: int = 2) -> Minibatch | None:
    """The cells of ``batch`` with a label (codes below ``n_labels``), or ``None`` when fewer than
    ``min_cells`` (the classifier's BatchNorm needs two cells in training mode)."""
    keep = batch.labels.reshape(-1) < n_labels  # (n,)
    if int(keep.sum()) < min_cells:
        return None
    values = {f.name: getattr(batch, f.name) for f in fields(Minibatch)}
    return Minibatch(**{name: None if value is None else value[keep] for name, value in values.items()})


def categorical_kl(p, q) -> torch.Tensor:
    """KL(p ‖ q) of two categorical distributions, as ``torch.distributions.kl_divergence`` (0 where p
    is 0, inf where q is 0 and p is not), with ``torch.where`` in place of torch's boolean-mask
    assignments, which make the host wait for the device on CUDA."""
    terms = p.probs * (p.logits - q.logits)
    terms = torch.where(q.probs == 0, torch.inf, terms)
    return torch.where(p.probs == 0, 0.0, terms).sum(-1)


def enumerated_traces(model, guide, batch):
    """The guide traced with ``y`` enumerated at dim −2, and the model replayed on it."""
    guide_trace = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def scanvi_cell_terms(model, guide, batch) -> tuple[dict, dict]:
    """Per-cell terms ``({"x": reconstruction}, {"z2": …, "y": …[, "library": …]})``, each ``(n,)``,
    unweighted by the KL warm-up (see the module docstring)."""
    model_trace, guide_trace = enumerated_traces(model, guide, batch)
    p, q = model_trace.nodes, guide_trace.nodes
    probs = q[Y]["fn"].probs  # (n, L)
    weights = probs.transpose(-1, -2)  # (L, n): label k of cell n, as the enumerated sites
    log_likelihood = p[X]["fn"].log_prob(p[X]["value"])  # (n,)
    log_q_z1 = q[Z]["fn"].log_prob(q[Z]["value"])  # (n,)
    log_p_z1 = p[Z]["fn"].log_prob(q[Z]["value"])  # (L, n)
    reconstruction = -log_likelihood + log_q_z1 - (weights * log_p_z1).sum(0)
    kl = {
        Z2: (weights * kl_divergence(q[Z2]["fn"], p[Z2]["fn"])).sum(0),  # (L, n) → (n,)
        Y: categorical_kl(q[Y]["fn"], p[Y]["fn"]),  # (n,)
    }
    if LIBRARY in q:
        kl[LIBRARY] = kl_divergence(q[LIBRARY]["fn"], p[LIBRARY]["fn"])  # (n,)
    return {X: reconstruction}, kl


class SemiSupervisedELBO(ELBO):
    """scANVI's loss for ``pyro.infer.SVI`` (see the module docstring), with the interface of
    :class:`~pyro_scvi.infer.elbo.CellMeanELBO` that the training loop reads: ``kl_weights[Z]`` is
    the warm-up weight, ``last_*`` the detached per-cell terms of the last call, and
    ``last_metrics`` the classifier's cross-entropy and accuracy on the labelled minibatch (empty
    without one)."""

    def __init__(self, module, classification_ratio: float = 50.0) -> None:
        super().__init__(num_particles=1)
        self.module, self.classification_ratio = module, float(classification_ratio)
        self.kl_weights: dict[str, float] = {}
        self.last_reconstruction: dict[str, torch.Tensor] = {}
        self.last_kl: dict[str, torch.Tensor] = {}
        self.last_kl_global = 0.0
        self.last_bound = None
        self.last_metrics: dict[str, torch.Tensor] = {}

    def _get_trace(self, model, guide, args, kwargs):
        return enumerated_traces(model, guide, *args)

    def differentiable_loss(self, model, guide, batch, *args, **kwargs) -> torch.Tensor:
        reconstruction, kl = scanvi_cell_terms(model, guide, batch)
        kl_weight = self.kl_weights.get(Z, 1.0)
        loss = (reconstruction[X] + kl_weight * sum(kl.values())).mean()
        self.last_reconstruction = {k: v.detach() for k, v in reconstruction.items()}
        self.last_kl = {k: v.detach() for k, v in kl.items()}
        self.last_metrics = {}
        labelled = getattr(batch, "labelled", None)
        if labelled is not None and labelled.n_cells:
            cross_entropy, accuracy = self.module.classification_loss(labelled, with_accuracy=True)
            loss = loss + self.classification_ratio * cross_entropy
            # micro F1 equals accuracy for single-label classes (scvi-tools logs both)
            self.last_metrics = {"classification_loss": cross_entropy.detach(), "accuracy": accuracy,
                                 "f1_score": accuracy}
        return loss

    def loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> torch.Tensor:
        value = self.differentiable_loss(model, guide, *args, **kwargs)
        if value.requires_grad:
            value.backward()
        return value.detach()


def _label_summed_log_weights(model, guide, batch: Minibatch, n_samples: int) -> torch.Tensor:
    """``(K, n)`` log weights of :func:`scanvi_log_importance_weights` for ``K = n_samples`` draws of z1
    (a ``"particles"`` plate at dim −2; ``y`` enumerated at dim −3, one z2 draw per (label, z1))."""
    with plate(PARTICLES, n_samples, dim=-2):
        guide_trace = poutine.trace(poutine.enum(guide, first_available_dim=-3)).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    p, q = prune_subsample_sites(model_trace).nodes, prune_subsample_sites(guide_trace).nodes
    log_weight = p[X]["fn"].log_prob(p[X]["value"]) - q[Z]["fn"].log_prob(q[Z]["value"])  # (K, n)
    if LIBRARY in q:
        log_weight = log_weight + p[LIBRARY]["fn"].log_prob(q[LIBRARY]["value"]) - q[LIBRARY]["fn"].log_prob(
            q[LIBRARY]["value"])
    z2 = q[Z2]["value"]  # (L, K, n, d)
    per_label = (p[Y]["fn"].log_prob(q[Y]["value"]) + p[Z2]["fn"].log_prob(z2)
                 + p[Z]["fn"].log_prob(q[Z]["value"]) - q[Z2]["fn"].log_prob(z2))  # (L, K, n)
    return (log_weight + torch.logsumexp(per_label, dim=0)).expand(n_samples, batch.n_cells)


def scanvi_log_importance_weights(model, guide, batch: Minibatch, n_samples: int = 1000,
                                  samples_per_pass: int | None = None) -> torch.Tensor:
    """Log importance weights ``(K, n)`` of scANVI's marginal likelihood, the label summed out exactly::

        log w_k = log p(x | z1_k, l) − log q(z1_k | x) [+ log p(l_k) − log q(l_k | x)]
                + log Σ_y p(y) p(z1_k | z2_ky, y) p(z2_ky) / q(z2_ky | z1_k, y)

    with z1_k ~ q(z1 | x) and, for every label y, one z2_ky ~ q(z2 | z1_k, y). The inner sum is an
    unbiased estimate of p(z1_k) = Σ_y p(y) ∫ p(z1_k | z2, y) p(z2) dz2, so ``E[w_k] = p(x)`` and
    ``logsumexp_k log w_k − log K`` is the usual consistent (and, as K grows, tightening) lower
    estimate of log p(x). q(y | z1) is not needed: y is integrated by the sum, not sampled.
    Drawn in passes of ``samples_per_pass`` (default: as many as keep one count tensor
    ``K × n × G`` under 2²¹ elements).
    """
    if n_samples < 1:
        raise ValueError(f"n_mc_samples must be ≥ 1, got {n_samples}.")
    if samples_per_pass is None:
        width = batch.x.shape[-1] if batch.x is not None else 1
        samples_per_pass = max(1, MAX_PASS_ELEMENTS // max(1, batch.n_cells * width))
    samples_per_pass = min(samples_per_pass, n_samples)
    chunks = [_label_summed_log_weights(model, guide, batch, min(samples_per_pass, n_samples - start))
              for start in range(0, n_samples, samples_per_pass)]
    return torch.cat(chunks, dim=0)
