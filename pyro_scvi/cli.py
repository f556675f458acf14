"""Command line: ``pyro-scvi train|latent|normalize|de|annotate|info|demo``.

``pyro-scvi train data.h5ad --batch-key batch --out results`` trains scVI and writes
``results/model/`` and ``results/<name>.h5ad`` (latent space in ``obsm["X_scVI"]``); the other
subcommands load such a model directory (or one saved by scvi-tools 1.x) and apply it to data.
``pyro-scvi annotate reference.h5ad query.h5ad --labels-key cell_type`` transfers cell types:
scVI → scANVI on the reference, scArches mapping of the query, predicted labels in the query's obs.
Run ``pyro-scvi <command> --help`` for each command's options.

Inputs are ``.h5ad`` files, 10x Genomics ``.h5`` files (Cell Ranger v2 and v3) and 10x matrix
directories, read by :func:`pyro_scvi.io.tenx.read_input`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .data.registry import Registry
from .differential import DE_MODES
from .infer.device import ACCELERATORS
from .io.tenx import VAR_NAMES, read_input

__all__ = ["main", "run_demo", "build_parser"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


#: errors reported as ``error: <message>`` with exit code 1 (bad data, bad model, missing files)
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError, OSError, ImportError, ArithmeticError)


# ============================================================================ the demo
def run_demo(out_dir: str | Path = "demo_output", max_epochs: int = 80, seed: int = 0, quiet: bool = False,
             plots: bool = False) -> dict:
    """Generate 3 batches × 4 cell types, train SCVI, write ``demo.h5ad`` and the model; return a report.

    With ``plots``, also ``demo_training.png`` and ``demo_latent_{labels,batch}.png`` (report key ``plots``;
    ``embedding``: ``"UMAP"`` when umap-learn is installed, else ``"PCA"``).
    """
    from . import SCVI, settings
    from .data import synthetic_iid
    from .metrics import silhouette_score

    settings.seed = seed
    out_dir = Path(out_dir)
    adata = synthetic_iid(batch_size=400, n_genes=1000, n_batches=3, n_labels=4, seed=seed)
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="labels")
    model = SCVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, check_val_every_n_epoch=min(10, max_epochs),
                enable_progress_bar=not quiet)
    seconds = time.perf_counter() - start

    latent = model.get_latent_representation()
    adata.obsm["X_scVI"] = latent
    adata.layers["scvi_normalized"] = model.get_normalized_expression(library_size=1e4, return_numpy=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out_dir / "demo.h5ad")
    model.save(out_dir / "model", overwrite=True)
    report = {
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "batches": adata.obs["batch"].nunique(),
        "cell_types": adata.obs["labels"].nunique(),
        "epochs": max_epochs,
        "seconds_per_epoch": seconds / max_epochs,
        "elbo_train": float(model.history["elbo_train"].iloc[-1, 0]),
        "elbo_validation": float(model.history["elbo_validation"].iloc[-1, 0]),
        "silhouette_cell_type": silhouette_score(latent, adata.obs["labels"]),
        "silhouette_batch": silhouette_score(latent, adata.obs["batch"]),
        "output": str(out_dir / "demo.h5ad"),
        "model": str(out_dir / "model"),
    }
    if plots:
        from . import plotting

        training = plotting.plot_training_history(model.history)
        written = [plotting.save_figure(training, out_dir / "demo_training.png")]
        for column in ("labels", "batch"):  # UMAP when umap-learn is installed (the plot extra), else PCA
            fig = plotting.plot_latent(latent, adata.obs[column], color_name=column)
            report["embedding"] = "UMAP" if fig.axes[0].get_xlabel().startswith("UMAP") else "PCA"
            written.append(plotting.save_figure(fig, out_dir / f"demo_latent_{column}.png"))
        report["plots"] = [str(p) for p in written]
    return report


def _print_report(report: dict) -> None:
    print("pyro-scvi demo")
    print(f"  data: {report['cells']} cells x {report['genes']} genes, {report['batches']} batches, "
          f"{report['cell_types']} cell types (generated)")
    print(f"  training: {report['epochs']} epochs, {report['seconds_per_epoch']:.3f} s/epoch")
    print(f"  negative ELBO per cell: train {report['elbo_train']:.1f}, "
          f"validation {report['elbo_validation']:.1f}")
    print(f"  latent silhouette: cell type {report['silhouette_cell_type']:.3f} (high = separated), "
          f"batch {report['silhouette_batch']:.3f} (near 0 = mixed)")
    print(f"  wrote {report['output']} (obsm['X_scVI'], layers['scvi_normalized']) and {report['model']}/")
    if report.get("plots"):
        print(f"  plots (latent space: {report['embedding']}): {', '.join(report['plots'])}")


# ============================================================================ helpers
def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False) and os.environ.get("RANK", "0") == "0":  # rank 0 only under torchrun
        print(message)


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it.")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "plot"


def _require_plotting(args) -> None:
    """Fail before any long work when --plots is asked for and matplotlib is missing."""
    if getattr(args, "plots", False):
        from .plotting import _pyplot

        _pyplot()


def _check_model_dir(model_dir: str, prefix: str | None = None) -> None:
    directory = Path(model_dir)
    if not (directory / f"{prefix or ''}model.pt").is_file():
        raise FileNotFoundError(f"No model in {directory} (expected {prefix or ''}model.pt).")


def _load_model(model_dir: str, adata, prefix: str | None = None):
    from . import SCVI

    directory = Path(model_dir)
    _check_model_dir(model_dir, prefix)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no saved anndata.*")
        return SCVI.load(directory, adata=adata, prefix=prefix)


def _registry_keys(model) -> list[str]:
    """The obs columns the model was set up with (batch, labels), for default colouring."""
    keys = []
    setup = model.registry_.setup_args
    for name in ("labels_key", "batch_key"):
        if setup.get(name):
            keys.append(setup[name])
    return keys


def _write_latent_plots(args, latent, adata, stem: Path, colors: list[str]) -> list[Path]:
    from . import plotting

    written = []
    columns = colors or [None]
    for column in columns:
        if column is not None and column not in adata.obs:
            raise KeyError(f"--color {column!r} is not a column of adata.obs "
                           f"(columns: {list(adata.obs.columns)}).")
        values = None if column is None else adata.obs[column]
        fig = plotting.plot_latent(latent, values, method=args.embedding, color_name=column)
        path = stem.with_name(f"{stem.name}_latent{'_' + _slug(column) if column else ''}.png")
        written.append(plotting.save_figure(fig, path))
    return written


def _ppc_plot(model, adata, path: Path, n_cells: int = 300, n_samples: int = 20,
              seed: int = 0) -> Path | None:
    """Posterior predictive check on up to ``n_cells`` cells; None when ``sparse`` is missing."""
    try:
        import sparse  # noqa: F401
    except ImportError:
        return None
    from . import plotting
    from .data.registry import get_from_registry

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    counts = get_from_registry(adata, model.registry_, "X")
    observed = counts[idx]
    samples = model.posterior_predictive_sample(adata, indices=idx, n_samples=n_samples)
    fig = plotting.plot_posterior_predictive(observed, samples)
    return plotting.save_figure(fig, path)


# ============================================================================ subcommands
def _train_model(args, adata):
    """Set up ``adata``, build the model from the options and train it; returns (model, seconds)."""
    from . import SCVI

    SCVI.setup_anndata(
        adata, layer=args.layer, batch_key=args.batch_key, labels_key=args.labels_key,
        categorical_covariate_keys=args.categorical_covariate or None,
        continuous_covariate_keys=args.continuous_covariate or None,
    )
    model = SCVI(
        adata, n_hidden=args.n_hidden, n_latent=args.n_latent, n_layers=args.n_layers,
        dropout_rate=args.dropout_rate, dispersion=args.dispersion, gene_likelihood=args.gene_likelihood,
        latent_distribution=args.latent_distribution,
    )
    plan_kwargs = {"lr": args.lr}
    if args.kl_warmup_epochs is not None:
        plan_kwargs["n_epochs_kl_warmup"] = args.kl_warmup_epochs
    start = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs, batch_size=args.batch_size, train_size=args.train_size,
        early_stopping=args.early_stopping, accelerator=args.accelerator, plan_kwargs=plan_kwargs,
        check_val_every_n_epoch=args.check_val_every if args.train_size < 1 else None,
        enable_progress_bar=not args.quiet, devices=args.devices or "auto", strategy=args.strategy,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every_n_epochs=args.checkpoint_every,
        resume=args.resume,
    )
    return model, time.perf_counter() - start


def _select_genes(args, adata):
    """``--n-top-genes``: keep the highly variable genes (Seurat v3 rule on the counts) before setup."""
    if args.n_top_genes is None:
        if args.hvg_batch_key is not None:
            raise ValueError("--hvg-batch-key needs --n-top-genes.")
        return adata
    from . import pp

    batch_key = args.hvg_batch_key or args.batch_key
    pp.highly_variable_genes(adata, args.n_top_genes, batch_key=batch_key, layer=args.layer, subset=True)
    per_batch = f" (ranked within each {batch_key!r})" if batch_key else ""
    _log(args, f"selected {adata.n_vars} highly variable genes{per_batch}; the model is trained on them")
    return adata


def _write_train_plots(args, model, adata, out: Path, name: str) -> None:
    from . import plotting

    stem = out / name
    training = plotting.plot_training_history(model.history)
    written = [plotting.save_figure(training, stem.with_name(f"{name}_training.png"))]
    colors = args.color if args.color is not None else _registry_keys(model)
    written += _write_latent_plots(args, adata.obsm[args.latent_key], adata, stem, colors)
    ppc = _ppc_plot(model, adata, stem.with_name(f"{name}_ppc.png"), seed=args.seed)
    if ppc is not None:
        written.append(ppc)
    _log(args, "plots: " + ", ".join(str(p) for p in written))


def cmd_train(args) -> int:
    import torch

    from . import settings
    from .infer.distributed import is_main_process

    _require_plotting(args)
    out = Path(args.out)
    model_dir = out / "model"
    name = args.name or f"{Path(args.input).name.split('.')[0] or 'data'}_scvi"
    out_h5ad = out / f"{name}.h5ad"
    _check_output(model_dir, args.overwrite)
    _check_output(out_h5ad, args.overwrite)
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max-epochs must be at least 1, got {args.max_epochs}.")
    if args.resume and args.checkpoint_dir is None:
        raise ValueError("--resume needs --checkpoint-dir DIR, the directory the interrupted run wrote its "
                         "checkpoints to.")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings.seed = args.seed
    settings.progress_bar = not args.quiet

    adata = read_input(args.input, var_names=args.var_names)
    _log(args, f"read {args.input}: {adata.n_obs} cells x {adata.n_vars} genes")
    if adata.n_obs < 2 or adata.n_vars < 1:
        raise ValueError(f"{args.input} has {adata.n_obs} cells and {adata.n_vars} genes: "
                         "nothing to train on.")
    adata = _select_genes(args, adata)
    model, seconds = _train_model(args, adata)
    if not is_main_process():  # data-parallel run: the other ranks hold the same model; rank 0 writes
        return EXIT_OK
    adata.obsm[args.latent_key] = model.get_latent_representation()
    if args.normalized_layer:
        adata.layers[args.normalized_layer] = model.get_normalized_expression(
            library_size=args.library_size, return_numpy=True).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save(model_dir, overwrite=args.overwrite, save_anndata=args.save_anndata)
    adata.write_h5ad(out_h5ad)
    history = model.history
    validation = (f", validation {float(history['elbo_validation'].iloc[-1, 0]):.2f}"
                  if "elbo_validation" in history else "")
    _log(args, f"trained {len(history['elbo_train'])} epochs in {seconds:.1f} s; negative ELBO per cell: "
               f"train {float(history['elbo_train'].iloc[-1, 0]):.2f}{validation}")
    _log(args, f"wrote {model_dir}/ and {out_h5ad} (obsm[{args.latent_key!r}]"
               + (f", layers[{args.normalized_layer!r}])" if args.normalized_layer else ")"))
    if args.plots:
        _write_train_plots(args, model, adata, out, name)
    return EXIT_OK


def _annotate_reference(args):
    """A trained SCANVI: loaded from a model directory, or trained (scVI then scANVI) on an .h5ad."""
    from . import SCANVI, SCVI

    source = Path(args.reference)
    if source.is_dir() and (source / "model.pt").is_file():
        _log(args, f"loading the scANVI reference model {source}")
        return SCANVI.load(source)
    reference = read_input(args.reference, var_names=args.var_names)
    _log(args, f"read {args.reference}: {reference.n_obs} cells x {reference.n_vars} genes")
    if args.labels_key not in reference.obs:
        raise KeyError(f"The reference has no obs[{args.labels_key!r}]: pass the column of cell types with "
                       "--labels-key.")
    labelled = int(np.sum(reference.obs[args.labels_key].astype(str) != str(args.unlabeled_category)))
    if labelled == 0:
        raise ValueError(f"No reference cell has a label in obs[{args.labels_key!r}] (all are "
                         f"{args.unlabeled_category!r}): scANVI needs labelled reference cells.")
    SCVI.setup_anndata(reference, layer=args.layer, batch_key=args.batch_key)
    scvi = SCVI(reference, n_latent=args.n_latent, n_layers=args.n_layers,
                encode_covariates=args.batch_key is not None)
    scvi.train(max_epochs=args.scvi_epochs, batch_size=args.batch_size, enable_progress_bar=not args.quiet)
    model = SCANVI.from_scvi_model(scvi, args.unlabeled_category, labels_key=args.labels_key)
    model.train(max_epochs=args.scanvi_epochs, batch_size=args.batch_size, enable_progress_bar=not args.quiet)
    accuracy = model.history.get("train_accuracy")
    accuracy = "" if accuracy is None else f", labelled-cell accuracy {float(accuracy.iloc[-1, 0]):.3f}"
    _log(args, f"trained the reference: scVI {len(scvi.history['elbo_train'])} epochs, scANVI "
               f"{len(model.history['elbo_train'])} epochs{accuracy}")
    return model


def cmd_annotate(args) -> int:
    import pandas as pd
    import torch

    from . import SCANVI, settings

    out = Path(args.out)
    _check_output(out, args.overwrite)
    if args.save_model:
        _check_output(Path(args.save_model), args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings.seed = args.seed
    settings.progress_bar = not args.quiet
    query = read_input(args.query, var_names=args.var_names)
    _log(args, f"read {args.query}: {query.n_obs} cells x {query.n_vars} genes")
    reference = _annotate_reference(args)
    batch_key = reference.registry_.setup_args.get("batch_key")
    if batch_key is not None and batch_key not in query.obs:
        query.obs[batch_key] = "query"
        _log(args, f"the query has no obs[{batch_key!r}]: its cells form one new batch 'query'")
    layer = reference.registry_.setup_args.get("layer")
    if layer is not None and layer not in query.layers:
        raise KeyError(f"The reference was set up with layer={layer!r}, which the query lacks.")
    SCANVI.prepare_query_anndata(query, reference)
    model = SCANVI.load_query_data(query, reference)
    model.train(max_epochs=args.query_epochs, batch_size=args.batch_size,
                plan_kwargs={"weight_decay": 0.0}, enable_progress_bar=not args.quiet)
    soft = model.predict(soft=True)
    query.obs[args.key] = pd.Categorical(soft.idxmax(axis=1).to_numpy(), categories=list(soft.columns))
    query.obs[f"{args.key}_probability"] = soft.max(axis=1).to_numpy(dtype=np.float32)
    query.obsm[args.latent_key] = model.get_latent_representation()
    out.parent.mkdir(parents=True, exist_ok=True)
    query.write_h5ad(out)
    if args.save_model:
        reference.save(Path(args.save_model) / "reference", overwrite=args.overwrite)
        model.save(Path(args.save_model) / "query", overwrite=args.overwrite)
    counts = query.obs[args.key].value_counts()
    _log(args, f"wrote {out}: obs[{args.key!r}] ("
               + ", ".join(f"{label} {n}" for label, n in counts.items() if n)
               + f"), obs[{args.key + '_probability'!r}] and obsm[{args.latent_key!r}]")
    return EXIT_OK


def _model_genes(adata, model_dir: str, prefix: str | None):
    """``adata`` restricted to the genes of the saved model, in its order (unchanged if they match).

    A model trained on selected genes (``train --n-top-genes``) applies to the full file it came from.
    """
    from . import SCVI

    names = Registry.coerce(SCVI.load_registry(model_dir, prefix=prefix)).var_names
    if names is None:
        return adata
    names = [str(name) for name in names]
    if len(names) == adata.n_vars and list(map(str, adata.var_names)) == names:
        return adata
    present = set(map(str, adata.var_names))
    missing = [name for name in names if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"The input lacks {len(missing)} of the model's {len(names)} genes ({shown}): "
                         "pass data with every gene the model was trained on.")
    if not adata.var_names.is_unique:
        raise ValueError("The input's var_names are not unique: make them unique (var_names_make_unique) "
                         "to select the model's genes.")
    return adata[:, names].copy()


def _read_for_model(args, keep_all_genes: bool = False):
    """The model and the input restricted to its genes; with ``keep_all_genes`` also the whole input."""
    adata = read_input(args.input, var_names=getattr(args, "var_names", "gene_symbols"))
    _log(args, f"read {args.input}: {adata.n_obs} cells x {adata.n_vars} genes")
    _check_model_dir(args.model, args.prefix)
    selected = _model_genes(adata, args.model, args.prefix)
    if selected is not adata:
        _log(args, f"using the model's {selected.n_vars} genes of the input's {adata.n_vars}")
    model = _load_model(args.model, selected, prefix=args.prefix)
    return (model, selected, adata) if keep_all_genes else (model, selected)


def cmd_latent(args) -> int:
    from . import settings

    _require_plotting(args)
    out = Path(args.out)
    _check_output(out, args.overwrite)
    settings.progress_bar = not args.quiet
    model, selected, adata = _read_for_model(args, keep_all_genes=True)
    latent = model.get_latent_representation(selected, give_mean=not args.sample, batch_size=args.batch_size)
    adata.obsm[args.key] = latent  # the input with all its genes
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        import pandas as pd

        columns = [f"z{i}" for i in range(latent.shape[1])]
        pd.DataFrame(latent, index=adata.obs_names, columns=columns).to_csv(out)
    else:
        adata.write_h5ad(out)
    _log(args, f"wrote {out} ({latent.shape[0]} cells x {latent.shape[1]} latent dimensions"
               + ("" if out.suffix == ".csv" else f" in obsm[{args.key!r}]") + ")")
    if args.plots:
        colors = args.color
        if colors is None:
            colors = [c for c in _registry_keys(model) if c in adata.obs]
        written = _write_latent_plots(args, latent, adata, out.with_suffix(""), colors)
        _log(args, "plots: " + ", ".join(str(p) for p in written))
    return EXIT_OK


def _split_list(values) -> list[str] | None:
    if not values:
        return None
    return [v for value in values for v in value.split(",") if v]


def cmd_normalize(args) -> int:
    import pandas as pd

    out = Path(args.out)
    _check_output(out, args.overwrite)
    as_csv = args.csv or out.suffix == ".csv"
    model, adata = _read_for_model(args)
    genes = _split_list(args.genes)
    if genes:
        missing = [g for g in genes if g not in set(adata.var_names)]
        if missing:
            raise KeyError(f"Genes not in the data or not among the model's genes: "
                           f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    transform_batch = _split_list(args.transform_batch)
    if transform_batch is not None and len(transform_batch) == 1:
        transform_batch = transform_batch[0]
    values = model.get_normalized_expression(
        adata, transform_batch=transform_batch, gene_list=genes, library_size=args.library_size,
        n_samples=args.n_samples, batch_size=args.batch_size, return_mean=True, return_numpy=True,
        silent=args.quiet,
    ).astype(np.float32)
    names = genes if genes else list(adata.var_names)
    out.parent.mkdir(parents=True, exist_ok=True)
    if as_csv:
        pd.DataFrame(values, index=adata.obs_names, columns=names).to_csv(out)
    else:
        if genes:
            adata = adata[:, genes].copy()
        adata.layers[args.layer_name] = values
        adata.write_h5ad(out)
    _log(args, f"wrote {out} ({values.shape[0]} cells x {values.shape[1]} genes"
               + ("" if as_csv else f" in layers[{args.layer_name!r}]") + ")")
    return EXIT_OK


def cmd_de(args) -> int:
    import pandas as pd

    _require_plotting(args)
    out = Path(args.out)
    _check_output(out, args.overwrite)
    model, adata = _read_for_model(args)
    if args.groupby not in adata.obs:
        raise KeyError(f"--groupby {args.groupby!r} is not a column of adata.obs "
                       f"(columns: {list(adata.obs.columns)}).")
    categories = set(map(str, adata.obs[args.groupby].astype(str)))
    group1 = _split_list(args.group1)
    for group in (group1 or []) + ([args.group2] if args.group2 else []):
        if group not in categories:
            raise ValueError(f"Group {group!r} is not a value of obs[{args.groupby!r}] "
                             f"(values: {sorted(categories)[:20]}).")
    if not isinstance(adata.obs[args.groupby].dtype, pd.CategoricalDtype):
        adata.obs[args.groupby] = adata.obs[args.groupby].astype(str).astype("category")
    kwargs = {"n_samples_overall": args.n_samples} if args.n_samples else {}
    table = model.differential_expression(
        adata, groupby=args.groupby, group1=group1, group2=args.group2, mode=args.mode, delta=args.delta,
        fdr_target=args.fdr, batch_correction=args.batch_correction, silent=args.quiet, **kwargs,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out)
    n_comparisons = table["comparison"].nunique() if "comparison" in table else 1
    _log(args, f"wrote {out} ({len(table)} rows, {n_comparisons} comparison(s), mode {args.mode})")
    if args.plots:
        from . import plotting

        fig = plotting.plot_volcano(table, top_n=args.top_n)
        path = plotting.save_figure(fig, out.with_name(f"{out.stem}_volcano.png"))
        _log(args, f"plots: {path}")
    return EXIT_OK


def cmd_info(args) -> int:
    from . import SCVI

    if args.kernel:
        from .distributions import kernel_choice, negative_binomial
        from .io.slot_file import copy_path

        print(kernel_choice.report(negative_binomial.torch_formula_log_prob))
        print(f"Checkpoints copy tensors with: {copy_path()}")
        if args.model is None:
            return EXIT_OK
    if args.model is None:
        raise ValueError("pyro-scvi info needs a model directory (or --kernel for the kernel self-check).")
    directory = Path(args.model)
    model_file = directory / f"{args.prefix or ''}model.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"No model in {directory} (expected {model_file.name}).")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SCVI.load(directory, adata=None, prefix=args.prefix)
    registry = Registry.coerce(SCVI.load_registry(directory, prefix=args.prefix))  # as the file records it
    made_by = (f"pyro-scvi {registry.pyro_scvi_version}" if registry.pyro_scvi_version
               else f"scvi-tools {registry.scvi_version or '?'}")
    print(f"Model directory: {directory}")
    print(f"Saved by: {made_by} (model class {registry.model_name})")
    print(model.summary_string)
    setup = io.StringIO()
    with contextlib.redirect_stdout(setup):
        SCVI.view_setup_args(directory, prefix=args.prefix)
    print(setup.getvalue().rstrip())
    stats = model.summary_stats
    print(f"Data at setup: {stats.get('n_cells', '?')} cells x {stats.get('n_vars', '?')} genes, "
          f"{stats.get('n_batch', 1)} batch(es), {stats.get('n_labels', 1)} label(s)")
    for field, title in (("batch", "batches"), ("labels", "labels")):
        if field not in registry.fields:
            continue
        mapping, key = registry.field(field).categories, registry.field(field).original_key
        if mapping is not None and len(mapping) and key and not str(key).startswith("_scvi"):
            shown = ", ".join(map(str, list(mapping)[:20])) + (" ..." if len(mapping) > 20 else "")
            print(f"  {title} ({key}): {shown}")
    history = model.history or {}
    if "elbo_train" in history and len(history["elbo_train"]):
        line = (f"Training: {len(history['elbo_train'])} epochs, final negative ELBO per cell: train "
                f"{float(history['elbo_train'].iloc[-1, 0]):.2f}")
        if "elbo_validation" in history and len(history["elbo_validation"]):
            line += f", validation {float(history['elbo_validation'].iloc[-1, 0]):.2f}"
        print(line)
    else:
        print("Training: no history saved")
    return EXIT_OK


def cmd_demo(args) -> int:
    _print_report(run_demo(args.out, args.epochs, args.seed, args.quiet, plots=args.plots))
    return EXIT_OK


# ============================================================================ parser
_EPILOG = """\
exit codes:
  0  success
  1  data or model error (missing file, unknown key or group, unreadable model, training failure):
     a one-line 'error: <message>' on stderr
  2  usage error (unknown option, bad option value): argparse's message on stderr
  130 interrupted (Ctrl-C)

inputs: .h5ad, a 10x Genomics .h5 file (Cell Ranger v2/v3) or a 10x matrix directory
(matrix.mtx[.gz], features.tsv[.gz] or genes.tsv[.gz], barcodes.tsv[.gz]).
Model directories written by 'pyro-scvi train' or by scvi-tools 1.x (model.save) are accepted.

examples:
  pyro-scvi train pbmc.h5ad --batch-key batch --labels-key cell_type --out results --plots
  pyro-scvi train pbmc.h5ad --batch-key batch --n-top-genes 2000 --out results
  pyro-scvi latent results/model new_cells.h5ad -o new_cells_scvi.h5ad
  pyro-scvi normalize results/model pbmc.h5ad -o normalized.csv --genes CD3E,MS4A1
  pyro-scvi de results/model pbmc.h5ad --groupby cell_type --group1 B -o de_B.csv --mode change
  pyro-scvi annotate reference.h5ad query.h5ad --labels-key cell_type --batch-key batch -o query_typed.h5ad
  pyro-scvi info results/model
  pyro-scvi info --kernel
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to option help unless the default is None/False or already described."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.option_strings
                and not any(action.default is skip for skip in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


def _add_common(parser, plots: bool = False, embedding: bool = False) -> None:
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars, warnings or messages; only errors (on stderr)")
    if plots:
        parser.add_argument("--plots", action="store_true",
                            help="also write PNG plots next to the outputs (needs matplotlib)")
    if embedding:
        parser.add_argument("--color", action="append", metavar="COLUMN",
                            help="obs column to colour the latent plot by (repeat for several plots; "
                                 "default: the model's labels and batch keys)")
        parser.add_argument("--embedding", choices=["auto", "umap", "pca"], default="auto",
                            help="2-D embedding for the latent plot: umap needs umap-learn; auto uses it "
                                 "when installed, else PCA")


def _add_model_input(parser) -> None:
    parser.add_argument("model", help="model directory (from 'pyro-scvi train' or scvi-tools' model.save)")
    parser.add_argument("input", help="data: .h5ad, 10x .h5 or 10x matrix directory, with the model's genes "
                                      "(more genes are fine: the model's are used) and the obs columns "
                                      "(batch, labels) the model was set up with")
    parser.add_argument("--prefix", default=None,
                        help="file name prefix of the saved model (model.save(prefix=...))")
    parser.add_argument("--var-names", choices=VAR_NAMES, default="gene_symbols",
                        help="for 10x inputs: name genes by symbol or by id")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="minibatch size for inference (default: settings.batch_size)")



def _train_data_options(parser) -> None:
    parser.add_argument("input", help="raw counts: .h5ad, 10x .h5 file or 10x matrix directory")
    data = parser.add_argument_group("data")
    data.add_argument("--layer", default=None, help="AnnData layer with the raw counts (default: X)")
    data.add_argument("--batch-key", default=None,
                      help="obs column with the batch of each cell (batch correction)")
    data.add_argument("--labels-key", default=None,
                      help="obs column with cell labels (used by the model's labels covariate and for plots)")
    data.add_argument("--categorical-covariate", action="append", metavar="COLUMN",
                      help="obs column of an extra categorical covariate (repeat for several)")
    data.add_argument("--continuous-covariate", action="append", metavar="COLUMN",
                      help="obs column of an extra continuous covariate (repeat for several)")
    data.add_argument("--var-names", choices=VAR_NAMES, default="gene_symbols",
                      help="for 10x inputs: name genes by symbol or by id")
    data.add_argument("--n-top-genes", type=_positive_int, default=None, metavar="N",
                      help="train on the N most variable genes (Seurat v3 rule on the counts, as scanpy's "
                           "flavor='seurat_v3'; needs scanpy or scikit-misc: pip install pyro-scvi[hvg]); "
                           "the model and the output .h5ad hold those genes")
    data.add_argument("--hvg-batch-key", default=None, metavar="COLUMN",
                      help="obs column whose batches rank genes separately for --n-top-genes "
                           "(default: --batch-key)")


def _train_model_options(parser) -> None:
    from .models.likelihoods import BUILTIN_LIKELIHOODS
    from .models.module import DISPERSIONS, LATENT_DISTRIBUTIONS

    arch = parser.add_argument_group("model")
    arch.add_argument("--n-latent", type=_positive_int, default=10, help="dimension of the latent space z")
    arch.add_argument("--n-hidden", type=_positive_int, default=128, help="units per hidden layer")
    arch.add_argument("--n-layers", type=_positive_int, default=1,
                      help="hidden layers in encoder and decoder")
    arch.add_argument("--dropout-rate", type=float, default=0.1, help="encoder dropout rate")
    arch.add_argument("--gene-likelihood", choices=BUILTIN_LIKELIHOODS, default="zinb",
                      help="count distribution: zero-inflated negative binomial, negative binomial, Poisson "
                           "or normal")
    arch.add_argument("--dispersion", choices=DISPERSIONS, default="gene",
                      help="how the negative binomial dispersion is shared")
    arch.add_argument("--latent-distribution", choices=LATENT_DISTRIBUTIONS, default="normal",
                      help="latent distribution: normal or logistic normal")


def _train_fit_options(parser) -> None:
    from .infer.distributed import STRATEGIES

    fit = parser.add_argument_group("training")
    fit.add_argument("--max-epochs", "--epochs", type=_positive_int, default=None, dest="max_epochs",
                     help="training epochs (default: scvi-tools' heuristic, min(400, 400*20000/cells))")
    fit.add_argument("--batch-size", type=_positive_int, default=128, help="minibatch size")
    fit.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    fit.add_argument("--train-size", type=_fraction, default=0.9,
                     help="fraction of cells for training (the rest validates)")
    fit.add_argument("--check-val-every", type=_positive_int, default=1,
                     help="compute the validation ELBO every N epochs")
    fit.add_argument("--early-stopping", action="store_true",
                     help="stop when the validation ELBO stops improving (patience 45)")
    fit.add_argument("--kl-warmup-epochs", type=int, default=None,
                     help="epochs of KL warm-up (default: 400, as scvi-tools)")
    fit.add_argument("--seed", type=int, default=0, help="random seed (split, initialisation, minibatches)")
    fit.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="device to train on")
    fit.add_argument("--threads", type=_positive_int, default=None,
                     help="CPU threads for torch (default: torch's)")
    fit.add_argument("--devices", type=_positive_int, default=None,
                     help="devices (processes) to train on; more than 1 means data-parallel (DDP): "
                          "start with torchrun --nproc_per_node=N -m pyro_scvi train ... --devices N "
                          "--strategy ddp")
    fit.add_argument("--strategy", choices=STRATEGIES, default="auto",
                     help="'ddp': data-parallel training across the processes started by torchrun "
                          "(gloo on CPU, nccl on GPU)")
    fit.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                     help="write a checkpoint of the whole training state to DIR (every "
                          "--checkpoint-every epochs and after the last); with --resume, continue from it")
    fit.add_argument("--checkpoint-every", type=_positive_int, default=1, metavar="N",
                     help="epochs between checkpoints")
    fit.add_argument("--resume", action="store_true",
                     help="continue the run whose checkpoints are in --checkpoint-dir (same data and "
                          "options): it ends where the uninterrupted run would have ended")


def _train_output_options(parser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--out", "-o", default="pyro_scvi_output", help="output directory")
    output.add_argument("--name", default=None, help="name of the output .h5ad (default: <input name>_scvi)")
    output.add_argument("--latent-key", default="X_scVI", help="obsm key for the latent representation")
    output.add_argument("--normalized-layer", default=None, metavar="NAME",
                        help="also store the normalized expression (library_size x rho) in layers[NAME]")
    output.add_argument("--library-size", type=_library_size, default=1e4,
                        help="library size for --normalized-layer (a number, or 'latent' for the NB mean)")
    output.add_argument("--save-anndata", action="store_true",
                        help="also save the AnnData inside the model directory")
    output.add_argument("--overwrite", action="store_true",
                        help="replace OUT/model and the .h5ad if they exist")
    _add_common(output, plots=True, embedding=True)


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train", formatter_class=_Formatter,
        help="train scVI on a count matrix and write the model and the latent space",
        description="Train scVI on raw counts. Writes OUT/model/ (load with SCVI.load or the other "
                    "subcommands) and OUT/NAME.h5ad: the input with obsm['X_scVI'] (and the normalized "
                    "expression with --normalized-layer).",
    )
    _train_data_options(train)
    _train_model_options(train)
    _train_fit_options(train)
    _train_output_options(train)
    train.set_defaults(func=cmd_train)


def _add_latent(commands) -> None:
    latent = commands.add_parser(
        "latent", formatter_class=_Formatter,
        help="write the latent representation of cells under a trained model",
        description="Load MODEL, compute the posterior mean of z for each cell of INPUT and write INPUT with "
                    "obsm[KEY] as .h5ad (or the matrix alone when OUT ends in .csv).",
    )
    _add_model_input(latent)
    latent.add_argument("--out", "-o", required=True, help="output .h5ad (or .csv)")
    latent.add_argument("--key", default="X_scVI", help="obsm key to store the latent representation under")
    latent.add_argument("--sample", action="store_true",
                        help="one posterior sample per cell instead of the posterior mean")
    _add_common(latent, plots=True, embedding=True)
    latent.set_defaults(func=cmd_latent)


def _add_normalize(commands) -> None:
    normalize = commands.add_parser(
        "normalize", formatter_class=_Formatter, help="write denoised, normalized expression",
        description="Load MODEL and write the normalized expression (library_size x rho, batch-corrected "
                    "with --transform-batch) of INPUT's cells as a layer of an .h5ad, or as a cells x genes "
                    "CSV.",
    )
    _add_model_input(normalize)
    normalize.add_argument("--out", "-o", required=True, help="output .h5ad (or .csv)")
    normalize.add_argument("--csv", action="store_true",
                           help="write a cells x genes CSV (also chosen by a .csv suffix)")
    normalize.add_argument("--layer-name", default="scvi_normalized", help="layer of the output .h5ad")
    normalize.add_argument("--library-size", type=_library_size, default=1e4,
                           help="scale of each cell's expression (a number, or 'latent' for the NB mean)")
    normalize.add_argument("--n-samples", type=_positive_int, default=1,
                           help="posterior samples averaged per cell")
    normalize.add_argument("--transform-batch", action="append", metavar="BATCH",
                           help="decode every cell in this batch category (comma-separated or repeated: "
                                "averaged)")
    normalize.add_argument("--genes", action="append", metavar="GENES",
                           help="only these genes (comma-separated or repeated); the .h5ad output is then "
                                "subset to them")
    _add_common(normalize)
    normalize.set_defaults(func=cmd_normalize)


def _add_de(commands) -> None:
    de = commands.add_parser(
        "de", formatter_class=_Formatter,
        help="Bayesian differential expression between groups of cells (CSV)",
        description="Load MODEL and test every gene between groups of INPUT's cells defined by an obs "
                    "column; write the table of SCVI.differential_expression as CSV (one block of rows per "
                    "comparison).",
    )
    _add_model_input(de)
    de.add_argument("--out", "-o", required=True, help="output CSV")
    de.add_argument("--groupby", required=True, help="obs column defining the groups")
    de.add_argument("--group1", action="append", metavar="GROUP",
                    help="group(s) to test, each against --group2 (comma-separated or repeated; "
                         "default: every group)")
    de.add_argument("--group2", default=None, help="reference group (default: all other cells, 'Rest')")
    de.add_argument("--mode", choices=DE_MODES, default="change",
                    help="vanilla: P(rho1 > rho2); change: P(|log fold change| > delta) with FDR control")
    de.add_argument("--delta", type=float, default=0.25, help="log fold change threshold of the change mode")
    de.add_argument("--fdr", type=float, default=0.05,
                    help="target false discovery rate (is_de_fdr_<fdr> column)")
    de.add_argument("--batch-correction", action="store_true",
                    help="decode each group in every batch (batch-corrected DE)")
    de.add_argument("--n-samples", type=_positive_int, default=None,
                    help="posterior samples per group (default: 5000)")
    de.add_argument("--top-n", type=int, default=10, help="genes labelled in the volcano plot")
    _add_common(de, plots=True)
    de.set_defaults(func=cmd_de)


def _add_annotate(commands) -> None:
    annotate = commands.add_parser(
        "annotate", formatter_class=_Formatter,
        help="transfer cell types from a labelled reference to a query (scANVI + scArches)",
        description="Train scVI then scANVI on REFERENCE (an .h5ad with cell types in obs[LABELS_KEY]; "
                    "cells without one carry --unlabeled-category), or load a saved scANVI model "
                    "directory; map QUERY onto it (scArches: only the weights of its new batches train) "
                    "and write QUERY with the predicted cell type in obs[KEY], its probability in "
                    "obs[KEY_probability] and the latent space in obsm[LATENT_KEY].",
    )
    annotate.add_argument("reference", help="labelled reference: .h5ad/10x data, or a SCANVI model directory")
    annotate.add_argument("query", help="query data (.h5ad or 10x) with the reference's genes (missing ones "
                                        "are zero-padded)")
    annotate.add_argument("--out", "-o", required=True, help="output .h5ad: the query with its predictions")
    annotate.add_argument("--labels-key", default="cell_type",
                          help="obs column of the reference's cell types")
    annotate.add_argument("--unlabeled-category", default="Unknown",
                          help="value of obs[LABELS_KEY] for reference cells without a cell type")
    annotate.add_argument("--batch-key", default=None,
                          help="obs column of batches (the query's batches are new categories; a query "
                               "without the column is one batch)")
    annotate.add_argument("--layer", default=None, help="layer with the raw counts (default: X)")
    annotate.add_argument("--key", default="predicted_cell_type", help="obs column for the predictions")
    annotate.add_argument("--latent-key", default="X_scANVI", help="obsm key for the query's latent space")
    annotate.add_argument("--n-latent", type=_positive_int, default=10, help="dimension of z")
    annotate.add_argument("--n-layers", type=_positive_int, default=1, help="hidden layers per network")
    annotate.add_argument("--scvi-epochs", type=_positive_int, default=None,
                          help="scVI epochs on the reference (default: scvi-tools' heuristic)")
    annotate.add_argument("--scanvi-epochs", type=_positive_int, default=None,
                          help="scANVI epochs on the reference (default: scvi-tools' for a pretrained "
                               "scVI, 2-10)")
    annotate.add_argument("--query-epochs", type=_positive_int, default=100, help="epochs on the query")
    annotate.add_argument("--batch-size", type=_positive_int, default=128, help="minibatch size")
    annotate.add_argument("--seed", type=int, default=0, help="random seed")
    annotate.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")
    annotate.add_argument("--var-names", choices=VAR_NAMES, default="gene_symbols",
                          help="for 10x inputs: name genes by symbol or by id")
    annotate.add_argument("--save-model", default=None, metavar="DIR",
                          help="also save the reference and query models in DIR/reference and DIR/query")
    annotate.add_argument("--overwrite", action="store_true", help="replace the outputs if they exist")
    _add_common(annotate)
    annotate.set_defaults(func=cmd_annotate)


def _add_info(commands) -> None:
    info = commands.add_parser(
        "info", formatter_class=_Formatter,
        help="describe a saved model (pyro-scvi's or scvi-tools'), or check the fused kernel (--kernel)",
        description="Print the summary, setup_anndata arguments, data dimensions, categories and training "
                    "history of a saved model directory (from 'pyro-scvi train', SCVI.save or "
                    "scvi-tools 1.x). With --kernel, check the fused NB/ZINB kernel on this machine: CPU, "
                    "compiler and flags, whether its loops are vectorised, its speed against the torch "
                    "formula, and which of the two training uses.",
    )
    info.add_argument("model", nargs="?", default=None, help="model directory")
    info.add_argument("--kernel", action="store_true",
                      help="self-check of the fused NB/ZINB log-density kernel on this machine")
    info.add_argument("--prefix", default=None, help="file name prefix of the saved model")
    info.set_defaults(func=cmd_info, quiet=False)


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo", formatter_class=_Formatter,
        help="train on generated data with batches and cell types and write the latent space",
        description="Generate 1200 cells (3 batches, 4 cell types) x 1000 genes, train scVI, write "
                    "OUT/demo.h5ad and OUT/model/, and print a report (also with --quiet).",
    )
    demo.add_argument("--out", default="demo_output", help="output directory")
    demo.add_argument("--epochs", type=int, default=80, help="training epochs")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--quiet", action="store_true", help="no progress bar (the report is still printed)")
    demo.add_argument("--plots", action="store_true",
                      help="also write training and latent PNG plots into OUT (the latent space as UMAP "
                           "when umap-learn is installed: pip install pyro-scvi[plot]; else PCA)")
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pyro-scvi", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="scVI (single-cell Variational Inference) on Pyro, with scvi-tools' SCVI model files.",
    )
    parser.add_argument("--version", action="version", version=f"pyro-scvi {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_latent, _add_normalize, _add_de, _add_annotate, _add_info, _add_demo):
        add(commands)
    return parser


def _library_size(text: str):
    if text == "latent":
        return "latent"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'latent', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value



# ============================================================================ entry point
def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 data/model error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else (EXIT_OK if exit_.code is None else EXIT_USAGE)
    quiet = bool(getattr(args, "quiet", False)) and args.command != "demo"
    from . import settings

    previous_progress = settings.progress_bar
    try:
        with contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as error:
        print(f"error: {_message(error)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        settings.progress_bar = previous_progress


if __name__ == "__main__":
    sys.exit(main())
