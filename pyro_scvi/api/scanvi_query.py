"""scArches reference mapping for scANVI: where a scANVI query differs from scVI's.

:meth:`~pyro_scvi.api.reference_mapping.ReferenceMappingMixin.load_query_data` does the work; a
scANVI query changes two of its steps.

* **Registration** (:func:`register_scanvi_query`). Batches and other categorical covariates are
  extended with the query's new categories, labels are not: a query label the reference does not
  know is refused, and a query without the labels column gets one filled with the unlabeled
  category (a warning says so). The label mapping, with the unlabeled category last, is the
  reference's, so the classifier's outputs keep their meaning. The number of modelled labels is
  the reference's whatever labels the query holds (scvi-tools adds a class for a fully labelled
  query that lacks one of the reference's; we do not).
* **Freezing** (:func:`scanvi_query_freeze`), scvi-tools' rules for scANVI's three networks on top
  of scVI's (:func:`~pyro_scvi.api.reference_mapping.query_freeze_masks`):

  ============================  =================================================================
  ``z2_encoder`` q(z2 | z1, y)  frozen; BatchNorm affine trains iff ``freeze_batchnorm_encoder``
                                is False; running statistics frozen iff it is True
  ``z1_decoder`` p(z1 | z2, y)  frozen; BatchNorm affine trains iff ``freeze_batchnorm_decoder``
                                is False (the default); running statistics frozen iff it is True
  ``classifier`` q(y | z1)      ``freeze_classifier=True``: Linear layers frozen, its BatchNorm
                                affine parameters and running statistics train (as in
                                scvi-tools, whose hooks miss them); ``False``: everything trains
  ``y_prior``                   a buffer, never trained
  ============================  =================================================================

  Frozen entries stay bitwise equal through query training (weight decay included), which is
  stricter than scvi-tools, where gradient-hooked weights still feel Adam's weight decay.
"""

from __future__ import annotations

import dataclasses
import warnings

import anndata
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data.manager import AnnDataManager
from ..data.registry import Registry, setup_registry
from .reference_mapping import _batch_categories_missing, _freeze_query_module

__all__ = ["register_scanvi_query", "scanvi_query_freeze"]

_CLASSIFIER, _Z2_ENCODER, _Z1_DECODER = "classifier.", "z2_encoder.", "z1_decoder."


def _fill_or_check_labels(adata: anndata.AnnData, key: str, mapping: np.ndarray, unlabeled) -> None:
    """Create ``obs[key]`` filled with ``unlabeled`` when absent; refuse labels outside ``mapping``."""
    if key not in adata.obs:
        warnings.warn(f"Missing labels key {key}. Filling in with unlabeled category {unlabeled}.",
                      UserWarning, stacklevel=5)
        adata.obs[key] = pd.Categorical([unlabeled] * adata.n_obs, categories=list(mapping))
        return
    values = adata.obs[key]
    if values.isna().any():
        raise ValueError(f"adata.obs[{key!r}] has missing values; give those query cells the unlabeled "
                         f"category {unlabeled!r}.")
    unknown = sorted(set(pd.unique(values)) - set(mapping.tolist()), key=str)
    if unknown:
        raise ValueError(
            f"Query labels {unknown} in adata.obs[{key!r}] are not cell types of the reference "
            f"({list(mapping[:-1])}); a query cannot add cell types. Set those cells to the unlabeled "
            f"category {unlabeled!r}, or train a reference that has them.")


def register_scanvi_query(cls, adata: anndata.AnnData, registry, transfer_batch: bool) -> None:
    """Register the query ``adata`` with the reference ``registry`` (see the module docstring)."""
    registry = Registry.coerce(registry)
    labels = registry.field("labels")
    mapping = np.asarray(labels.categories, dtype=object)
    unlabeled = labels.state.get("unlabeled_category", mapping[-1])
    if not transfer_batch:
        unknown = _batch_categories_missing(adata, registry)
        if unknown:
            raise ValueError("transfer_batch=False but the query has batch categories unknown to the "
                             f"reference: {unknown}.")
    _fill_or_check_labels(adata, labels.original_key, mapping, unlabeled)
    query = setup_registry(adata, source_registry=registry, extend_categories=True, model_name=cls.__name__)
    fields = dict(query.fields)
    fields["labels"] = dataclasses.replace(fields["labels"],
                                           state=dict(fields["labels"].state, unlabeled_category=unlabeled))
    setup_args = dict(query.setup_args, unlabeled_category=unlabeled)
    cls.register_manager(AnnDataManager(adata, dataclasses.replace(query, fields=fields,
                                                                   setup_args=setup_args)))


def _batch_norms(module: nn.Module, prefix: str) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(name, sub) for name, sub in module.named_modules()
            if name.startswith(prefix) and isinstance(sub, nn.modules.batchnorm._BatchNorm)]


def scanvi_query_freeze(module: nn.Module, init: dict, freeze_dropout: bool, freeze_classifier: bool = True,
                        **freeze: bool) -> None:
    """Set ``module.frozen_parameters`` and the BatchNorm momenta of a scANVI query module (see the
    module docstring); ``freeze`` holds scVI's flags (``freeze_expression``, ...)."""
    _freeze_query_module(module, init, False, freeze_dropout, **freeze)
    masks = dict(module.frozen_parameters)
    for name, parameter in module.named_parameters():  # the label columns are no covariate to adapt
        if name.startswith((_CLASSIFIER, _Z2_ENCODER, _Z1_DECODER)):
            masks[name] = torch.ones_like(parameter, dtype=torch.bool)
    trainable_bn = {_Z2_ENCODER: not freeze["freeze_batchnorm_encoder"],
                    _Z1_DECODER: not freeze["freeze_batchnorm_decoder"],
                    _CLASSIFIER: True}
    for prefix, affine_trains in trainable_bn.items():
        for name, norm in _batch_norms(module, prefix):
            if affine_trains:
                masks.pop(f"{name}.weight", None)
                masks.pop(f"{name}.bias", None)
            if prefix != _CLASSIFIER and not affine_trains:
                norm.momentum = 0.0  # running statistics frozen with the affine parameters
    if not freeze_classifier:
        masks = {name: mask for name, mask in masks.items() if not name.startswith(_CLASSIFIER)}
    module.frozen_parameters = masks
