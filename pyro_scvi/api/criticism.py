"""Model criticism as a model method: :meth:`CriticismMixin.to_arviz`.

The mixin needs only :class:`~pyro_scvi.api.protocol.ModelProtocol`: ``check_trained``,
``check_not_minified``, ``cell_names``, ``var_names``, ``pyro_scope``, ``minibatches``,
``registry_`` and ``module`` (its ``model``/``guide``). Draws come from
:func:`pyro_scvi.infer.posterior.posterior_traces`; the model-agnostic statistics (PSIS, ESS,
posterior-predictive checks) are in :mod:`pyro_scvi.diagnostics`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from ..diagnostics import import_arviz
from ..infer import posterior
from ..models import sites

__all__ = ["CriticismMixin", "LARGE_PREDICTIVE_ELEMENTS"]

#: draws × cells × genes above which :meth:`CriticismMixin.to_arviz` warns about the size of
#: posterior_predictive
LARGE_PREDICTIVE_ELEMENTS = 2.5e8


class CriticismMixin:
    """Adds :meth:`to_arviz` to a class that follows :class:`~pyro_scvi.api.protocol.ModelProtocol`."""

    def to_arviz(self, adata=None, indices=None, n_samples: int = 100, batch_size: int | None = None, *,
                 posterior_predictive: bool = True):
        """The posterior of a trained model as an :class:`arviz.InferenceData` (one chain of
        ``n_samples`` draws of the variational posterior per cell).

        Groups (``cell`` coordinates are the cell names, ``gene`` the gene names):

        * ``posterior``: ``z`` ``(chain, draw, cell, latent_dim)`` (the Gaussian variable, before the
          softmax of ``latent_distribution="ln"``) and, when the library is latent, ``library``
          ``(chain, draw, cell)``, the log-library; any other latent site of a custom guide likewise.
          A global latent site (outside the ``"cells"`` plate, e.g. ``inverse_dispersion`` with a
          ``dispersion_prior``) has dims ``(chain, draw, gene, ...)``; draw ``s`` is one value for all
          cells (every minibatch reuses the draws made with the first).
        * ``posterior_predictive``: counts ``x`` ``(chain, draw, cell, gene)`` drawn from p(x̃ | z, l)
          at the same draws (int32 for count likelihoods, float32 otherwise).
        * ``log_likelihood``: ``x`` ``(chain, draw, cell)``: log p(x_n | z, l) summed over genes, so
          that ``az.loo(idata)`` and ``az.waic(idata)`` treat each cell as one observation.
        * ``observed_data``: the counts ``x`` ``(cell, gene)``.
        * ``constant_data``: ``batch`` and ``labels`` ``(cell,)``, the category of each cell.

        **Memory**: ``posterior_predictive`` holds ``n_samples × cells × genes`` numbers (4 bytes
        each: 100 draws of 10,000 cells × 2,000 genes are 8 GB). Pass ``indices`` to check a subset
        of cells, lower ``n_samples``, or ``posterior_predictive=False`` to leave that group out (the
        other groups are small). A warning is issued above 2.5·10⁸ elements.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be ≥ 1, got {n_samples}.")
        az = import_arviz()
        self.check_trained()
        self.check_not_minified("to_arviz", adata)
        self.module.eval()
        cells = np.asarray(self.cell_names(adata, indices)).astype(str)
        genes = np.asarray(self.var_names).astype(str)
        if len(cells) == 0:
            raise ValueError("to_arviz: no cells selected.")
        if posterior_predictive:
            _warn_if_large(n_samples, len(cells), len(genes))
        draws = _PosteriorDraws(n_samples, len(cells), len(genes), posterior_predictive)
        with self.pyro_scope(), torch.no_grad():
            for batch in self.minibatches(adata, indices, batch_size):
                guide_trace, (model_trace,) = posterior.posterior_traces(
                    self.module.model, self.module.guide, batch, n_samples, sample_observed=True,
                    global_trace=draws.global_trace)
                draws.add(batch, prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace))
        if draws.offset != len(cells):
            raise RuntimeError(f"Expected {len(cells)} cells, got {draws.offset} from the minibatches.")
        return draws.inference_data(az, cells, genes, self.registry_)


def _warn_if_large(n_samples: int, n_cells: int, n_genes: int) -> None:
    if n_samples * n_cells * n_genes > LARGE_PREDICTIVE_ELEMENTS:
        warnings.warn(
            f"to_arviz: posterior_predictive holds {n_samples} × {n_cells} × {n_genes} values "
            f"(~{4 * n_samples * n_cells * n_genes / 1e9:.1f} GB); pass indices=, a smaller n_samples or "
            "posterior_predictive=False.", UserWarning, stacklevel=3)


def _category_names(registry, key: str, codes: np.ndarray) -> np.ndarray:
    """Category of each code of the registered field ``key``; the codes when there is no mapping."""
    try:
        mapping = registry.field(key).categories
    except KeyError:
        return codes
    if mapping is None:
        return codes
    return mapping[codes].astype(str)


class _PosteriorDraws:
    """The arrays of :meth:`CriticismMixin.to_arviz` (``S`` draws, ``N`` cells, ``G`` genes),
    filled minibatch by minibatch."""

    def __init__(self, n_samples: int, n_cells: int, n_genes: int, predictive: bool) -> None:
        self.n_samples, self.n_cells, self.n_genes, self.predictive = n_samples, n_cells, n_genes, predictive
        self.latent: dict[str, np.ndarray] = {}  # local (S, N, ·) or global (S, ·)
        self.dims = {sites.X: ["cell", "gene"], "batch": ["cell"], "labels": ["cell"]}
        self.global_sites: set[str] = set()
        self.global_trace = None  # the first minibatch's draws of the global latents, reused by the others
        self.log_lik = np.empty((n_samples, n_cells), dtype=np.float64)  # (S, N)
        self.observed = self.draws = None  # (N, G) and (S, N, G)
        self.batch_codes = np.empty(n_cells, dtype=np.int64)
        self.label_codes = np.empty(n_cells, dtype=np.int64)
        self.offset = 0

    def add(self, batch, model_trace, guide_trace) -> None:
        """Store the draws of one minibatch of ``m`` cells (rows ``offset:offset + m``)."""
        rows = slice(self.offset, self.offset + batch.n_cells)
        self._add_latents(guide_trace, rows, batch.n_cells)
        values, cell_log_lik, discrete = posterior.predictive_observation(
            model_trace, batch.x, self.n_samples
        )
        if self.observed is None:
            dtype = np.int32 if discrete else np.float32
            self.observed = np.empty((self.n_cells, self.n_genes), dtype=dtype)
            if self.predictive:
                self.draws = np.empty((self.n_samples, self.n_cells, self.n_genes), dtype=dtype)
        self.observed[rows] = batch.x.cpu().numpy()
        if self.predictive:
            self.draws[:, rows] = values.cpu().numpy()
        self.log_lik[:, rows] = cell_log_lik.double().cpu().numpy()
        self.batch_codes[rows] = batch.batch_index.reshape(-1).cpu().numpy()
        self.label_codes[rows] = batch.labels.reshape(-1).cpu().numpy()
        self.offset += batch.n_cells

    def _add_latents(self, guide_trace, rows: slice, n_cells: int) -> None:
        for name, (value, global_dims) in posterior.guide_latent_values(
            guide_trace, self.n_samples, n_cells
        ).items():
            if global_dims is not None:  # kept from the first minibatch (the others replay it)
                if name not in self.latent:
                    self.latent[name] = value.cpu().numpy().astype(np.float32)
                    self.dims[name] = global_dims
                    self.global_sites.add(name)
                continue
            if name not in self.latent:
                self.latent[name] = np.empty(
                    (self.n_samples, self.n_cells, *value.shape[2:]), dtype=np.float32
                )
            self.latent[name][:, rows] = value.cpu().numpy()
        if self.global_trace is None and self.global_sites:
            self.global_trace = poutine.Trace()
            for name in self.global_sites:
                self.global_trace.add_node(name, **guide_trace.nodes[name])

    def _posterior(self, coords: dict) -> dict[str, np.ndarray]:
        """The posterior group with a chain axis; sets the dims (and ``latent_dim`` coords) of local sites."""
        out = {}
        for name, value in self.latent.items():
            if name in self.global_sites:
                out[name] = value[None]
                continue
            if name == sites.LIBRARY and value.ndim == 3 and value.shape[-1] == 1:
                value = value[..., 0]
            if name == sites.Z:
                self.dims[name] = ["cell", "latent_dim"]
                coords["latent_dim"] = np.arange(value.shape[-1])
            else:
                self.dims[name] = ["cell"] + [f"{name}_dim_{i}" for i in range(value.ndim - 2)]
            out[name] = value[None]
        return out

    def inference_data(self, az, cells: np.ndarray, genes: np.ndarray, registry):
        """The :class:`arviz.InferenceData` of the stored draws."""
        coords = {"cell": cells, "gene": genes}
        posterior_group = self._posterior(coords)
        attrs = {"inference_library": "pyro_scvi", "posterior": "variational (amortised guide)",
                 "n_samples": self.n_samples}

        def dataset(data, dims, sample_dims=True):
            kwargs = {} if sample_dims else {"default_dims": []}
            return az.dict_to_dataset(data, coords=coords, dims=dims, attrs=attrs, library=None, **kwargs)

        constant = {"batch": _category_names(registry, "batch", self.batch_codes),
                    "labels": _category_names(registry, "labels", self.label_codes)}
        groups = {
            "posterior": dataset(posterior_group, self.dims),
            "log_likelihood": dataset({sites.X: self.log_lik[None]}, {sites.X: ["cell"]}),
            "observed_data": dataset({sites.X: self.observed}, self.dims, sample_dims=False),
            "constant_data": dataset(constant, self.dims, sample_dims=False),
        }
        if self.predictive:
            groups["posterior_predictive"] = dataset({sites.X: self.draws[None]}, self.dims)
        return az.InferenceData(**groups)
