"""``SCANVI``: semi-supervised cell annotation (Xu et al. 2021) with scvi-tools' ``SCANVI`` API.

The same composition as :class:`~pyro_scvi.api.scvi.SCVI` over
:class:`~pyro_scvi.api.base.BaseModel`; what is scANVI's own is here: the label coding of
``setup_anndata`` (the unlabeled category always takes the last code), the module
(:class:`~pyro_scvi.models.scanvi_module.SCANVIModule`), ``from_scvi_model``, the semi-supervised
training data (a labelled minibatch beside every minibatch) with its objective, and ``predict``.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import anndata
import numpy as np
import pandas as pd
import torch

from ..data.loader import check_training_minibatches, minibatch_from_dict, split_indices
from ..data.manager import AnnDataManager
from ..data.registry import setup_registry
from ..infer.distributed import _count_devices
from ..infer.scanvi import (
    SemiSupervisedBatch,
    SemiSupervisedELBO,
    labelled_part,
    scanvi_cell_terms,
    scanvi_log_importance_weights,
)
from ..infer.training import max_epochs_heuristic
from ..models.scanvi import Z2, Y
from ..models.scanvi_module import SCANVIModule
from ..models.sites import Z
from ..settings import settings
from .base import BaseModel
from .criticism import CriticismMixin
from .differential import DifferentialExpressionMixin
from .evaluation import EvaluationMixin
from .minify import MinificationMixin
from .queries import QueriesMixin
from .reference_mapping import ReferenceMappingMixin
from .saving import SavingMixin
from .scanvi_query import register_scanvi_query, scanvi_query_freeze
from .scvi import _MODULE_KWARGS as _SCVI_MODULE_KWARGS
from .scvi import module_data_arguments
from .training import TrainingData, TrainingMixin, epochs_of

__all__ = ["SCANVI"]

_LABELS_COLUMN = "_scvi_labels"
#: extra constructor arguments: scANVI's label prior and scVI's module options (one z1 guide family)
_MODULE_KWARGS = ("y_prior", "latent_distribution", "classifier_softmax", "classifier_parameters",
                  "labels_groups", "use_labels_groups") + tuple(
    name for name in _SCVI_MODULE_KWARGS
    if name not in ("z_prior", "n_prior_components", "dispersion_prior", "guide", "n_flows"))
#: scVI options scANVI replaces, with the scVI values from_scvi_model can start from
_SCVI_ONLY = {"z_prior": "normal", "n_prior_components": 10, "dispersion_prior": None, "guide": "normal",
              "n_flows": 2}


def label_mapping(values: pd.Series, unlabeled_category) -> np.ndarray:
    """scvi-tools' label categories: the column's own order (categorical) or sorted values, then the
    unlabeled category swapped into (or appended at) the last position."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        categories = list(values.cat.categories)
    else:
        categories = sorted(pd.unique(values))
    if unlabeled_category in set(values):
        i = categories.index(unlabeled_category)
        categories[i], categories[-1] = categories[-1], categories[i]
    elif unlabeled_category not in categories:
        categories.append(unlabeled_category)
    return np.asarray(categories, dtype=object)


class SCANVI(
    TrainingMixin, QueriesMixin, EvaluationMixin, SavingMixin, ReferenceMappingMixin, MinificationMixin,
    DifferentialExpressionMixin, CriticismMixin, BaseModel,
):
    """single-cell ANnotation using Variational Inference with scvi-tools' ``SCANVI`` interface.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        A saved registry to build the model without data (used by :meth:`load`).
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood, use_observed_lib_size
        As in :class:`~pyro_scvi.SCVI`.
    linear_classifier
        q(y | z1) as one linear layer instead of one hidden block.
    n_labels
        ``L``, the number of modelled classes; by default derived from the labels as scvi-tools does
        (:meth:`load` passes the saved one).
    **kwargs
        ``y_prior`` (label proportions, default uniform), ``latent_distribution`` and SCVI's extra
        module arguments (``log_variational``, ``encode_covariates``, ``use_batch_norm``, ``z_prior``
        is not used: p(z1) is scANVI's hierarchy); no ``dispersion_prior`` or other guide family;
        ``classifier_softmax`` for the classifier of scvi-tools < 1.1 files.
    """

    _module_cls = SCANVIModule
    _scvi_tools_module_name = "SCANVIModule"
    _scvi_tools_attrs = ("unlabeled_category_", "labels_")
    _sizes_from_state_dict = {"n_labels": ("y_prior", 1)}
    _summary_params = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion",
                       "gene_likelihood")

    def __init__(
        self,
        adata: anndata.AnnData | None = None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        use_observed_lib_size: bool = True,
        linear_classifier: bool = False,
        model_fn=None,
        guide_fn=None,
        n_labels: int | None = None,
        **kwargs,
    ) -> None:
        if model_fn is not None or guide_fn is not None:
            raise ValueError("SCANVI has its own model and guide; model_fn/guide_fn are not supported.")
        unknown = sorted(set(kwargs) - set(_MODULE_KWARGS))
        if unknown:
            raise TypeError(f"SCANVI got unexpected keyword argument(s) {unknown}; accepted extra arguments: "
                            f"{list(_MODULE_KWARGS)}.")
        self._init_state(adata, registry)
        self._set_labels()
        if n_labels is not None:
            self.n_labels = int(n_labels)
        params = dict(n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
                      dispersion=dispersion, gene_likelihood=gene_likelihood,
                      use_observed_lib_size=use_observed_lib_size, linear_classifier=linear_classifier)
        self.init_params_ = {"non_kwargs": params, "kwargs": {"kwargs": dict(kwargs)}}
        arguments = module_data_arguments(self.registry_, self.adata, use_observed_lib_size)
        arguments["n_labels"] = self.n_labels
        self.module = SCANVIModule(**arguments, **params, **kwargs)
        self.module.n_train_cells = self.registry_.n_cells
        self.was_pretrained = False

    def _set_labels(self) -> None:
        """``unlabeled_category_``, ``labels_`` (raw values), the mapping and ``n_labels`` (``L``)."""
        field = self.registry_.field("labels")
        self._label_mapping = np.asarray(field.categories, dtype=object)
        self.unlabeled_category_ = field.state.get("unlabeled_category", self._label_mapping[-1])
        self._code_to_label = dict(enumerate(self._label_mapping))
        # L: every category but the unlabeled one, which is always last (scvi-tools sometimes models
        # it as a class too, when the data are fully labelled and lack a category; we never do)
        self.n_labels = len(self._label_mapping) - 1
        if self.adata is not None:
            self.labels_ = np.asarray(self.adata.obs[field.original_key])
        else:
            self.labels_ = self._label_mapping[:-1]
        self._labeled_indices = np.flatnonzero(self.labels_ != self.unlabeled_category_)
        self._unlabeled_indices = np.flatnonzero(self.labels_ == self.unlabeled_category_)

    @classmethod
    def setup_anndata(cls, adata: anndata.AnnData, labels_key: str, unlabeled_category,
                      layer: str | None = None, batch_key: str | None = None,
                      size_factor_key: str | None = None,
                      categorical_covariate_keys: list[str] | None = None,
                      continuous_covariate_keys: list[str] | None = None, **kwargs) -> None:
        """Register ``adata`` as :meth:`SCVI.setup_anndata` does, with ``obs[labels_key]`` coded so that
        ``unlabeled_category`` (cells without a label) is the last code."""
        if kwargs:
            raise TypeError(f"setup_anndata got unexpected keyword argument(s) {sorted(kwargs)}.")
        if labels_key is None or labels_key not in adata.obs:
            raise ValueError(f"labels_key={labels_key!r} is not a column of adata.obs; SCANVI needs the "
                             "cell labels there, with unlabeled_category for cells without one.")
        values = adata.obs[labels_key]
        if values.isna().any():
            raise ValueError(f"adata.obs[{labels_key!r}] has missing values; give those cells the "
                             f"unlabeled category {unlabeled_category!r} instead.")
        mapping = label_mapping(values, unlabeled_category)
        registry = setup_registry(adata, layer=layer, batch_key=batch_key, labels_key=labels_key,
                                  size_factor_key=size_factor_key,
                                  categorical_covariate_keys=categorical_covariate_keys,
                                  continuous_covariate_keys=continuous_covariate_keys,
                                  model_name=cls.__name__)
        adata.obs[_LABELS_COLUMN] = pd.Categorical(values, categories=mapping).codes.astype(np.int64)
        labels = registry.fields["labels"]
        state = dict(labels.state, categorical_mapping=mapping, unlabeled_category=unlabeled_category)
        fields = dict(registry.fields)
        fields["labels"] = dataclasses.replace(labels, state=state, summary_stats={"n_labels": len(mapping)})
        setup_args = dict(registry.setup_args, unlabeled_category=unlabeled_category)
        cls.register_manager(AnnDataManager(adata, dataclasses.replace(registry, fields=fields,
                                                                       setup_args=setup_args)))

    @classmethod
    def from_scvi_model(cls, scvi_model, unlabeled_category, labels_key: str | None = None,
                        adata: anndata.AnnData | None = None, **kwargs) -> "SCANVI":
        """A scANVI model that starts from a trained scVI model: its encoders, decoder and dispersion
        are copied; the classifier and the z2 networks start fresh. Arguments the scVI model already
        fixed (``n_latent``, ...) are ignored with a warning."""
        if not scvi_model.is_trained_:
            warnings.warn("Passed in scvi model hasn't been trained yet.", UserWarning, stacklevel=2)
        if scvi_model.minified_data_type == "latent_posterior_parameters":
            raise ValueError("We cannot use the given scVI model to initialize scANVI because it has "
                             "minified adata. Keep counts when minifying model using "
                             "minified_data_type='latent_posterior_parameters_with_counts'.")
        init = dict(scvi_model.init_params_["non_kwargs"])
        init.update(scvi_model.init_params_.get("kwargs", {}).get("kwargs", {}))
        for name in sorted(set(kwargs) & set(init)):
            warnings.warn(f"Ignoring param '{name}' as it was already passed in to pretrained SCVI model "
                          f"with value {init[name]}.", UserWarning, stacklevel=2)
            kwargs.pop(name)
        for name, usable in _SCVI_ONLY.items():
            value = init.pop(name, usable)
            if value != usable and name != "n_prior_components":
                raise ValueError(f"The scVI model was built with {name}={value!r}, "
                                 f"which scANVI lacks; use an scVI model with {name}={usable!r}.")
        setup_args = dict(scvi_model.registry_.setup_args)
        if setup_args.get("labels_key") is None:
            if labels_key is None:
                raise ValueError("A `labels_key` is necessary as the scVI model was initialized "
                                 "without one.")
            setup_args["labels_key"] = labels_key
        adata = scvi_model.adata if adata is None else adata
        if adata is None:
            raise ValueError("The scVI model has no AnnData: pass adata= (with the labels column).")
        keys = ("labels_key", "layer", "batch_key", "size_factor_key", "categorical_covariate_keys",
                "continuous_covariate_keys")
        cls.setup_anndata(adata, unlabeled_category=unlabeled_category,
                          **{k: setup_args.get(k) for k in keys})
        model = cls(adata, **init, **kwargs)
        model.module.load_state_dict(scvi_model.module.state_dict(), strict=False)  # copies the values
        model.was_pretrained = True
        return model

    def train(self, max_epochs: int | None = None, n_samples_per_label: int | None = None,
              check_val_every_n_epoch: int | None = None, train_size: float | None = 0.9,
              validation_size: float | None = None, shuffle_set_split: bool = True, batch_size: int = 128,
              accelerator: str = "auto", devices="auto", datasplitter_kwargs: dict | None = None,
              plan_kwargs: dict | None = None, datamodule=None, **trainer_kwargs) -> None:
        """Train on every cell's ELBO with the label summed out plus ``classification_ratio`` (in
        ``plan_kwargs``, default 50) × the classifier's cross-entropy on a labelled minibatch drawn
        beside each minibatch (at most ``n_samples_per_label`` cells per label and epoch). Other
        arguments as :meth:`SCVI.train`; history adds ``train_classification_loss`` and
        ``train_accuracy`` (``validation_*`` with validation).

        ``datamodule``: its loaders may yield scvi-tools' ``[full, labelled]`` pairs of tensor dicts
        (the labelled dict feeds the classification term), or single dicts, whose cells with a label
        (codes below ``L``, at least two) then form the labelled minibatch; dicts need ``"labels"``.
        No per-label subsampling there (``n_samples_per_label`` is ignored with a warning).
        Data-parallel training (``strategy="ddp"``, ``devices > 1``) is not available for scANVI."""
        strategy = trainer_kwargs.get("strategy")
        if strategy == "ddp" or (_count_devices(devices) or 1) > 1:
            raise ValueError(f"SCANVI does not train data-parallel (strategy={strategy!r}, "
                             f"devices={devices!r}): its labelled minibatch stream is not sharded across "
                             "processes. Train on one device (devices=1, strategy='auto').")
        if datamodule is not None and n_samples_per_label is not None:
            warnings.warn("SCANVI sampler is not available with custom dataloader: n_samples_per_label is "
                          "ignored with a datamodule.", UserWarning, stacklevel=2)
        if n_samples_per_label is not None and (isinstance(n_samples_per_label, bool)
                                                or not isinstance(n_samples_per_label, (int, np.integer))
                                                or n_samples_per_label < 1):
            raise ValueError("n_samples_per_label must be a positive integer or None, got "
                             f"{n_samples_per_label!r}.")
        plan_kwargs = dict(plan_kwargs or {})
        self._classification_ratio = float(plan_kwargs.pop("classification_ratio", 50.0))
        self._n_samples_per_label = n_samples_per_label
        if max_epochs is None and self.was_pretrained:
            max_epochs = int(min(10, max(2, round(max_epochs_heuristic(self.registry_.n_cells) / 3))))
        if check_val_every_n_epoch is not None:
            trainer_kwargs["check_val_every_n_epoch"] = check_val_every_n_epoch
        super().train(max_epochs=max_epochs, accelerator=accelerator, devices=devices, train_size=train_size,
                      validation_size=validation_size, shuffle_set_split=shuffle_set_split,
                      batch_size=batch_size, datasplitter_kwargs=datasplitter_kwargs, plan_kwargs=plan_kwargs,
                      datamodule=datamodule, **trainer_kwargs)

    def _training_objective(self, plan):
        return SemiSupervisedELBO(self.module, getattr(self, "_classification_ratio", 50.0))

    def _registered_training_data(self, train_size, validation_size, batch_size: int, shuffle_set_split: bool,
                                  drop_last: bool, external, sparse: bool, device, parallel) -> TrainingData:
        """Labelled and unlabelled cells split apart (same fractions, same seed, labelled first), and
        each minibatch paired with a minibatch of labelled training cells."""
        if parallel is not None:
            raise ValueError("SCANVI does not train data-parallel yet; use one device.")
        _, data = self.registered_data()
        if external is not None:
            split = [np.asarray(i, dtype=np.int64) for i in external]
        else:
            split = [[], [], []]
            for group in (self._labeled_indices, self._unlabeled_indices):
                parts = split_indices(len(group), train_size, validation_size, batch_size, shuffle_set_split,
                                      settings.seed, drop_last) if len(group) else ([], [], [])
                for i, part in enumerate(parts):
                    split[i] = np.concatenate([split[i], group[np.asarray(part, dtype=np.int64)]])
            split = [np.asarray(i, dtype=np.int64) for i in split]
        train_idx, val_idx, _ = split
        check_training_minibatches(self.module, len(train_idx), batch_size, drop_last)
        labelled = set(self._labeled_indices.tolist())

        def paired(indices, shuffle: bool, subsample: int | None):
            full = epochs_of(data, indices, batch_size, shuffle, shuffle and drop_last, device, sparse)
            lab = np.asarray([i for i in indices if i in labelled], dtype=np.int64)

            def epoch():
                chosen = self._labelled_subsample(lab, subsample)
                stream = list(epochs_of(data, chosen, batch_size, shuffle, False, device, sparse)())
                cycle = itertools.cycle(stream) if stream else itertools.repeat(None)
                for batch, labelled_batch in zip(full(), cycle):
                    yield SemiSupervisedBatch.of(batch, labelled_batch)
            return epoch

        train = paired(train_idx, True, self._n_samples_per_label)
        validation = paired(val_idx, False, None) if len(val_idx) else None
        return TrainingData(train, validation, tuple(split), data.n_obs)

    def _datamodule_training_data(self, datamodule, device) -> TrainingData:
        """A datamodule's minibatches with their labelled minibatch (see :meth:`train`)."""
        n_labels = self.n_labels

        def semi_supervised(item) -> SemiSupervisedBatch:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                full, labelled = (minibatch_from_dict(tensors, device) for tensors in item)
                return SemiSupervisedBatch.of(full, labelled)
            if not isinstance(item, dict) or "labels" not in item:
                found = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise ValueError("SCANVI trains its classifier on labelled cells: a datamodule must yield "
                                 "[full, labelled] pairs of tensor dicts or dicts with 'labels' (the codes "
                                 f"of the registered labels field); got {found}.")
            full = minibatch_from_dict(item, device)
            return SemiSupervisedBatch.of(full, labelled_part(full, n_labels))

        def stream(loader):
            return lambda: (semi_supervised(item) for item in loader())

        validation = getattr(datamodule, "val_dataloader", None)
        return TrainingData(stream(datamodule.train_dataloader),
                            None if validation is None else stream(validation), (None, None, None), None)

    def _labelled_subsample(self, indices: np.ndarray, n_per_label: int | None) -> np.ndarray:
        """At most ``n_per_label`` cells of each label among ``indices`` (all with ``None``)."""
        if n_per_label is None or len(indices) == 0:
            return indices
        values = self.labels_[indices]
        chosen = []
        for label in np.unique(values):
            group = indices[values == label]
            if len(group) > n_per_label:
                group = np.random.choice(group, n_per_label, replace=False)
            chosen.append(group)
        return np.sort(np.concatenate(chosen))

    @classmethod
    def _register_query_anndata(cls, adata, registry, transfer_batch: bool) -> None:
        register_scanvi_query(cls, adata, registry, transfer_batch)

    @classmethod
    def _build_query_model(cls, adata, init: dict, reference: dict, custom: dict):
        """The query model with the reference's number of labels (read from its ``y_prior``)."""
        return cls(adata, **init, **custom, n_labels=reference["state_dict"]["y_prior"].shape[1])

    @classmethod
    def _freeze_query(cls, module, init: dict, freeze_dropout: bool, freeze_classifier: bool,
                      **freeze) -> None:
        scanvi_query_freeze(module, init, freeze_dropout, freeze_classifier, **freeze)

    def _elbo_terms_per_cell(self, adata, indices, batch_size, dataloader, method: str):
        """scANVI's per-cell terms with the label summed out (every cell treated as unlabelled, no
        classification term): reconstruction includes the z1 terms, KL those of z2 and y, as in
        scvi-tools' ``get_elbo``/``get_reconstruction_error``."""
        self.check_not_minified(method, adata)
        self.module.eval()
        reconstruction, kl = [], []
        with self.pyro_scope(), torch.no_grad():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                rec, kls = scanvi_cell_terms(self.module.model, self.module.guide, batch)
                reconstruction.append(sum(rec.values()))
                kl.append(sum(kls.values()))
        return torch.cat(reconstruction), torch.cat(kl)

    def get_marginal_ll(self, adata=None, indices=None, n_mc_samples: int = 1000, batch_size=None,
                        return_mean: bool = True, dataloader=None, n_mc_samples_per_pass: int | None = None,
                        return_diagnostics: bool = False, proposal: str = "guide", **proposal_options):
        """Importance-sampling estimate of scANVI's marginal log-likelihood ``log p(x_n)`` (negative,
        higher is better), with the label summed out exactly (unlike scvi-tools, whose estimate
        treats scANVI as scVI with a N(0, I) prior on z1 and so is not one of scANVI)::

            log p̂(x) = logsumexp_k log w_k − log K,   z1_k ~ q(z1 | x),  z2_ky ~ q(z2 | z1_k, y)
            log w_k  = log p(x | z1_k, l) − log q(z1_k | x)
                     + log Σ_y p(y) p(z1_k | z2_ky, y) p(z2_ky) / q(z2_ky | z1_k, y)

        (plus ``log p(l_k) − log q(l_k | x)`` with a latent library). The sum over labels estimates
        p(z1_k) without bias, so ``E[w_k] = p(x)``; K = ``n_mc_samples``. The estimate is at least the
        ELBO of :meth:`get_elbo` on average and tightens as K grows (see
        :func:`pyro_scvi.infer.scanvi.scanvi_log_importance_weights`). Only ``proposal="guide"``.
        Returns and ``return_diagnostics`` as :meth:`SCVI.get_marginal_ll`; refused on minified
        data without counts."""
        return super().get_marginal_ll(adata, indices, n_mc_samples, batch_size, return_mean, dataloader,
                                       n_mc_samples_per_pass, return_diagnostics, proposal,
                                       **proposal_options)

    def _log_importance_weights(self, batch, n_mc_samples, n_mc_samples_per_pass, proposal, **options):
        if proposal != "guide" or options:
            raise ValueError(f"SCANVI.get_marginal_ll draws from its guide only (proposal='guide', no "
                             f"proposal options); got proposal={proposal!r}, options {sorted(options)}.")
        return scanvi_log_importance_weights(self.module.model, self.module.guide, batch, n_mc_samples,
                                             n_mc_samples_per_pass)

    def to_arviz(self, adata=None, indices=None, n_samples: int = 100, batch_size: int | None = None, *,
                 posterior_predictive: bool = True):
        """The variational posterior as an :class:`arviz.InferenceData`, as :meth:`SCVI.to_arviz`, with
        scANVI's latents in ``posterior`` (``S = n_samples`` joint draws per cell of
        z1 ~ q(z1 | x), y ~ q(y | z1), z2 ~ q(z2 | z1, y); y is *sampled* here, not enumerated):

        * ``z`` ``(chain, draw, cell, latent_dim)``: z1, the latent of :meth:`get_latent_representation`.
        * ``y`` ``(chain, draw, cell)`` int64: the drawn label code (``attrs["categories"]`` names
          them; code k is ``categories[k]``).
        * ``y_probs`` ``(chain, draw, cell, label)``: q(y | z1) at each draw of z1, the label
          coordinate holding the label names. This is the Rao–Blackwellised form of ``y``: its mean
          over draws estimates q(y | x) = E_q(z1|x) q(y | z1) with less noise than the frequencies of
          ``y``, and it propagates the uncertainty of z1 that :meth:`predict` (classifier at the
          encoder mean) leaves out.
        * ``z2`` ``(chain, draw, cell, latent_dim)``: z2 given the drawn label.

        ``log_likelihood`` is log p(x | z1, l) per cell (summed over genes) and ``posterior_predictive``
        draws x̃ ~ p(x | z1, l): the labels reach the counts only through z1. Needs the counts
        (refused on minified data without them).
        """
        idata = super().to_arviz(adata, indices, n_samples, batch_size,
                                 posterior_predictive=posterior_predictive)
        posterior = idata.posterior
        z2 = posterior[Z2]
        posterior[Z2] = (("chain", "draw", "cell", "latent_dim"), z2.values)
        posterior = posterior.drop_dims([d for d in z2.dims if d.startswith(f"{Z2}_dim")], errors="ignore")
        names = self._label_mapping[: self.n_labels].astype(str)
        posterior[Y] = (("chain", "draw", "cell"), posterior[Y].values.astype(np.int64),
                        {"categories": [str(name) for name in names]})
        self.module.eval()
        with torch.no_grad():
            z1 = torch.as_tensor(posterior[Z].values[0], device=self.device)  # (S, n, d)
            probs = self.module.classify(z1).cpu().numpy()[None]  # (1, S, n, L)
        posterior = posterior.assign_coords(label=names)
        posterior["y_probs"] = (("chain", "draw", "cell", "label"), probs)
        idata.posterior = posterior
        return idata

    @torch.no_grad()
    def predict(self, adata: anndata.AnnData | None = None, indices=None, soft: bool = False,
                batch_size: int | None = None):
        """The cell types the classifier gives at the encoder mean: label values ``(n,)``, or with
        ``soft=True`` a DataFrame of probabilities (cells × the ``L`` labels).

        On minified data without counts (``minify_adata("latent_posterior_parameters")``) the
        classifier reads the stored posterior mean (``obsm["scanvi_latent_qzm"]``), which is the
        encoder mean it would compute from the counts; scvi-tools cannot predict there (deviation)."""
        if adata is not None and self.registry_.field("labels").original_key not in adata.obs:
            key = self.registry_.field("labels").original_key
            raise KeyError(f"{key} not found in adata.obs.")
        if indices is not None and len(indices) == 0:
            return []
        probs = []
        for batch in self.minibatches(adata, indices, batch_size):
            if batch.latent_loc is not None:  # minified: the stored posterior mean
                loc = batch.latent_loc  # (n, d)
            else:
                encoder_input, covariates = self.module.encoder_input(batch)
                loc, _ = self.module.z_encoder(encoder_input, *covariates)  # (n, d)
            probs.append(self.module.classify(loc).cpu())  # (n, L)
        probs = torch.cat(probs).numpy()
        if not soft:
            return self._label_mapping[probs.argmax(-1)]
        columns = self._label_mapping[: self.n_labels]
        return pd.DataFrame(probs, columns=columns, index=self.cell_names(adata, indices))
