"""The saving part: ``save``/``load`` in pyro-scvi's safe format or scvi-tools' 1.x format.

What a file holds: the module's state dict, the var names and ``attr_dict`` (registry, init
params, training state and history, the query freezing state, the names of custom code and the
model's private Pyro parameters). Code is never saved: custom functions, registered likelihoods
and prior objects are passed again to :meth:`load`. Reading and writing the files is
:mod:`pyro_scvi.io`; this part decides what goes in and rebuilds a model from it.
"""

from __future__ import annotations

import dataclasses
import urllib.request
import warnings
from pathlib import Path

import anndata
import numpy as np
import torch

from .. import io
from ..data.manager import AnnDataManager
from ..data.registry import Registry, setup_registry
from ..infer.device import resolve_device
from ..models.contract import param_store_from_safe, param_store_to_safe
from ..models.likelihoods import BUILTIN_LIKELIHOODS, LIKELIHOODS, unknown_likelihood_message
from ..models.priors import LogNormalLibraryPrior, NormalPrior
from .training import count_cells

__all__ = ["SavingMixin", "freezing_state", "restore_freezing"]


def function_name(fn) -> str | None:
    """``module.qualname`` of a user function (what a file records instead of the code)."""
    return None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def nondefault_priors(module) -> list[str]:
    """The priors of ``module`` that scvi-tools' SCVI does not have (empty for the reference model)."""
    found = []
    if type(getattr(module, "z_prior", None)) not in (NormalPrior, type(None)):
        found.append(f"z_prior={type(module.z_prior).__name__}")
    library_prior = getattr(module, "library_prior", None)
    if library_prior is not None and (type(library_prior) is not LogNormalLibraryPrior
                                      or library_prior.owns_parameters):
        found.append(f"library_prior={type(library_prior).__name__}")
    if getattr(module, "dispersion_prior", None) is not None:
        found.append(f"dispersion_prior={module.dispersion_prior!r}")
    return found


def freezing_state(module) -> dict:
    """What a query model (``load_query_data``) freezes: entry masks, BatchNorm momenta, dropout rates."""
    return {
        "masks": {
            name: torch.as_tensor(mask, dtype=torch.bool).cpu()
            for name, mask in module.frozen_parameters.items()
        },
        "batchnorm_momentum": {
            name: float(m.momentum)
            for name, m in module.named_modules()
            if isinstance(m, torch.nn.BatchNorm1d) and m.momentum != 0.01
        },
        "dropout": {
            name: float(m.p) for name, m in module.named_modules() if isinstance(m, torch.nn.Dropout)
        },
    }


def restore_freezing(module, state: dict | None) -> None:
    """Inverse of :func:`freezing_state` (files without it leave the module as built)."""
    if not state:
        return
    module.frozen_parameters = dict(state.get("masks", {}))
    modules = dict(module.named_modules())
    for name, momentum in state.get("batchnorm_momentum", {}).items():
        modules[name].momentum = momentum
    for name, rate in state.get("dropout", {}).items():
        modules[name].p = rate


def with_source_extras(transferred: Registry, source: Registry) -> Registry:
    """``transferred`` with what the generic transfer does not carry over from the saved registry:
    setup arguments and field-state entries of the model's own setup (scANVI's
    ``unlabeled_category``), and the source's ``scvi_version`` when it predates scvi-tools 1.1
    (scvi-tools reads an scANVI classifier's output convention from it and keeps it on re-saving)."""
    fields = {
        name: dataclasses.replace(field, state={**source.fields[name].state, **field.state})
        if name in source.fields else field
        for name, field in transferred.fields.items()
    }
    version = transferred.scvi_version
    if source.model_name == "SCANVI" and io.scanvi_classifier_softmax({"scvi_version": source.scvi_version}):
        version = source.scvi_version
    return dataclasses.replace(transferred, fields=fields, scvi_version=version,
                               setup_args={**source.setup_args, **transferred.setup_args})


class SavingMixin:
    """``save``/``load`` for a model following :class:`~pyro_scvi.api.protocol.ModelProtocol`.

    The class names the module class that scvi-tools' format can hold (``_scvi_tools_module_name``);
    its constructor takes ``(adata, registry=..., model_fn=..., guide_fn=..., **init_params)``.
    """

    #: the module class whose weights scvi-tools' model of the same name reads
    _scvi_tools_module_name: str = "SCVIModule"
    #: model attributes scvi-tools' file of this model also holds (in ``attr_dict``)
    _scvi_tools_attrs: tuple[str, ...] = ()
    #: constructor arguments read off saved tensor shapes at load: name -> (state-dict key, dim)
    _sizes_from_state_dict: dict[str, tuple[str, int]] = {}

    def _custom_parts(self) -> dict:
        """Names of the user code this model runs (saved so that :meth:`load` can ask for it)."""
        return {
            "model_fn": function_name(self.module.model_fn),
            "guide_fn": function_name(self.module.guide_fn),
            "module_class": type(self.module).__qualname__,
        }

    def save(
        self,
        dir_path: str | Path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        save_kwargs: dict | None = None,
        legacy_mudata_format: bool = False,
        datamodule=None,
        scvi_tools_format: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to ``dir_path/<prefix>model.pt`` (and the AnnData with ``save_anndata``).

        The file holds only tensors and plain data, so :meth:`load` never unpickles code. The
        directory is replaced atomically; an existing one needs ``overwrite=True``.
        ``scvi_tools_format=True`` writes scvi-tools 1.x's layout instead, which
        ``scvi.model.SCVI.load`` (``SCANVI.load`` for a SCANVI) reads (it is a pickle: scvi-tools
        loads it with ``weights_only=False``).
        """
        if save_anndata and self.adata is None:
            raise ValueError("save_anndata=True but this model has no AnnData.")
        if scvi_tools_format:
            self._check_scvi_tools_exportable()
            io.write_scvi_tools_model(
                dir_path,
                self.module.state_dict(),
                self.var_names,
                {
                    "registry_": self.registry_,
                    "init_params_": self.init_params_,
                    "is_trained_": self.is_trained_,
                    "history_": self.history_,
                    "train_indices_": self.train_indices_,
                    "validation_indices_": self.validation_indices_,
                    "test_indices_": self.test_indices_,
                    **{name: getattr(self, name) for name in self._scvi_tools_attrs},
                },
                prefix=prefix,
                overwrite=overwrite,
            )
            if save_anndata:
                target = Path(dir_path) / f"{prefix or ''}adata.h5ad"
                staging = target.with_name(f".{target.name}.partial")
                self.adata.write_h5ad(staging, **anndata_write_kwargs)
                staging.replace(target)
            return
        io.write_model_dir(
            dir_path,
            self._native_payload(),
            prefix=prefix,
            overwrite=overwrite,
            adata=self.adata if save_anndata else None,
            **anndata_write_kwargs,
        )

    def _check_scvi_tools_exportable(self) -> None:
        """Raise ``ValueError`` when scvi-tools' format cannot hold this model."""
        custom = self._custom_parts()
        if (
            custom["model_fn"]
            or custom["guide_fn"]
            or custom["module_class"] != self._scvi_tools_module_name
            or self.module.gene_likelihood not in BUILTIN_LIKELIHOODS
        ):
            raise ValueError(
                "scvi_tools_format=True needs the built-in scVI (module, model, guide and a built-in "
                "gene_likelihood); save this model in pyro-scvi's format instead."
            )
        guide = getattr(self.module, "guide_family", "normal")
        if guide != "normal":
            raise ValueError(
                f"scvi_tools_format=True cannot hold guide={guide!r}: scvi-tools' SCVI has only the "
                "mean-field Gaussian encoder (guide='normal'). Save this model in pyro-scvi's format "
                "instead (scvi_tools_format=False)."
            )
        blockers = nondefault_priors(self.module)
        if blockers:
            raise ValueError(
                f"scvi_tools_format=True cannot hold {', '.join(blockers)}: scvi-tools' "
                "SCVI has only the normal z prior, the per-batch library prior and a point-estimated θ. "
                "Save this model in pyro-scvi's format instead (scvi_tools_format=False)."
            )

    def _native_payload(self) -> dict:
        """Everything pyro-scvi's file holds, as tensors and plain data."""
        return {
            "format": io.FORMAT,
            "format_version": io.FORMAT_VERSION,
            "model_state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "var_names": [str(v) for v in self.var_names],
            "attr_dict": {
                "registry_": io.to_safe(self.registry_),
                "init_params_": io.to_safe(self.init_params_),
                "is_trained_": bool(self.is_trained_),
                "history_": io.history_to_safe(self.history_),
                "train_indices_": io.to_safe(self.train_indices_),
                "validation_indices_": io.to_safe(self.validation_indices_),
                "test_indices_": io.to_safe(self.test_indices_),
                "freezing_": freezing_state(self.module),
                "custom_model_": self._custom_parts(),
                "pyro_params_": param_store_to_safe(self.param_store_state),
            },
        }

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: anndata.AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        datamodule=None,
        allowed_classes_names_list: list[str] | None = None,
        model_fn=None,
        guide_fn=None,
        z_prior=None,
        library_prior=None,
    ):
        """Load a model saved by :meth:`save` or by scvi-tools 1.x (``adata`` defaults to the saved
        AnnData, if any). Nothing in the file is executed: see :mod:`pyro_scvi.io`.

        A model saved with ``model_fn``/``guide_fn`` needs them passed again, and one saved with a
        registered ``gene_likelihood`` needs it registered again (both are code, which the file
        does not hold); a custom module class needs the class whose ``_module_cls`` it is. Likewise a
        model built with a prior *object* needs a new instance of it, ``z_prior=MyPrior(...)`` or
        ``library_prior=...``; its learnt parameters come from the file."""
        dir_path = Path(dir_path)
        model_file = dir_path / f"{prefix or ''}model.pt"
        if backup_url is not None and not model_file.exists():
            dir_path.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(backup_url, model_file)
        saved = io.read_model_dir(dir_path, prefix, map_location="cpu")
        attrs = saved["attr_dict"]
        registry = Registry.coerce(attrs["registry_"])
        allowed = set(allowed_classes_names_list or []) | {cls.__name__}
        if registry.model_name not in allowed:
            raise ValueError("It appears you are loading a model from a different class.")
        adata = cls._adata_for_load(dir_path, prefix, adata, saved["var_names"], registry)
        init = dict(attrs["init_params_"]["non_kwargs"])
        init.update(attrs["init_params_"].get("kwargs", {}).get("kwargs", {}))
        state = saved["model_state_dict"]
        init.update({name: int(state[key].shape[dim])
                     for name, (key, dim) in cls._sizes_from_state_dict.items() if key in state})
        cls._check_loadable(init, attrs.get("custom_model_") or {}, model_fn, guide_fn)
        init.update(
            {
                name: value
                for name, value in (("z_prior", z_prior), ("library_prior", library_prior))
                if value is not None
            }
        )
        model = cls(
            adata,
            registry=None if adata is not None else registry,
            model_fn=model_fn,
            guide_fn=guide_fn,
            **init,
        )
        model._restore(saved, resolve_device(accelerator, device))
        return model

    @classmethod
    def _adata_for_load(cls, dir_path: Path, prefix: str | None, adata, var_names, registry):
        """The AnnData a loaded model gets (given, or saved beside the model), set up with the saved
        registry."""
        if adata is None:
            saved_adata = dir_path / f"{prefix or ''}adata.h5ad"
            if not saved_adata.exists():
                warnings.warn(
                    "Save path contains no saved anndata and no adata was passed. Model will be loaded "
                    "without anndata.",
                    UserWarning,
                    stacklevel=3,
                )
                return None
            adata = anndata.read_h5ad(saved_adata)
        names = np.asarray(var_names, dtype=object)
        if len(names) != adata.n_vars or not np.array_equal(names, np.asarray(adata.var_names, dtype=object)):
            warnings.warn(
                "`var_names` for the loaded `model` does not match those used to train the model; "
                "results may be wrong.",
                UserWarning,
                stacklevel=3,
            )
        if adata.is_view:
            adata._init_as_actual(adata.copy())
        transferred = setup_registry(adata, source_registry=registry, model_name=registry.model_name)
        cls.register_manager(AnnDataManager(adata, with_source_extras(transferred, registry)))
        return adata

    def _restore(self, saved: dict, device: torch.device) -> None:
        """Weights, training state, freezing and Pyro parameters from a read file; then ``eval()`` on
        ``device``."""
        attrs = saved["attr_dict"]
        self.module.load_state_dict(saved["model_state_dict"], strict=True)
        self.is_trained_ = bool(attrs.get("is_trained_", False))
        self.history_ = attrs.get("history_")
        self.train_indices_ = attrs.get("train_indices_")
        self.validation_indices_ = attrs.get("validation_indices_")
        self.test_indices_ = attrs.get("test_indices_")
        if self.train_indices_ is not None:
            self.module.n_train_cells = count_cells(self.train_indices_)
        restore_freezing(self.module, attrs.get("freezing_"))
        self.module.to(device)
        self.param_store_state = param_store_from_safe(attrs.get("pyro_params_"), self.device)
        self.module.eval()

    @classmethod
    def _check_loadable(cls, init: dict, custom: dict, model_fn, guide_fn) -> None:
        """Clear errors for the code a saved model needs and the file cannot hold."""
        likelihood = init.get("gene_likelihood", "zinb")
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"The saved model uses gene_likelihood={likelihood!r}, which is not registered in this "
                f"session: call pyro_scvi.models.register_likelihood({likelihood!r}, ...) before "
                f"{cls.__name__}.load. " + unknown_likelihood_message(likelihood)
            )
        for name, given in (("model_fn", model_fn), ("guide_fn", guide_fn)):
            if custom.get(name) and given is None:
                raise ValueError(
                    f"The model was saved with a custom {name} ({custom[name]}); functions are not "
                    f"saved: pass it again, {cls.__name__}.load(dir_path, adata, {name}=...)."
                )
        saved_class = custom.get("module_class")
        if saved_class and saved_class != cls._module_cls.__qualname__:
            raise ValueError(
                f"The model was saved with the module class {saved_class!r}, but {cls.__name__} builds "
                f"{cls._module_cls.__qualname__!r}: load it with the {cls.__name__} subclass whose "
                f"_module_cls is {saved_class}."
            )

    @staticmethod
    def load_registry(dir_path: str | Path, prefix: str | None = None) -> dict:
        """The registry saved with a model (ours or scvi-tools 1.x)."""
        return io.load_registry(dir_path, prefix)

    @staticmethod
    def view_setup_args(dir_path: str | Path, prefix: str | None = None) -> None:
        """Print the ``setup_anndata`` arguments of a saved model (ours or scvi-tools 1.x)."""
        io.view_setup_args(dir_path, prefix)

    @staticmethod
    def convert_legacy_save(
        dir_path: str | Path,
        output_dir_path: str | Path,
        overwrite: bool = False,
        prefix: str | None = None,
        **save_kwargs,
    ) -> None:
        """Rewrite a scvi-tools < 0.15 save (``model_params.pt``, ``attr.pkl``, ``var_names.csv``)
        in the current layout, readable by :meth:`load` and by scvi-tools 1.x."""
        if save_kwargs:
            raise TypeError(f"convert_legacy_save got unexpected keyword argument(s) {sorted(save_kwargs)}.")
        io.convert_legacy_save(dir_path, output_dir_path, overwrite=overwrite, prefix=prefix)
