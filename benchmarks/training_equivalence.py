"""Training equivalence with scvi-tools: the same step, tensor by tensor.

Both packages start from the same weights (pyro-scvi's initial weights, exported to scvi-tools'
names), see the same minibatches in the same order and the same reparameterisation noise ε, and
are compared step by step:

* the loss and its terms (reconstruction, KL of z) and the KL weight of every step;
* every parameter's gradient at the first step (and which parameters receive one at all);
* the optimiser update of the first step and Adam's moment estimates after it;
* parameters and buffers (BatchNorm running statistics, ``num_batches_tracked``) after steps
  1–10 and every 10th step (``--every``) up to ``--steps``;
* pyro-scvi's gradients at scvi-tools' weights of each of those steps, on the minibatch, ε,
  dropout masks and KL weight of the step scvi-tools took from there.

How the two runs are made the same, without changing either package's training loop:

* scvi-tools runs its real ``SCVI.train`` (Lightning loop, ``TrainingPlan``, ``AnnDataLoader``)
  in a child process with its own venv (``--scvi-python``). The harness wraps three things there:
  ``AnnTorchDataset.__getitem__`` tags each minibatch with its cells' row numbers,
  ``Normal.rsample`` records the ε of every draw inside a training step, and ``Adam.step``
  records gradients (it evaluates Lightning's closure first, then steps, which is what
  ``Adam.step(closure)`` does) and snapshots the weights after the step.
* pyro-scvi then runs its real ``SCVI.train`` in a child process of this Python with
  ``RegisteredData.iterate`` wrapped to take each epoch's cell order from the scvi-tools record (instead of
  ``torch.randperm``), ``Normal.rsample`` to replay the recorded ε, and ``Adam.step`` to record
  the same quantities. Afterwards it loads scvi-tools' weights of each snapshot and computes the
  gradient of the next step there (same minibatch, ε and KL weight) through ``CellMeanELBO``.
* Both use the same train/validation split (``datasplitter_kwargs={"external_indexing": …}``),
  ``batch_size=128``, default ``plan_kwargs`` and the default ``dropout_rate=0.1``: the harness
  wraps ``torch.nn.functional.dropout`` (what ``nn.Dropout`` calls) on both sides to record
  scvi-tools' masks and replay them here, as it does with ε (``--dropout 0`` turns dropout off).

Tolerances (relative, ``‖ours − theirs‖ / ‖theirs‖`` per tensor):

* 1e-5 for the first step's loss terms, gradients, optimiser update and Adam moments; the KL
  weight of every step must agree to 1e-7 and ``num_batches_tracked`` exactly;
* 1e-4 for parameters and buffers over the first 20 steps (five epochs of ``cellbench_3cl``,
  so epoch boundaries and the short last minibatch are inside);
* 1e-3 for every snapshot up to ``--steps`` (float32 round-off drifts because the order of
  operations differs), except as documented below;
* 1e-4 for the gradients that pyro-scvi computes at scvi-tools' weights of each snapshot, on the
  minibatch, ε and KL weight of the step that scvi-tools took from there.

Deviations that are by design, which the harness reports instead of failing on:

* gradients that are exactly zero (a Linear bias followed by BatchNorm; with KL weight 0, the
  bias of the z mean) are round-off on both sides; they are checked to be round-off-sized
  (``‖g‖ / ‖all g‖ ≤ 1e-6``) rather than compared as ratios;
* training dynamics amplify round-off. With ``nb`` and batch covariates on ``cellbench_3cl``
  (seed 0) the free-running weights jump apart at steps 21 and 28, each time in one whole row of
  the encoder's first layer (rows 18 and 40: one hidden unit's gradient changed for some cell, as
  when a 1e-7 difference moves a cell across a ReLU's kink), while the gradient of those very
  steps computed from the same weights agrees to 1e-6 in every entry; the
  runs are 1e-3 apart after ~35 steps and 6–9e-2 after 200, while pyro-scvi's gradients at
  scvi-tools' own weights agree with scvi-tools' to 2e-5 at *every* one of those steps
  (``--every 1``). So a drift beyond 1e-3 passes as a *documented deviation* only when the
  gradients at the reference's weights agree (1e-4, each tensor against at least 1e-3 of the
  whole gradient's norm) at every checked step (1–11 and every ``--every``-th): then the two
  packages compute the same training step, and the parting is chaos, not semantics. For scale
  the harness prints how far scvi-tools parts from itself when started from weights one float32
  ulp apart (4e-2 after 200 steps in that configuration without dropout, 1e-5 with dropout: it
  depends on which kinks a perturbation happens to hit).

The first step and tensor where the two part is printed; the exit status is 1 when any check fails.

Run from the repository root::

    .venv/bin/python benchmarks/training_equivalence.py                     # 4 configurations
    .venv/bin/python benchmarks/training_equivalence.py --configs zinb-batch --steps 50

``--data`` (default ``cellbench_3cl``; ``generated`` when ../shared/data is absent) with the top
2000 genes by variance of log1p counts. See benchmarks/README.md for the results and the
documented deviations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_SCVI_PYTHON = "/work/scvi-venv/bin/python"
#: the scArches architecture of scvi-tools' reference-mapping tutorials (and bench_scanvi.py)
ARCHES = dict(n_layers=2, encode_covariates=True, deeply_inject_covariates=False, use_layer_norm="both",
              use_batch_norm="none")
CONFIGS = {
    "zinb-batch": ("zinb", True),
    "zinb-nobatch": ("zinb", False),
    "nb-batch": ("nb", True),
    "nb-nobatch": ("nb", False),
    "zinb-arches": ("zinb", True, ARCHES),
}
STEP_TOLERANCE = 1e-5   # first step: loss terms, gradients, update, Adam moments
EARLY_STEPS, EARLY_TOLERANCE = 20, 1e-4  # parameters and buffers over the first 20 steps (5 epochs here)
DRIFT_TOLERANCE = 1e-3  # parameters and buffers after up to --steps steps
FORCED_TOLERANCE = 1e-4  # gradients of each step taken from the reference's weights along its trajectory,
FORCED_FLOOR = 1e-3      # each against at least 1e-3 of the whole gradient's norm


def snapshot_steps(n_steps: int, every: int = 10) -> list[int]:
    """Optimiser steps after which the weights are compared: 1–10, then every ``every``-th, and the
    last."""
    return sorted({*range(1, min(10, n_steps) + 1), *range(10, n_steps + 1, every), n_steps})


# ------------------------------------------------------------------------------------------------
# The recorder, shared by both sides (the child imports this file with scvi-tools' Python)
# ------------------------------------------------------------------------------------------------
class Recorder:
    """Wraps ``Normal.rsample``, ``F.dropout`` and ``Adam.step`` to record (or replay) one training
    run.

    ``replay``: a record of the other side; its ε and dropout masks are used instead of fresh draws.
    ``names``: maps a parameter to its name in scvi-tools' state dict; ``state``: returns the
    module's state dict in scvi-tools' names.
    """

    def __init__(self, n_steps: int, every: int, names, state, replay: dict | None = None) -> None:
        self.n_steps, self.names, self.state = n_steps, names, state
        self.replay = replay
        self.snapshot_at = set(snapshot_steps(n_steps, every))
        self.in_step = False
        self.step = 0  # optimiser steps taken
        self.steps: list[dict] = []  # per training step: cells, ε, kl weight, loss terms
        self.snapshots: dict[int, dict] = {}
        self.first_grads: dict = {}
        #: gradients of the step taken from the weights of each snapshot (and from the initial weights)
        self.grads_at: dict[int, dict] = {}
        self.first_adam: dict = {}

    # training-step boundaries -------------------------------------------------------------------
    def begin_step(self, cells) -> None:
        self.in_step = True
        self.current = {"cells": np.asarray(cells, dtype=np.int64), "eps": [], "masks": []}
        if self.replay is not None:
            expected = self.replay["steps"][len(self.steps)]
            if not np.array_equal(expected["cells"], self.current["cells"]):
                raise RuntimeError(f"Minibatch {len(self.steps)} holds other cells than the record's.")
            self.pending_eps = list(expected["eps"])
            self.pending_masks = list(expected["masks"])

    def end_step(self, **terms) -> None:
        self.in_step = False
        self.current.update({k: float(v.detach()) if hasattr(v, "detach") else float(v)
                             for k, v in terms.items()})
        self.steps.append(self.current)

    # wrappers ----------------------------------------------------------------------------------
    def install(self):
        import torch

        recorder = self
        original_rsample = torch.distributions.Normal.rsample
        original_step = torch.optim.Adam.step
        original_dropout = torch.nn.functional.dropout

        def dropout(input, p=0.5, training=True, inplace=False):  # what nn.Dropout calls
            if not (recorder.in_step and training and p > 0):
                return original_dropout(input, p, training, inplace)
            if recorder.replay is not None:
                match = [i for i, m in enumerate(recorder.pending_masks)
                         if tuple(m.shape) == tuple(input.shape)]
                if not match:
                    raise RuntimeError(f"No recorded dropout mask of shape {tuple(input.shape)} "
                                       f"at step {len(recorder.steps)}.")
                keep = recorder.pending_masks.pop(match[0])
            else:
                keep = torch.rand(input.shape, device=input.device) >= p
            recorder.current["masks"].append(keep.clone())
            # torch's dropout: zero with probability p, scale the rest by 1/(1-p)
            return input * keep / (1 - p)

        def rsample(dist, sample_shape=torch.Size()):
            if not recorder.in_step:
                return original_rsample(dist, sample_shape)
            shape = dist._extended_shape(sample_shape)
            if recorder.replay is not None:
                match = [i for i, e in enumerate(recorder.pending_eps) if tuple(e.shape) == tuple(shape)]
                if not match:
                    raise RuntimeError(f"No recorded ε of shape {tuple(shape)} "
                                       f"at step {len(recorder.steps)}.")
                eps = recorder.pending_eps.pop(match[0]).to(dist.loc.dtype)
            else:
                eps = torch.randn(shape, dtype=dist.loc.dtype, device=dist.loc.device)
            recorder.current["eps"].append(eps.detach().clone())
            return dist.loc + eps * dist.scale

        def step(optimizer, closure=None):
            loss = None
            if closure is not None:  # Lightning: training step and backward happen in the closure
                with torch.enable_grad():
                    loss = closure()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            before = None
            if recorder.step == 0 or recorder.step in recorder.snapshot_at:
                recorder.grads_at[recorder.step] = {recorder.names[p]: p.grad.detach().clone()
                                                    for p in params if p.grad is not None}
            if recorder.step == 0:
                recorder.first_grads = recorder.grads_at[0]
                before = {recorder.names[p]: p.detach().clone() for p in params}
            original_step(optimizer)
            recorder.step += 1
            if before is not None:
                recorder.first_adam = {
                    recorder.names[p]: {
                        "update": p.detach() - before[recorder.names[p]],
                        "exp_avg": optimizer.state[p]["exp_avg"].detach().clone(),
                        "exp_avg_sq": optimizer.state[p]["exp_avg_sq"].detach().clone(),
                    }
                    for p in params if p in optimizer.state and "exp_avg" in optimizer.state[p]
                }
            if recorder.step in recorder.snapshot_at:
                recorder.snapshots[recorder.step] = {k: v.detach().clone()
                                                     for k, v in recorder.state().items()}
            return loss

        torch.distributions.Normal.rsample = rsample
        torch.optim.Adam.step = step
        torch.nn.functional.dropout = dropout

    def record(self) -> dict:
        return {"steps": self.steps, "snapshots": self.snapshots, "first_grads": self.first_grads,
                "grads_at": self.grads_at, "first_adam": self.first_adam}


# ------------------------------------------------------------------------------------------------
# scvi-tools side (child process)
# ------------------------------------------------------------------------------------------------
def run_scvi_tools(spec: dict) -> None:
    import anndata
    import scvi
    import torch
    from scvi.data._anntorchdataset import AnnTorchDataset
    from scvi.train import TrainingPlan

    torch.set_num_threads(spec["threads"])
    scvi.settings.seed = spec["seed"]
    adata = anndata.read_h5ad(spec["adata"])
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch" if spec["batch"] else None)
    model = scvi.model.SCVI(adata, gene_likelihood=spec["likelihood"], dropout_rate=spec["dropout"],
                            **spec.get("model_kwargs", {}))
    model.module.load_state_dict(torch.load(spec["init"], weights_only=True), strict=True)
    module = model.module
    if spec.get("perturb"):  # the reference against itself: every weight one float32 ulp up
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
    names = {p: n for n, p in module.named_parameters()}
    recorder = Recorder(spec["steps"], spec["every"], names, module.state_dict)
    recorder.install()

    original_getitem = AnnTorchDataset.__getitem__

    def getitem(dataset, indexes):  # tag every minibatch with the row numbers of its cells
        out = original_getitem(dataset, indexes)
        out["_cells"] = np.asarray([indexes] if isinstance(indexes, int) else indexes, dtype=np.int64)
        return out

    AnnTorchDataset.__getitem__ = getitem

    original_forward = TrainingPlan.forward
    original_training_step = TrainingPlan.training_step
    last = {}

    def forward(plan, *args, **kwargs):
        out = original_forward(plan, *args, **kwargs)
        last["loss"] = out[2]
        return out

    def training_step(plan, batch, batch_idx):
        recorder.begin_step(batch["_cells"].cpu().numpy())
        result = original_training_step(plan, batch, batch_idx)
        loss = last["loss"]
        recorder.end_step(
            epoch=plan.current_epoch, global_step=plan.global_step,
            kl_weight=plan.loss_kwargs["kl_weight"],
            loss=loss.loss, reconstruction=loss.reconstruction_loss["reconstruction_loss"].mean(),
            kl_z=loss.kl_local["kl_divergence_z"].mean(),
        )
        return result

    TrainingPlan.forward = forward
    TrainingPlan.training_step = training_step
    model.train(
        max_epochs=spec["epochs"], batch_size=128, enable_progress_bar=False, accelerator="cpu",
        datasplitter_kwargs={"external_indexing": [np.asarray(spec["train"]), np.asarray(spec["validation"]),
                                                   np.asarray([], dtype=np.int64)]},
    )
    record = recorder.record()
    record["version"] = scvi.__version__
    torch.save(record, spec["record"])


# ------------------------------------------------------------------------------------------------
# pyro-scvi side (this process)
# ------------------------------------------------------------------------------------------------
def make_pyro_model(adata, likelihood: str, batch: bool, seed: int, dropout: float, **model_kwargs):
    from pyro_scvi import SCVI, settings

    settings.seed = seed
    SCVI.setup_anndata(adata, batch_key="batch" if batch else None)
    return SCVI(adata, gene_likelihood=likelihood, dropout_rate=dropout, **model_kwargs)


def run_pyro_scvi(spec: dict) -> None:
    import anndata
    import torch

    from pyro_scvi.data.loader import RegisteredData
    from pyro_scvi.infer.elbo import CellMeanELBO
    from pyro_scvi.io.scvi_tools import to_scvi_tools_state_dict

    torch.set_num_threads(spec["threads"])
    theirs = torch.load(spec["record"], weights_only=False)
    model = make_pyro_model(anndata.read_h5ad(spec["adata"]), spec["likelihood"], spec["batch"], spec["seed"],
                            spec["dropout"], **spec.get("model_kwargs", {}))
    module = model.module
    module.load_state_dict(torch.load(spec["init_ours"], weights_only=True), strict=True)
    names = {p: n for n, p in to_scvi_tools_state_dict(dict(module.named_parameters())).items()}
    recorder = Recorder(spec["steps"], spec["every"], names,
                        lambda: to_scvi_tools_state_dict(module.state_dict()), replay=theirs)
    recorder.install()

    # each epoch's cell order, as scvi-tools' sampler drew it
    epochs: dict[int, list] = {}
    for step in theirs["steps"]:
        epochs.setdefault(int(step["epoch"]), []).append(step["cells"])
    orders = [np.concatenate(epochs[e]) for e in sorted(epochs)]
    original_iterate = RegisteredData.iterate

    def iterate(data, indices, batch_size, shuffle=False, drop_last=False, device="cpu", sparse=False):
        if not shuffle:
            yield from original_iterate(data, indices, batch_size, False, drop_last, device, sparse)
            return
        order = orders.pop(0)
        if sorted(order.tolist()) != sorted(np.asarray(indices).tolist()):
            raise RuntimeError("The recorded epoch does not hold the training cells.")
        yield from original_iterate(data, order, batch_size, False, drop_last, device, sparse)

    RegisteredData.iterate = iterate
    original_loss_and_grads = CellMeanELBO.loss_and_grads

    def loss_and_grads(elbo, model_fn, guide_fn, batch, *args, **kwargs):
        recorder.begin_step(theirs["steps"][len(recorder.steps)]["cells"])
        loss = original_loss_and_grads(elbo, model_fn, guide_fn, batch, *args, **kwargs)
        recorder.end_step(
            epoch=-1, global_step=len(recorder.steps), kl_weight=elbo.kl_weights.get("z", 1.0),
            loss=loss,
            reconstruction=elbo.last_reconstruction["x"].mean(), kl_z=elbo.last_kl["z"].mean(),
        )
        return loss

    CellMeanELBO.loss_and_grads = loss_and_grads
    try:
        model.train(max_epochs=spec["epochs"], batch_size=128, enable_progress_bar=False, accelerator="cpu",
                    datasplitter_kwargs={"external_indexing": [np.asarray(spec["train"]),
                                                               np.asarray(spec["validation"]),
                                                               np.asarray([], dtype=np.int64)]})
    finally:
        RegisteredData.iterate = original_iterate
        CellMeanELBO.loss_and_grads = original_loss_and_grads
    # the epoch of each step: from the KL weight's own schedule (pyro-scvi counts epochs internally)
    for step, ref in zip(recorder.steps, theirs["steps"]):
        step["epoch"] = ref["epoch"]
    record = recorder.record()
    record["forced_grads"] = forced_gradients(model, theirs, recorder,
                                              torch.load(spec["init_ours"], weights_only=True))
    torch.save(record, spec["record_ours"])


def forced_gradients(model, theirs: dict, recorder: Recorder, initial: dict) -> dict[int, dict]:
    """Gradients of pyro-scvi's training objective at the *reference's* weights along its trajectory.

    For each step ``s`` where scvi-tools recorded its weights (and ``s = 0``, the initial weights),
    load those weights here and compute one training step's loss and gradients on minibatch ``s + 1``
    with its ε and KL weight, through the same ``CellMeanELBO`` and model/guide functions that
    ``train`` uses. If these agree with scvi-tools' gradients of that step, the two packages take the
    same step from the same state all along, and any drift of the free-running trajectories is round
    -off amplified by the dynamics.
    """
    import pyro

    from pyro_scvi.infer.elbo import CellMeanELBO
    from pyro_scvi.io.scvi_tools import from_scvi_tools_state_dict

    module = model.module
    _, data = model.registered_data()
    out = {}
    for s in sorted(theirs["grads_at"]):
        if s >= len(theirs["steps"]):
            continue
        module.load_state_dict(from_scvi_tools_state_dict(theirs["snapshots"][s]) if s else initial,
                               strict=True)
        step = theirs["steps"][s]
        batch = data.minibatch(step["cells"])
        recorder.in_step, recorder.current = True, {"eps": [], "masks": []}
        recorder.pending_eps, recorder.pending_masks = list(step["eps"]), list(step["masks"])
        module.train()
        for p in module.parameters():
            p.grad = None
        with model.pyro_scope(), pyro.validation_enabled(False):
            CellMeanELBO({"z": step["kl_weight"]}).loss_and_grads(module.model, module.guide, batch)
        recorder.in_step = False
        out[s] = {recorder.names[p]: p.grad.detach().clone()
                  for p in module.parameters() if p.grad is not None}
    return out


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------
def relative(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (the absolute difference when ``b`` is zero)."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    norm = float(b.norm())
    diff = float((a - b).norm())
    return diff / norm if norm > 0 else diff


class Report:
    """Checks of one configuration: each a name, a measured value, a tolerance and whether it holds."""

    def __init__(self, config: str) -> None:
        self.config, self.rows, self.notes, self.ok = config, [], [], True

    def check(self, what: str, value: float, tolerance: float, detail: str = "") -> None:
        holds = value <= tolerance
        self.ok &= holds
        self.rows.append((what, value, tolerance, holds, detail))

    def print(self) -> None:
        print(f"\n== {self.config}: {'PASS' if self.ok else 'FAIL'}")
        for what, value, tolerance, holds, detail in self.rows:
            limit = "documented deviation" if math.isinf(tolerance) else f"tol {tolerance:g}"
            print(f"  {'ok  ' if holds else 'FAIL'} {what:<52} {value:10.3g}  "
                  f"({limit}){'  ' + detail if detail else ''}")
        for note in self.notes:
            print(f"  {note}")


def zero_by_design(names, kl_weight: float, decoder_batch_norm: bool = True) -> set[str]:
    """Parameters whose exact gradient is 0 at a step: the bias of a Linear layer followed by
    BatchNorm (BatchNorm subtracts the minibatch mean, so the loss is invariant to that bias), and
    with KL weight 0 the bias of the z mean (the decoder's first layer is followed by BatchNorm, which
    removes any shift of z shared by all cells, and no KL term sees it). Both packages return float32
    round-off there, and a ratio of two round-off vectors says nothing: these are checked to be
    round-off-sized instead."""
    names = set(names)
    out = {n for n in names if n.endswith(".0.bias") and n[: -len("0.bias")] + "1.weight" in names}
    if kl_weight == 0 and decoder_batch_norm:  # LayerNorm alone does not remove a shared shift of z
        out |= {n for n in names if n.endswith("z_encoder.mean_encoder.bias")}
    return out


def relative_all(ours: dict, theirs: dict, skip=(), floor: float = 0.0) -> dict:
    """:func:`relative` of every tensor present on both sides, except ``skip``; with ``floor``, each
    difference is taken against at least ``floor`` × the norm of all of ``theirs`` together."""
    import torch

    total = floor * norm_all(theirs) if floor else 0.0
    out = {}
    for k in set(ours) & set(theirs):
        if k not in skip:
            a, b = (torch.as_tensor(ours[k], dtype=torch.float64),
                    torch.as_tensor(theirs[k], dtype=torch.float64))
            out[k] = float((a - b).norm()) / max(float(b.norm()), total, 1e-300)
    return out


def norm_all(tensors: dict) -> float:
    import torch

    return math.sqrt(sum(float(torch.as_tensor(t, dtype=torch.float64).norm()) ** 2
                         for t in tensors.values()))


def worst(pairs: dict) -> tuple[float, str]:
    """The largest relative difference over named tensor pairs, and its tensor."""
    if not pairs:
        return 0.0, ""
    name = max(pairs, key=lambda k: pairs[k])
    return pairs[name], name


def self_drift(perturbed: dict, theirs: dict) -> dict[int, float]:
    """Per snapshot step: the largest relative difference between the reference and the reference
    started from weights one float32 ulp apart (how much the dynamics amplify round-off)."""
    out = {}
    for step, st in theirs["snapshots"].items():
        sp = perturbed["snapshots"][step]
        out[step] = max(relative(sp[k], st[k]) for k in st if not k.endswith("num_batches_tracked"))
    return out


def compare(config: str, ours: dict, theirs: dict, n_steps: int, baseline: dict[int, float],
            decoder_batch_norm: bool = True) -> Report:
    report = Report(config)
    steps_o, steps_t = ours["steps"][:n_steps], theirs["steps"][:n_steps]
    report.check("steps taken (difference)", abs(len(ours["steps"]) - len(theirs["steps"])), 0,
                 f"{len(ours['steps'])} vs {len(theirs['steps'])}")
    first_o, first_t = steps_o[0], steps_t[0]
    for term in ("loss", "reconstruction", "kl_z"):
        report.check(f"step 1: {term}", relative(first_o[term], first_t[term]), STEP_TOLERANCE,
                     f"{first_o[term]:.6f} vs {first_t[term]:.6f}")
    kl = max(abs(o["kl_weight"] - t["kl_weight"]) for o, t in zip(steps_o, steps_t))
    report.check("KL weight, every step (max |diff|)", kl, 1e-7,
                 f"last {steps_o[-1]['kl_weight']:.6g} vs {steps_t[-1]['kl_weight']:.6g}")
    # loss trajectory: the first step where the loss parts beyond the drift tolerance
    parted = [i for i, (o, t) in enumerate(zip(steps_o, steps_t))
              if relative(o["loss"], t["loss"]) > DRIFT_TOLERANCE]
    loss_drift = max(relative(o["loss"], t["loss"]) for o, t in zip(steps_o, steps_t))
    report.check(f"loss, steps 1-{n_steps} (max rel)", loss_drift, DRIFT_TOLERANCE,
                 f"first parts at step {parted[0] + 1}" if parted else "")

    grads_o, grads_t = ours["first_grads"], theirs["first_grads"]
    only = sorted(set(grads_o) ^ set(grads_t))
    report.check("parameters with a gradient (symmetric diff)", len(only), 0, ", ".join(only))
    zeros = zero_by_design(grads_t, first_t["kl_weight"], decoder_batch_norm)
    value, name = worst(relative_all(grads_o, grads_t, skip=zeros))
    report.check(f"step 1: gradients ({len(grads_t) - len(zeros)} tensors, max rel)", value, STEP_TOLERANCE,
                 name)
    scale = max(norm_all(grads_o), norm_all(grads_t))
    value, name = worst({f"{k} ({side})": float(g[k].norm()) / scale
                         for k in zeros for side, g in (("ours", grads_o), ("theirs", grads_t))})
    report.check(f"step 1: {len(zeros)} gradients zero by design, |g|/|all g|", value, 1e-6, name)
    for part in ("update", "exp_avg", "exp_avg_sq"):
        value, name = worst(relative_all({k: v[part] for k, v in ours["first_adam"].items()},
                                         {k: v[part] for k, v in theirs["first_adam"].items()}, skip=zeros))
        report.check(f"step 1: Adam {part} (max rel)", value, STEP_TOLERANCE, name)

    # weights and buffers after each snapshot step, against the reference's own sensitivity to round-off
    early, first_part, last = 0.0, None, None
    for step in sorted(s for s in theirs["snapshots"] if s <= n_steps):
        so, st = ours["snapshots"][step], theirs["snapshots"][step]
        if set(so) != set(st):
            report.check(f"after step {step}: state-dict keys differ", 1, 0,
                         str(sorted(set(so) ^ set(st))))
            return report
        counters = [k for k in st if k.endswith("num_batches_tracked")]
        mismatch = [k for k in counters if int(so[k]) != int(st[k])]
        if mismatch:
            report.check(f"after step {step}: num_batches_tracked", 1, 0, ", ".join(mismatch))
        value, name = worst({k: relative(so[k], st[k]) for k in st if k not in counters})
        if step <= EARLY_STEPS:
            early = max(early, value)
        noise = baseline.get(step, 0.0)
        if first_part is None and value > DRIFT_TOLERANCE:
            first_part = (step, name, value, noise)
        last = (step, value, name, noise, {k: relative(so[k], st[k]) for k in st if "running_" in k})
    report.check(f"after steps 1-{min(EARLY_STEPS, n_steps)}: parameters+buffers (max rel)", early,
                 EARLY_TOLERANCE)

    # the same step from the same state, all along the reference's trajectory
    forced, where = 0.0, ""
    for s_, grads in ours["forced_grads"].items():
        zeros = zero_by_design(grads, theirs["steps"][s_]["kl_weight"])
        value, name = worst(relative_all(grads, theirs["grads_at"][s_], skip=zeros,
                                         floor=FORCED_FLOOR))
        if value >= forced:
            forced, where = value, f"step {s_ + 1}: {name}"
    forced_ok = forced <= FORCED_TOLERANCE
    report.check(f"gradients at the reference's weights, {len(ours['forced_grads'])} steps (max rel)", forced,
                 FORCED_TOLERANCE, where)

    step, value, name, noise, bn = last
    note = f"{name}; scvi-tools vs itself from weights 1 ulp apart: {noise:.3g}"
    chaotic = value > DRIFT_TOLERANCE and forced_ok
    # documented deviation: every step agrees, the dynamics amplify round-off (see the module docstring)
    if chaotic:
        note += " -> round-off amplified by the dynamics: every checked step agrees from the same state"
    tolerance = math.inf if chaotic else DRIFT_TOLERANCE
    report.check(f"after step {step}: parameters+buffers (max rel)", value, tolerance, note)
    report.check(f"after step {step}: BatchNorm running stats (max rel)", max(bn.values(), default=0.0),
                 tolerance, worst(bn)[1])
    if first_part is not None:
        report.notes.append(f"the two part first (> {DRIFT_TOLERANCE:g}) after step {first_part[0]}: "
                            f"{first_part[1]} (rel {first_part[2]:.3g}; scvi-tools against itself "
                            f"from weights 1 ulp apart: {first_part[3]:.3g})")
    so, st = ours["snapshots"][1], theirs["snapshots"][1]
    step1 = {k: relative(so[k], st[k]) for k in st if "running_" in k}
    report.check("after step 1: BatchNorm running stats (max rel)", max(step1.values(), default=0.0),
                 STEP_TOLERANCE, worst(step1)[1])
    return report


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------
def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def load_data(name: str, n_genes: int):
    import anndata

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import top_variable_genes  # the project's gene selection (top variance of log1p counts)

    path = SHARED_DATA / f"{name}.h5ad"
    if name != "generated" and path.exists():
        print(f"[data] {path}, top {n_genes} genes by variance of log1p counts")
        return top_variable_genes(anndata.read_h5ad(path), n_genes)
    from pyro_scvi.data import synthetic_iid

    print(f"[data] {path} is absent: generated data (2 batches, 500 cells, {n_genes} genes)")
    adata = synthetic_iid(batch_size=250, n_genes=n_genes, n_batches=2, n_labels=3,
                          sparse_format="csr_matrix", seed=3)
    return adata


def run_child(python: str, worker: str, spec_path: Path) -> None:
    proc = subprocess.run([python, __file__, "--worker", worker, "--spec", str(spec_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-6000:])
        raise SystemExit(f"the {worker} worker failed (exit {proc.returncode})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="cellbench_3cl")
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10,
                        help="after step 10, compare weights and gradients every N steps "
                             "(1: every step; ~10 MB per step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="dropout_rate of both models (the default 0.1; masks are replayed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scvi-python", default=DEFAULT_SCVI_PYTHON)
    parser.add_argument("--keep", metavar="DIR",
                        help="write the data, specs and both records to DIR instead of a temporary folder")
    parser.add_argument("--worker", choices=("scvi", "pyro"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        if args.worker == "pyro":
            sys.path.insert(0, str(REPO))
        (run_scvi_tools if args.worker == "scvi" else run_pyro_scvi)(spec)
        return 0

    sys.path.insert(0, str(REPO))
    import torch

    from pyro_scvi.data.loader import split_indices
    from pyro_scvi.io.scvi_tools import to_scvi_tools_state_dict

    if not Path(args.scvi_python).exists():
        print(f"{args.scvi_python} is missing: install scvi-tools in its own venv "
              f"(see benchmarks/README.md).")
        return 0
    unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    print(f"[machine] {machine_line()}; torch {torch.__version__}")
    adata = load_data(args.data, args.n_genes)
    n_train = math.ceil(0.9 * adata.n_obs)
    steps_per_epoch = math.ceil(n_train / 128)
    epochs = math.ceil(args.steps / steps_per_epoch)
    print(f"[run] {adata.n_obs} cells x {adata.n_vars} genes, {n_train} training cells, "
          f"{steps_per_epoch} steps/epoch, "
          f"{epochs} epochs ({args.steps} steps compared), seed {args.seed}, dropout {args.dropout}, "
          f"{args.threads} thread(s) per side")
    all_ok = True
    with tempfile.TemporaryDirectory(prefix="training_equivalence_") as tmp:
        if args.keep:  # keep the records (torch.save'd dicts) for a closer look
            tmp = args.keep
            os.makedirs(tmp, exist_ok=True)
        tmp = Path(tmp)
        adata_path = tmp / "data.h5ad"
        adata.write_h5ad(adata_path)
        train, validation, _ = split_indices(adata.n_obs, 0.9, None, 128, True, args.seed)
        for config in args.configs.split(","):
            likelihood, batch, *extra = CONFIGS[config]
            model_kwargs = extra[0] if extra else {}
            model = make_pyro_model(adata.copy(), likelihood, batch, args.seed, args.dropout, **model_kwargs)
            torch.save(model.module.state_dict(), tmp / "init_ours.pt")
            torch.save(to_scvi_tools_state_dict(model.module.state_dict()), tmp / "init_theirs.pt")
            spec = {"adata": str(adata_path), "likelihood": likelihood, "batch": batch, "seed": args.seed,
                    "model_kwargs": model_kwargs,
                    "threads": args.threads, "steps": args.steps, "every": args.every, "epochs": epochs,
                    "dropout": args.dropout,
                    "train": train.tolist(), "validation": validation.tolist(),
                    "init": str(tmp / "init_theirs.pt"), "init_ours": str(tmp / "init_ours.pt"),
                    "record": str(tmp / f"{config}_scvi.pt"), "record_ours": str(tmp / f"{config}_pyro.pt")}
            spec_path = tmp / f"{config}.json"
            spec_path.write_text(json.dumps(spec))
            perturbed_path = tmp / f"{config}_perturbed.json"
            perturbed_path.write_text(json.dumps(dict(spec, perturb=True,
                                                      record=str(tmp / f"{config}_scvi_ulp.pt"))))
            run_child(args.scvi_python, "scvi", spec_path)
            run_child(args.scvi_python, "scvi", perturbed_path)
            run_child(sys.executable, "pyro", spec_path)
            theirs = torch.load(spec["record"], weights_only=False)
            ours = torch.load(spec["record_ours"], weights_only=False)
            baseline = self_drift(torch.load(tmp / f"{config}_scvi_ulp.pt", weights_only=False), theirs)
            decoder_bn = model_kwargs.get("use_batch_norm", "both") in ("both", "decoder")
            report = compare(f"{config} (scvi-tools {theirs['version']})", ours, theirs, args.steps,
                             baseline, decoder_bn)
            report.print()
            all_ok &= report.ok
    print(f"\n{'EQUIVALENT' if all_ok else 'NOT EQUIVALENT'}: {args.configs} on {args.data}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
