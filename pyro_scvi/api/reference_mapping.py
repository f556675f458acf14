"""Reference mapping in the style of scArches: reuse a trained reference model on query data.

Two pieces:

* :func:`prepare_query_anndata` / :func:`prepare_query_mudata` bring the genes of a query AnnData
  into the reference model's gene order (missing genes become all-zero columns, extra genes are
  dropped);
* :meth:`ReferenceMappingMixin.load_query_data` builds a model for the query from the reference:
  batch categories (and other categorical covariates) unseen by the reference are appended to its
  mappings, the
  weights are copied into the larger network ("weight surgery": reference values everywhere the
  reference had an entry, fresh initial values for the new categories), and every weight except
  the ones allowed to adapt to the new categories is frozen.

Freezing uses ``SCVIModule.frozen_parameters`` (parameter name → boolean mask, ``True`` = frozen):
after each optimiser step training writes the frozen entries back, so neither gradients nor
weight decay can move them.  BatchNorm running statistics are frozen by ``momentum = 0``.

``load_query_data`` runs in steps: read the reference (:func:`_read_reference`, a model or a
directory), align the query's genes, register the query with the reference setup (through
``cls.register_manager``), build the query model with the reference's constructor arguments,
transfer the weights (:func:`transfer_state_dict`) and freeze (:func:`query_freeze_masks`). The
weight-surgery and freezing functions take any ``nn.Module`` built from
:class:`~pyro_scvi.models.networks.FCLayers`, whatever the model class.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch import nn

from ..data.manager import AnnDataManager
from ..data.registry import Registry, setup_registry
from ..infer.device import resolve_device
from ..io import read_model_dir
from ..models.networks import FCLayers

__all__ = [
    "ReferenceMappingMixin",
    "prepare_query_anndata",
    "prepare_query_mudata",
    "query_freeze_masks",
    "transfer_state_dict",
]

_MIN_OVERLAP = 0.8
_ENCODER_PREFIXES = ("z_encoder.", "library_encoder.")
_DECODER_PREFIXES = ("decoder.",)


# --------------------------------------------------------------------------------------------
# Reading the reference
# --------------------------------------------------------------------------------------------


def _is_model(obj) -> bool:
    return hasattr(obj, "module") and hasattr(obj, "registry_") and hasattr(obj, "init_params_")


def _reference_var_names(reference_model) -> pd.Index:
    if _is_model(reference_model):
        names = reference_model.registry_.var_names
    elif isinstance(reference_model, (str, Path)):
        names = read_model_dir(reference_model, map_location="cpu")["var_names"]
    else:
        raise TypeError(
            "reference_model must be a trained model or the directory it was saved to, "
            f"got {type(reference_model).__name__}."
        )
    return pd.Index([str(v) for v in np.asarray(names, dtype=object)])


def _custom_functions(reference_model) -> dict:
    """The reference's ``model_fn``/``guide_fn`` (see docs/custom_models.md), for the query model."""
    if _is_model(reference_model):
        return {k: getattr(reference_model.module, k) for k in ("model_fn", "guide_fn")
                if getattr(reference_model.module, k, None) is not None}
    custom = read_model_dir(reference_model, map_location="cpu")["attr_dict"].get("custom_model_") or {}
    if custom.get("model_fn") or custom.get("guide_fn"):
        raise ValueError(
            "The reference was saved with custom model/guide functions: load it with "
            "SCVI.load(dir_path, model_fn=..., guide_fn=...) and pass the loaded model as reference_model."
        )
    return {}


def _read_reference(reference_model) -> dict[str, Any]:
    """``{"registry", "init_params", "state_dict", "var_names"}`` of a model instance or a saved directory."""
    if _is_model(reference_model):
        state = {k: v.detach().cpu().clone() for k, v in reference_model.module.state_dict().items()}
        return {
            "registry": reference_model.registry_,
            "init_params": reference_model.init_params_,
            "state_dict": state,
            "var_names": _reference_var_names(reference_model),
        }
    if isinstance(reference_model, (str, Path)):
        saved = read_model_dir(reference_model, map_location="cpu")
        return {
            "registry": saved["attr_dict"]["registry_"],
            "init_params": saved["attr_dict"]["init_params_"],
            "state_dict": dict(saved["model_state_dict"]),
            "var_names": pd.Index([str(v) for v in np.asarray(saved["var_names"], dtype=object)]),
        }
    raise TypeError(
        "reference_model must be a trained model or the directory it was saved to, "
            f"got {type(reference_model).__name__}."
    )


# --------------------------------------------------------------------------------------------
# Gene padding / ordering
# --------------------------------------------------------------------------------------------


def _pad_matrix(matrix, take: np.ndarray, present: np.ndarray):
    """Columns ``take`` (query positions, −1 for absent) of ``matrix``; absent columns are zeros.

    Sparse input comes back as CSR, dense input as a dense array of the same dtype.
    """
    n_obs, n_out = matrix.shape[0], len(take)
    if sparse.issparse(matrix):
        csc = sparse.csc_matrix(matrix)
        source = np.where(present, take, 0)
        picked = csc[:, source]
        # zero out absent columns: scale by a 0/1 diagonal
        picked = picked @ sparse.diags(present.astype(csc.dtype), format="csr")
        out = sparse.csr_matrix(picked, dtype=matrix.dtype)
        out.eliminate_zeros()
        out.sort_indices()
        return out
    dense = np.asarray(matrix)
    out = np.zeros((n_obs, n_out), dtype=dense.dtype)
    out[:, present] = dense[:, take[present]]
    return out


def _pad_varm(value, take: np.ndarray, present: np.ndarray):
    if isinstance(value, pd.DataFrame):
        frame = value.iloc[np.where(present, take, 0)].copy()
        frame.iloc[~present] = np.nan
        return frame
    array = np.asarray(value)
    if array.ndim == 0:
        return None
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        return None
    out = np.full((len(take),) + array.shape[1:], np.nan, dtype=dtype)
    out[present] = array[take[present]]
    return out


def _padded_anndata(adata: anndata.AnnData, reference_names: pd.Index) -> anndata.AnnData:
    if not adata.var_names.is_unique:
        raise ValueError("The query's var_names are not unique: run `adata.var_names_make_unique()` first.")
    query_names = pd.Index([str(v) for v in adata.var_names])
    take = query_names.get_indexer(reference_names)
    present = take >= 0
    n_found = int(present.sum())
    if n_found == 0:
        raise ValueError(
            "No reference var names found in query data. Please rerun with return_reference_var_names=True "
            "to see reference var names."
        )
    ratio = n_found / len(reference_names)
    print(
        f"Found {n_found} of {len(reference_names)} reference vars in query data ({100 * ratio:.1f}%); "
        f"{len(reference_names) - n_found} missing vars are padded with zeros, "
        f"{adata.n_vars - n_found} query vars absent from the reference are dropped."
    )
    if ratio < _MIN_OVERLAP:
        warnings.warn(
            "Query data contains less than 80% of reference var names. This may result in poor performance.",
            UserWarning,
            stacklevel=3,
        )
    var = adata.var.reset_index(drop=True).reindex(np.where(present, take, -1))
    var.index = reference_names
    varm = {}
    for key, value in adata.varm.items():
        padded = _pad_varm(value, take, present)
        if padded is None:
            warnings.warn(
                f"varm[{key!r}] cannot be padded to the reference genes and is dropped.",
                UserWarning,
                stacklevel=3,
            )
        else:
            if isinstance(padded, pd.DataFrame):
                padded.index = reference_names
            varm[key] = padded
    if len(adata.varp):
        warnings.warn("varp entries are dropped by prepare_query_anndata.", UserWarning, stacklevel=3)
    X = None if adata.X is None else _pad_matrix(adata.X, take, present)
    layers = {key: _pad_matrix(value, take, present) for key, value in adata.layers.items()}
    return anndata.AnnData(
        X=X,
        obs=adata.obs.copy(),
        var=var,
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
        obsp=dict(adata.obsp),
        varm=varm,
        layers=layers,
        raw=adata.raw.to_adata() if adata.raw is not None else None,
    )


def prepare_query_anndata(
    adata: anndata.AnnData,
    reference_model,
    return_reference_var_names: bool = False,
    inplace: bool = True,
) -> anndata.AnnData | pd.Index | None:
    """Bring the genes of ``adata`` into the order of the reference model's genes.

    ``reference_model`` is a model instance or a directory it was saved to (pyro-scvi or
    scvi-tools 1.x). Reference genes absent from ``adata`` are added as all-zero columns in ``X``
    and in every layer (sparse matrices become CSR), genes of ``adata`` that the reference does not
    know are dropped, and the columns follow the reference order. A line reporting how many
    reference genes were found is printed; a ``UserWarning`` is emitted when fewer than 80% were
    found and a ``ValueError`` raised when none were.

    ``return_reference_var_names=True`` returns the reference genes (``pd.Index``) and changes
    nothing. Otherwise ``inplace=True`` rewrites ``adata`` and returns ``None``;
    ``inplace=False`` leaves it untouched and returns the new AnnData.
    """
    reference_names = _reference_var_names(reference_model)
    if return_reference_var_names:
        return reference_names
    return _pad_and_sort(adata, reference_names, inplace)


def _pad_and_sort(adata: anndata.AnnData, reference_names: pd.Index, inplace: bool) -> anndata.AnnData | None:
    padded = _padded_anndata(adata, reference_names)
    if not inplace:
        return padded
    adata._init_as_actual(padded)
    return None


def prepare_query_mudata(
    mdata,
    reference_model,
    return_reference_var_names: bool = False,
    inplace: bool = True,
    modality: str = "rna",
):
    """:func:`prepare_query_anndata` for the ``modality`` (default ``"rna"``) of a MuData.

    Needs the optional ``mudata`` package (``pip install pyro-scvi[mudata]``). Returns the
    reference genes with ``return_reference_var_names=True``; else ``None`` (``inplace=True``)
    or a new MuData.
    """
    try:
        import mudata  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "prepare_query_mudata needs the mudata package: pip install pyro-scvi[mudata]"
        ) from error
    reference_names = _reference_var_names(reference_model)
    if return_reference_var_names:
        return reference_names
    if modality not in mdata.mod:
        raise ValueError(f"The MuData has no {modality!r} modality; modalities: {list(mdata.mod)}.")
    target = mdata if inplace else mdata.copy()
    _pad_and_sort(target.mod[modality], reference_names, inplace=True)
    target.update()
    return None if inplace else target


# --------------------------------------------------------------------------------------------
# Weight surgery
# --------------------------------------------------------------------------------------------


def _covariate_cat_list(registry: dict, init: dict) -> list[int]:
    """One-hot block sizes (0 for covariates with ≤ 1 category) that the network of ``registry`` uses."""
    registry = Registry.coerce(registry)
    embedding = init.get("batch_representation", "one-hot") == "embedding"
    sizes = ([] if embedding else [registry.n_batch]) + registry.n_cats_per_covariate
    return [k if k > 1 else 0 for k in sizes]


def _injected_linear_blocks(module: nn.Module) -> dict[str, tuple[FCLayers, int]]:
    """Weight names of FCLayers' Linear layers that receive one-hot covariates → (FCLayers, layer index)."""
    found = {}
    for prefix, sub in module.named_modules():
        if not isinstance(sub, FCLayers) or sum(sub.n_cat_list) == 0:
            continue
        for i in range(len(sub.fc_layers)):
            if sub._injects(i):
                found[f"{prefix}.fc_layers.Layer {i}.0.weight"] = (sub, i)
    return found


def _pad_tensor(name: str, reference: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    if reference.shape == fresh.shape:
        return reference.to(fresh.dtype).clone()
    if reference.dim() != fresh.dim() or any(r > f for r, f in zip(reference.shape, fresh.shape)):
        raise ValueError(
            f"Cannot transfer {name!r}: reference shape {tuple(reference.shape)} does not fit "
            "the query model's "
            f"{tuple(fresh.shape)}."
        )
    out = fresh.detach().clone()
    out[tuple(slice(0, s) for s in reference.shape)] = reference.to(fresh.dtype)
    return out


def _surgery_linear(
    name: str, reference: torch.Tensor, fresh: torch.Tensor, ref_cats: list[int], new_cats: list[int]
):
    """Copy the reference's input columns block by block: the non-covariate inputs, then each
    covariate's one-hot block at its (possibly shifted) position; new categories keep fresh values."""
    if len(ref_cats) != len(new_cats) or any(r > n for r, n in zip(ref_cats, new_cats)):
        raise ValueError(f"Cannot transfer {name!r}: covariate blocks {ref_cats} do not fit {new_cats}.")
    n_base = reference.shape[1] - sum(ref_cats)
    if reference.shape[0] != fresh.shape[0] or fresh.shape[1] - sum(new_cats) != n_base:
        raise ValueError(
            f"Cannot transfer {name!r}: reference shape {tuple(reference.shape)} does not fit "
            "the query model's "
            f"{tuple(fresh.shape)}."
        )
    out = fresh.detach().clone()
    reference = reference.to(fresh.dtype)
    out[:, :n_base] = reference[:, :n_base]
    ref_offset, new_offset = n_base, n_base
    for k_ref, k_new in zip(ref_cats, new_cats):
        out[:, new_offset:new_offset + k_ref] = reference[:, ref_offset:ref_offset + k_ref]
        ref_offset += k_ref
        new_offset += k_new
    return out


def transfer_state_dict(
    module: nn.Module, reference_state: dict, ref_cats: list[int]
) -> dict[str, torch.Tensor]:
    """The reference weights fitted into ``module``'s (possibly larger) tensors."""
    fresh_state = module.state_dict()
    missing = sorted(set(fresh_state) - set(reference_state))
    unexpected = sorted(set(reference_state) - set(fresh_state))
    if missing or unexpected:
        raise ValueError(
            f"The reference weights do not match the query model: missing {missing}, unexpected {unexpected}."
        )
    injected = _injected_linear_blocks(module)
    out = {}
    for name, fresh in fresh_state.items():
        reference = torch.as_tensor(reference_state[name])
        if name in injected and reference.shape != fresh.shape:  # equal shapes: same categories
            fc, _ = injected[name]
            out[name] = _surgery_linear(name, reference, fresh, ref_cats, list(fc.n_cat_list))
            continue
        out[name] = _pad_tensor(name, reference, fresh)
    return out


# --------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------


def query_freeze_masks(
    module: nn.Module,
    freeze_expression: bool = True,
    freeze_decoder_first_layer: bool = True,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
) -> dict[str, torch.Tensor]:
    """Masks (parameter name → bool tensor, ``True`` = frozen) of the scArches online update.

    Trainable: the one-hot covariate columns (the last ``sum(n_cat_list)`` inputs) of every
    FCLayers Linear layer that receives covariates, in ``z_encoder`` and ``decoder``; the whole
    first layer of the encoders with ``freeze_expression=False`` and of the decoder with
    ``freeze_decoder_first_layer=False``; everything in ``library_encoder``; the batch embedding;
    BatchNorm affine parameters of the encoders iff ``freeze_batchnorm_encoder=False`` and of the
    decoder iff ``freeze_batchnorm_decoder=False``. Everything else is frozen (Linear biases and
    non-covariate inputs, loc/var heads, decoder heads, ``log_dispersion``, ...), the heads that
    the ``"full_rank"`` and ``"flow"`` guides add to the z encoder (``z_cholesky``, ``z_flow``)
    included, like its loc/var heads; with ``unfrozen=True`` they train with the rest.
    """
    parameters = dict(module.named_parameters())
    trainable = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in parameters.items()}
    for name in parameters:
        if name.startswith("library_encoder.") or name.startswith("batch_embedding."):
            trainable[name][...] = True
    for prefix, sub in module.named_modules():
        if not isinstance(sub, FCLayers) or prefix.startswith("library_encoder."):
            continue
        is_encoder = prefix.startswith(_ENCODER_PREFIXES)
        is_decoder = prefix.startswith(_DECODER_PREFIXES)
        n_cov = sum(sub.n_cat_list)
        for i, block in enumerate(sub.fc_layers):
            base = f"{prefix}.fc_layers.Layer {i}"
            open_first = i == 0 and (
                (is_encoder and not freeze_expression) or (is_decoder and not freeze_decoder_first_layer)
            )
            if open_first:
                trainable[f"{base}.0.weight"][...] = True
                trainable[f"{base}.0.bias"][...] = True
            elif n_cov > 0 and sub._injects(i):
                trainable[f"{base}.0.weight"][:, -n_cov:] = True
            if block[1] is not None:
                bn_open = (is_encoder and not freeze_batchnorm_encoder) or (
                    is_decoder and not freeze_batchnorm_decoder
                )
                if bn_open and block[1].affine:
                    trainable[f"{base}.1.weight"][...] = True
                    trainable[f"{base}.1.bias"][...] = True
    return {name: ~mask for name, mask in trainable.items() if not bool(mask.all())}


def _freeze_running_statistics(module: nn.Module, encoder: bool, decoder: bool) -> None:
    for prefix, sub in module.named_modules():
        if not isinstance(sub, nn.modules.batchnorm._BatchNorm):
            continue
        if (encoder and prefix.startswith(_ENCODER_PREFIXES)) or (
            decoder and prefix.startswith(_DECODER_PREFIXES)
        ):
            sub.momentum = 0.0


# --------------------------------------------------------------------------------------------
# load_query_data
# --------------------------------------------------------------------------------------------


def _check_arguments(adata, reference_model, datamodule) -> None:
    if datamodule is not None:
        raise ValueError(
            "load_query_data maps an AnnData: pass adata= (datamodule= is for training a built model)."
        )
    if adata is None:
        raise ValueError("load_query_data needs the query AnnData (adata=).")
    if reference_model is None:
        raise ValueError("load_query_data needs reference_model (a trained model or its save directory).")


def _align_query_genes(
    adata: anndata.AnnData, reference_names: pd.Index, inplace_subset_query_vars: bool
) -> None:
    """Subset ``adata`` to the reference genes (with ``inplace_subset_query_vars``) or warn when its
    genes are as many as the reference's but differ."""
    if inplace_subset_query_vars:
        absent = reference_names.difference(pd.Index([str(v) for v in adata.var_names]))
        if len(absent):
            raise ValueError(
                f"{len(absent)} reference vars are absent from the query (e.g. {list(absent[:5])}); "
                "pad them with prepare_query_anndata first."
            )
        adata._inplace_subset_var(np.asarray(reference_names))
    query_names = pd.Index([str(v) for v in adata.var_names])
    if len(query_names) == len(reference_names) and not query_names.equals(reference_names):
        warnings.warn(
            "Query data var_names are not the same as the reference model's (same number, different names or "
            "order); results may be wrong. Use prepare_query_anndata or inplace_subset_query_vars=True.",
            UserWarning,
            stacklevel=4,
        )


def _batch_categories_missing(adata, registry: dict) -> list:
    """Batch categories of ``adata`` that the reference ``registry`` does not know (sorted)."""
    registry = Registry.coerce(registry)
    batch_key = registry.setup_args.get("batch_key")
    if batch_key is None:
        return []
    mapping = registry.batch_categories
    known = {str(c) for c in np.asarray(mapping, dtype=object)}
    values = pd.Series(adata.obs[batch_key]).dropna().astype(str).unique()
    return sorted(set(values) - known)


def _register_query(cls, adata: anndata.AnnData, registry: dict, transfer_batch: bool) -> None:
    """Register ``adata`` with the reference setup, new categories appended, through
    ``cls.register_manager``. An unlabeled query gets the new label category ``"unlabeled"``."""
    if not transfer_batch:
        unknown = _batch_categories_missing(adata, registry)
        if unknown:
            raise ValueError(
                "transfer_batch=False but the query has batch categories unknown to the reference: "
                f"{unknown}."
            )
    labels_key = Registry.coerce(registry).setup_args.get("labels_key")
    if labels_key is not None and labels_key not in adata.obs:
        warnings.warn(
            f'The query has no obs["{labels_key}"]: its cells get the new label category "unlabeled".',
            UserWarning,
            stacklevel=4,
        )
        adata.obs[labels_key] = pd.Categorical(["unlabeled"] * adata.n_obs)
    query_registry = setup_registry(
        adata, source_registry=registry, extend_categories=True, model_name=cls.__name__
    )
    cls.register_manager(AnnDataManager(adata, query_registry))


def _freeze_query_module(module: nn.Module, init: dict, unfrozen: bool, freeze_dropout: bool,
                         **freeze: bool) -> None:
    """Set ``module.frozen_parameters`` (see :func:`query_freeze_masks`, with the ``freeze``
    flags), the BatchNorm running statistics and, with ``freeze_dropout``, dropout; nothing is
    frozen when ``unfrozen``."""
    if unfrozen:
        module.frozen_parameters = {}
        return
    if not init.get("encode_covariates", False) and freeze["freeze_expression"]:
        warnings.warn(
            "The reference model was trained with encode_covariates=False: the encoder cannot adapt to the "
            "query's batches and stays exactly the reference encoder; train the reference with "
            "encode_covariates=True for scArches mapping.",
            UserWarning,
            stacklevel=4,
        )
    module.frozen_parameters = query_freeze_masks(module, **freeze)
    _freeze_running_statistics(module, freeze["freeze_batchnorm_encoder"], freeze["freeze_batchnorm_decoder"])
    if freeze_dropout:
        for sub in module.modules():
            if isinstance(sub, nn.Dropout):
                sub.p = 0.0


class ReferenceMappingMixin:
    """scArches reference mapping for a model class: :meth:`prepare_query_anndata`,
    :meth:`prepare_query_mudata` and :meth:`load_query_data`.

    Needs only the class's public API: ``cls(adata, **init_params)``, ``cls.register_manager``
    and, on instances, ``module`` (with ``frozen_parameters``), ``registry_``, ``init_params_`` and
    ``is_trained_`` (:class:`~pyro_scvi.api.protocol.ModelProtocol`).
    """

    prepare_query_anndata = staticmethod(prepare_query_anndata)
    prepare_query_mudata = staticmethod(prepare_query_mudata)

    @classmethod
    def load_query_data(
        cls,
        adata: anndata.AnnData | None = None,
        reference_model=None,
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device: int | str = "auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
        freeze_classifier: bool = True,
        transfer_batch: bool = True,
        datamodule=None,
    ):
        """A model of this class for the query ``adata``, initialised from ``reference_model``.

        ``reference_model``: a trained model or the directory it was saved to (pyro-scvi or
        scvi-tools 1.x). The query is registered with the reference setup; unseen batch (and other
        categorical) categories are appended to the reference mappings. The new model starts from
        the reference weights; entries for the new categories (one-hot input columns,
        batch-specific dispersion columns, batch-embedding rows) keep their fresh initial values
        and the library-size prior of new batches is computed on the query. Unless ``unfrozen``,
        only the weights that let the network adapt to the new categories are trained (see
        :func:`query_freeze_masks`); the encoder BatchNorm running statistics are frozen with
        ``freeze_batchnorm_encoder`` and the decoder's with ``freeze_batchnorm_decoder``;
        ``freeze_dropout`` switches dropout off. ``transfer_batch=False`` refuses query batches
        unknown to the reference. ``freeze_classifier`` keeps a classifier's weights (``SCANVI``;
        a model without one ignores it). The returned model is untrained.
        """
        _check_arguments(adata, reference_model, datamodule)
        reference = _read_reference(reference_model)
        registry = reference["registry"]
        if Registry.coerce(registry).model_name != cls.__name__:
            raise ValueError("It appears you are loading a model from a different class.")
        if adata.is_view:
            adata._init_as_actual(adata.copy())
        _align_query_genes(adata, reference["var_names"], inplace_subset_query_vars)
        cls._register_query_anndata(adata, registry, transfer_batch)

        init = dict(reference["init_params"]["non_kwargs"])
        init.update(reference["init_params"].get("kwargs", {}).get("kwargs", {}))
        model = cls._build_query_model(adata, init, reference, _custom_functions(reference_model))
        state = transfer_state_dict(
            model.module, reference["state_dict"], _covariate_cat_list(registry, init)
        )
        model.module.load_state_dict(state, strict=True)
        model.module.eval()
        freeze = dict(freeze_expression=freeze_expression,
                      freeze_decoder_first_layer=freeze_decoder_first_layer,
                      freeze_batchnorm_encoder=freeze_batchnorm_encoder,
                      freeze_batchnorm_decoder=freeze_batchnorm_decoder)
        if not unfrozen:
            cls._freeze_query(model.module, init, freeze_dropout, freeze_classifier, **freeze)
        else:
            model.module.frozen_parameters = {}
        model.is_trained_ = False
        model.module.to(resolve_device(accelerator, device))
        return model

    # Hooks a model class overrides where its query differs from scVI's (see ``SCANVI``).

    @classmethod
    def _register_query_anndata(cls, adata: anndata.AnnData, registry, transfer_batch: bool) -> None:
        """Register the query with the reference setup (new batch categories appended)."""
        _register_query(cls, adata, registry, transfer_batch)

    @classmethod
    def _build_query_model(cls, adata: anndata.AnnData, init: dict, reference: dict, custom: dict):
        """The untrained query model, built with the reference's constructor arguments."""
        return cls(adata, **init, **custom)

    @classmethod
    def _freeze_query(cls, module: nn.Module, init: dict, freeze_dropout: bool, freeze_classifier: bool,
                      **freeze: bool) -> None:
        """Freeze the query module (``freeze_classifier`` is for classes with a classifier)."""
        _freeze_query_module(module, init, False, freeze_dropout, **freeze)
