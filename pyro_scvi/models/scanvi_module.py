"""``SCANVIModule``: scVI's networks plus the three of scANVI, bound to scANVI's model and guide.

Added to :class:`~pyro_scvi.models.module.SCVIModule` (built after its networks, so every scVI
weight keeps its name and a trained scVI state dict loads with ``strict=False``):

* ``classifier``: q(y | z1), z1 (…, n, d) → logits (…, n, L); one hidden block or, with
  ``linear_classifier=True``, a single ``Linear(d, L)``
* ``z2_encoder``: q(z2 | z1, y), z1 (…, n, d) and y → loc, scale (…, n, d)
* ``z1_decoder``: p(z1 | z2, y), z2 (…, n, d) and y → loc, scale (…, n, d)

In both z2 networks one-hot y is appended to the input of *every* hidden layer (scvi-tools injects
its ``n_cat_list=[L]`` covariate deeply), so the first layer is ``(H, d + L)`` and deeper ones
``(H, H + L)``; with ``L = 1`` no label column is added (``(H, d)``, ``(H, H)``), as in scvi-tools.
* buffer ``y_prior`` (1, L): the fixed label proportions of p(y) (saved, never trained)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..guides.scanvi import scanvi_guide
from .module import SCVIModule
from .networks import FCLayers, GaussianEncoder
from .scanvi import scanvi_model

__all__ = ["SCANVIModule", "LabelClassifier"]


class LabelClassifier(nn.Module):
    """Logits of the ``n_labels`` classes from z1 (…, n, d) → (…, n, L).

    ``softmax=True`` is the classifier of scANVI files from scvi-tools < 1.1, which ended in a
    softmax: its layers' output is read as probabilities, and the logits returned are their log
    (``log_softmax`` of the last layer, the same categorical distribution).
    """

    def __init__(self, n_latent: int, n_labels: int, n_hidden: int = 128, n_layers: int = 1,
                 dropout_rate: float = 0.1, use_batch_norm: bool = True, use_layer_norm: bool = False,
                 linear: bool = False, softmax: bool = False) -> None:
        super().__init__()
        self.softmax = softmax
        if linear:
            self.hidden = None
            self.logits = nn.Linear(n_latent, n_labels)
        else:
            self.hidden = FCLayers(n_latent, n_hidden, None, n_layers, n_hidden, dropout_rate,
                                   use_batch_norm, use_layer_norm)
            self.logits = nn.Linear(n_hidden, n_labels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.logits(z if self.hidden is None else self.hidden(z))
        return torch.log_softmax(logits, dim=-1) if self.softmax else logits


_CLASSIFIER_OPTIONS = ("n_hidden", "n_layers", "dropout_rate", "use_batch_norm", "use_layer_norm", "logits")


def _classifier_options(given: dict | None, linear: bool, defaults: dict) -> dict:
    """The classifier's widths and norms: the model's (encoder side), overridden by
    ``classifier_parameters`` (scvi-tools' argument; ``logits=False`` means the last layer's output is
    read as probabilities)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(_CLASSIFIER_OPTIONS))
    if unknown:
        raise ValueError(f"classifier_parameters {unknown} are not supported; accepted: "
                         f"{list(_CLASSIFIER_OPTIONS)}.")
    if linear and any(k in given for k in ("n_hidden", "n_layers", "dropout_rate")):
        raise ValueError("linear_classifier=True has no hidden layer: drop n_hidden, n_layers and "
                         "dropout_rate from classifier_parameters, or set linear_classifier=False.")
    if int(given.get("n_layers", 1)) < 1 and not linear:
        raise ValueError("classifier_parameters n_layers must be at least 1 (or use linear_classifier=True).")
    return {**defaults, "logits": True, **given}


class SCANVIModule(SCVIModule):
    """The networks of scANVI for ``L = n_labels`` modelled cell types (see the module docstring).

    ``y_prior``: label proportions ``(L,)`` or ``(1, L)`` (normalised here); ``None`` is uniform.
    ``classifier_softmax``: the classifier of an scvi-tools < 1.1 file (see :class:`LabelClassifier`).
    ``classifier_parameters``: overrides of the classifier's ``n_hidden``, ``n_layers``,
    ``dropout_rate``, ``use_batch_norm``, ``use_layer_norm`` and ``logits`` (scvi-tools' argument).
    ``labels_groups`` is accepted and unused, as in scvi-tools 1.5; ``use_labels_groups=True`` is refused.
    The other arguments are :class:`SCVIModule`'s; ``n_labels`` also sizes ``gene-label`` dispersion.
    """

    def __init__(self, n_input: int, n_labels: int, *, linear_classifier: bool = False, y_prior=None,
                 classifier_softmax: bool = False, classifier_parameters: dict | None = None,
                 labels_groups=None, use_labels_groups: bool = False, **kwargs) -> None:
        if use_labels_groups:
            raise ValueError("use_labels_groups=True (scvi-tools' grouped classifier) is not supported: "
                             "scvi-tools 1.5 removed it, its group probabilities were wrongly normalised "
                             "(scvi-tools issue 3804). Use the default use_labels_groups=False.")
        if n_labels < 1:
            raise ValueError("scANVI needs at least one labelled cell type; every cell has the "
                             "unlabeled category. Label some cells in adata.obs[labels_key].")
        if kwargs.get("dispersion_prior") is not None or kwargs.get("guide", "normal") != "normal":
            raise ValueError("SCANVI supports neither dispersion_prior nor guide other than 'normal'.")
        super().__init__(n_input, n_labels=n_labels, **kwargs)
        self.n_labels = n_labels  # L, also when 1
        n_hidden, n_layers = kwargs.get("n_hidden", 128), kwargs.get("n_layers", 1)
        dropout = kwargs.get("dropout_rate", 0.1)
        bn, ln = kwargs.get("use_batch_norm", "both"), kwargs.get("use_layer_norm", "none")
        bn_enc, bn_dec = bn in ("encoder", "both"), bn in ("decoder", "both")
        ln_enc, ln_dec = ln in ("encoder", "both"), ln in ("decoder", "both")
        self.linear_classifier = linear_classifier
        options = _classifier_options(classifier_parameters, linear_classifier,
                                      dict(n_hidden=n_hidden, n_layers=n_layers, dropout_rate=dropout,
                                           use_batch_norm=bn_enc, use_layer_norm=ln_enc))
        softmax = not options.pop("logits") or classifier_softmax
        self.classifier = LabelClassifier(self.n_latent, n_labels, **options, linear=linear_classifier,
                                          softmax=softmax)
        d, labels = self.n_latent, [n_labels]  # a one-category covariate adds no column
        self.z2_encoder = GaussianEncoder(d, d, labels, n_layers, n_hidden, dropout, bn_enc, ln_enc,
                                          inject_covariates=True)
        self.z1_decoder = GaussianEncoder(d, d, labels, n_layers, n_hidden, 0.0, bn_dec, ln_dec,
                                          inject_covariates=True, var_eps=0.0)
        probs = torch.ones(n_labels) if y_prior is None else torch.as_tensor(y_prior, dtype=torch.float32)
        if probs.numel() != n_labels or bool((probs < 0).any()) or not bool(probs.sum() > 0):
            raise ValueError(f"y_prior must hold {n_labels} non-negative proportions, got shape "
                             f"{tuple(probs.shape)}.")
        self.register_buffer("y_prior", (probs / probs.sum()).reshape(1, n_labels))

    def model(self, batch, transform_batch: int | None = None):
        """p(x, z1, z2, y, l) (see :func:`pyro_scvi.models.scanvi.scanvi_model`)."""
        return scanvi_model(self, batch, transform_batch=transform_batch)

    def guide(self, batch, transform_batch: int | None = None):
        """q(z1, y, z2, l | x) (see :func:`pyro_scvi.guides.scanvi.scanvi_guide`)."""
        return scanvi_guide(self, batch, transform_batch=transform_batch)

    @property
    def has_custom_model(self) -> bool:
        return False

    @property
    def has_custom_guide(self) -> bool:
        return False

    def classify(self, z1: torch.Tensor) -> torch.Tensor:
        """q(y | z1): class probabilities (…, n, L)."""
        return torch.softmax(self.classifier(z1), dim=-1)

    def _with_label(self, network: GaussianEncoder, z: torch.Tensor, y: torch.Tensor):
        """``network`` at z (…, n, d) with one-hot y injected in every layer; y (n,) or (S, n)
        sampled, or (L, 1[, 1]) enumerated. Returns loc, scale (…, n, d) broadcast over both."""
        one_hot = F.one_hot(y.long(), self.n_labels).to(z.dtype)  # (…, L)
        shape = torch.broadcast_shapes(z.shape[:-1], one_hot.shape[:-1])
        labels = one_hot.expand(*shape, -1) if self.n_labels > 1 else None
        return network(z.expand(*shape, -1), one_hot=labels)

    def z2_posterior(self, z1: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """loc, scale of q(z2 | z1, y) (see :meth:`_with_label` for the shapes)."""
        return self._with_label(self.z2_encoder, z1, y)

    def z1_prior(self, z2: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """loc, scale of p(z1 | z2, y) (see :meth:`_with_label` for the shapes)."""
        return self._with_label(self.z1_decoder, z2, y)

    def classification_loss(self, labelled, with_accuracy: bool = False):
        """Mean cross-entropy of the classifier at the encoder mean on a minibatch of labelled cells
        (codes < L), scvi-tools' ``classification_loss``; with ``with_accuracy`` also the detached
        fraction classified right."""
        encoder_input, covariates = self.encoder_input(labelled)
        loc, _ = self.z_encoder(encoder_input, *covariates)  # (m, d)
        logits = self.classifier(loc)  # (m, L)
        codes = labelled.labels.reshape(-1).long()  # (m,)
        # a softmax classifier (scvi-tools < 1.1) was trained with the cross-entropy taken on its
        # probabilities as if they were logits; further training keeps that objective
        cross_entropy = F.cross_entropy(logits.exp() if self.classifier.softmax else logits, codes)
        if not with_accuracy:
            return cross_entropy
        return cross_entropy, (logits.argmax(-1) == codes).float().mean().detach()
