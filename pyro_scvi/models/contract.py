"""What a custom model/guide pair must provide for the ``SCVI`` API (see docs/custom_models.md).

Both are called as ``fn(module, batch, transform_batch=None)`` with the model's
:class:`~pyro_scvi.models.module.SCVIModule` and a :class:`~pyro_scvi.data.Minibatch` of ``n`` cells.

==========================  =========================================  ===========================
site (in plate "cells",      kind, shape                                needed by
dim=-1)
==========================  =========================================  ===========================
``z``                        latent, model and guide, event (d,)        everything
``x``                        observed (``obs=batch.x``), event (G,)     train, ELBO, marginal LL,
                                                                        predictive, likelihood params
``library``                  latent (optional), event (1,)              get_latent_library_size
``normalized_expression``    deterministic ρ, event (G,)               get_normalized_expression, DE
``mean``                     deterministic exp(l)·ρ, event (G,)        ``library_size="latent"``
==========================  =========================================  ===========================

Every latent site of the model needs a guide site of the same name (the ELBO pairs them). The
names live in :mod:`pyro_scvi.models.sites`.
"""

from __future__ import annotations

from pyro import poutine

from .sites import CELLS, DETERMINISTIC_SITES, LIBRARY, MEAN, NORMALIZED_EXPRESSION, X, Z, cell_frame

__all__ = ["SITE_USES", "missing_site_message", "check_model_guide"]

#: site → the SCVI methods that read it
SITE_USES = {
    Z: "train, get_latent_representation and every posterior query",
    X: "train, get_elbo, get_marginal_ll, posterior_predictive_sample, get_likelihood_parameters",
    LIBRARY: "get_latent_library_size (latent library)",
    NORMALIZED_EXPRESSION: "get_normalized_expression and differential_expression",
    MEAN: "get_normalized_expression(library_size='latent')",
}

_IN_CELLS = f"pyro.plate({CELLS!r}, n, dim=-1)"


def missing_site_message(where: str, name: str) -> str:
    uses = SITE_USES.get(name)
    need = f" {uses} need(s) it" if uses else ""
    if name in DETERMINISTIC_SITES:
        kind = f"record it with pyro.deterministic(name, value, event_dim=1) inside the {CELLS!r} plate"
    else:
        kind = f"add a pyro.sample site of that name inside the {CELLS!r} plate"
    return f"The {where} has no site {name!r}:{need}; {kind} (see docs/custom_models.md)."


def _in_cells(site) -> bool:
    return cell_frame(site) is not None


def _latent(site) -> bool:
    if site["type"] != "sample" or site["is_observed"]:
        return False
    return not site["infer"].get("_deterministic", False)


def check_model_guide(module, batch) -> None:
    """Trace ``module.guide`` and ``module.model`` once on ``batch`` and raise ``ValueError`` when
    the pair breaks the contract above (the message names the missing or misplaced site)."""
    guide_trace = poutine.trace(module.guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(batch)
    for where, trace in (("guide", guide_trace), ("model", model_trace)):
        site = trace.nodes.get(Z)
        if site is None or site["type"] != "sample":
            raise ValueError(missing_site_message(where, Z))
        if not _in_cells(site):
            raise ValueError(f"The {where}'s site {Z!r} must be inside {_IN_CELLS}.")
        shape = tuple(site["value"].shape[-2:])
        if shape != (batch.n_cells, module.n_latent):
            raise ValueError(f"The {where}'s site {Z!r} has shape {shape}; expected (n_cells, n_latent) = "
                             f"{(batch.n_cells, module.n_latent)} (use .to_event(1) on a (n, d) "
                             "distribution).")
    x = model_trace.nodes.get(X)
    if x is None or x["type"] != "sample" or not x["is_observed"]:
        raise ValueError(missing_site_message("model", X) + " It must observe the counts: obs=batch.x.")
    if not _in_cells(x):
        raise ValueError(f"The model's site {X!r} must be inside {_IN_CELLS}.")
    unpaired = [name for name, site in model_trace.nodes.items()
                if _latent(site) and _in_cells(site) and name not in guide_trace.nodes]
    if unpaired:
        raise ValueError(f"The model's latent site(s) {unpaired} have no guide site of the same name: the "
                         "ELBO pairs every per-cell latent of the model with the guide's (add them to the "
                         "guide).")


# ---------------------------------------------------------------------------------------------
# saving the plain ``pyro.param`` values of a custom model (module weights save with the module)
# ---------------------------------------------------------------------------------------------
_BOUNDED = {"interval": ("lower_bound", "upper_bound"), "half_open_interval": ("lower_bound", "upper_bound"),
            "greater_than": ("lower_bound",), "greater_than_eq": ("lower_bound",),
            "less_than": ("upper_bound",)}


def _constraint_to_safe(constraint, param: str) -> dict:
    import pyro.distributions.constraints as pyro_constraints
    from torch.distributions import constraints as torch_constraints

    for namespace in (pyro_constraints, torch_constraints):
        for name, value in vars(namespace).items():
            if value is constraint and not name.startswith("_"):
                return {"name": name, "args": []}
    if isinstance(constraint, type(torch_constraints.real)):
        return {"name": "real", "args": []}
    for name, attributes in _BOUNDED.items():
        if type(constraint) is getattr(torch_constraints, name):
            return {"name": name, "args": [getattr(constraint, a) for a in attributes]}
    raise TypeError(f"pyro.param {param!r} has the constraint {constraint!r}, which cannot be saved; use a "
                    "named constraint (positive, unit_interval, interval(a, b), ...) or keep the parameter "
                    "in an nn.Module.")


def _constraint_from_safe(entry: dict):
    import pyro.distributions.constraints as pyro_constraints

    value = getattr(pyro_constraints, entry["name"])
    return value(*entry["args"]) if entry["args"] else value


def param_store_to_safe(state: dict) -> dict:
    """The plain ``pyro.param`` entries of a param-store state (``pyro.module`` weights, whose
    names contain ``$$$``, are left out: they save with the module), as tensors and plain data."""
    from torch.distributions import constraints

    return {name: {"unconstrained": value.detach().cpu().clone(),
                   "constraint": _constraint_to_safe(state["constraints"].get(name, constraints.real), name)}
            for name, value in state["params"].items() if "$$$" not in name}


def param_store_from_safe(saved: dict | None, device=None) -> dict:
    """Inverse of :func:`param_store_to_safe`: a state for ``ParamStoreDict.scope``."""
    state = {"params": {}, "constraints": {}}
    for name, entry in (saved or {}).items():
        state["params"][name] = entry["unconstrained"].to(device).detach().clone().requires_grad_(True)
        state["constraints"][name] = _constraint_from_safe(entry["constraint"])
    return state
