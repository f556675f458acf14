"""The training step never waits for the device: nothing is read back to the host step by step.

On CUDA, reading a tensor's value (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``, ``.cpu()``,
``nonzero``, boolean-mask indexing) or making a tensor on the device from host values (a blocking
copy, e.g. ``torch.tensor(1.0, device=...)``, which ``torch.distributions`` does for a number
parameter) stalls the host until the GPU has caught up. Done at every step, it idles the GPU
between steps. The training loop reads its metrics once per epoch instead.

The tests watch the training steps after the first (the first creates the optimiser's state) of a
real ``SCVI.train`` / ``SCANVI.train``; the per-epoch work (metrics, the finiteness check,
validation) is not watched.

* On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronising call, including
  the minibatch's copy to the GPU (watched too); the test records them all with where they were
  made, so that one run on a GPU lists every offender (``"error"`` would stop at the first).
* CI has no GPU: on the CPU, a ``TorchFunctionMode`` records the same calls at the Python level,
  with the dense log-density (the code path CUDA takes: the fast paths are CPU-only).
"""

from __future__ import annotations

import contextlib
import math
import traceback
import warnings
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from torch.overrides import TorchFunctionMode

from pyro_scvi import SCANVI, SCVI
from pyro_scvi.distributions import dense_log_prob
from pyro_scvi.infer import training
from pyro_scvi.infer.scanvi import categorical_kl

REPO = Path(__file__).resolve().parents[1]
Tensor = torch.Tensor


def _where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame and, when that is outside the package, the innermost frame inside it."""
    def name(frame):
        path = Path(frame.filename)
        if "site-packages" in path.parts:
            shown = "/".join(path.parts[path.parts.index("site-packages") + 1:])
        else:
            shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
        return f"{shown}:{frame.lineno}"

    ours = [frame for frame in stack if Path(frame.filename).is_relative_to(REPO / "pyro_scvi")]
    if not ours or ours[-1] is stack[-1]:
        return name(stack[-1])
    return f"{name(stack[-1])} (from {name(ours[-1])})"


#: calls that read a tensor's values on the host (on CUDA: wait for the device)
_READS = {
    Tensor.item, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__, Tensor.__complex__,
    Tensor.tolist, Tensor.numpy, Tensor.cpu, Tensor.__repr__, Tensor.__format__,
    Tensor.nonzero, torch.nonzero, Tensor.argwhere, torch.argwhere, Tensor.masked_select, torch.masked_select,
    Tensor.unique, torch.unique, torch.unique_consecutive,
}
#: calls that make a tensor from host values (on CUDA, with a device given: a blocking copy)
_FROM_HOST = {torch.tensor, torch.as_tensor, torch.asarray}


def _boolean_index(index) -> bool:
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in indices)


def _is_host_read(func, args, kwargs) -> bool:
    if func in _READS:
        return True
    if func in _FROM_HOST:
        return "device" in kwargs and not isinstance(args[0], Tensor)
    if func is Tensor.new_tensor:
        return not isinstance(args[1], Tensor)
    if func in (Tensor.__getitem__, Tensor.__setitem__):
        return _boolean_index(args[1])
    return False


class _HostReadMode(TorchFunctionMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_host_read(func, args, kwargs):
            name = getattr(func, "__name__", repr(func))
            self.found.append(f"{name} at {_where(traceback.extract_stack()[:-1])}")
        return func(*args, **kwargs)


class HostReads:
    """Records, within :meth:`watch`, every call that would make the host wait for a CUDA device."""

    def __init__(self) -> None:
        self.found: list[str] = []

    @contextlib.contextmanager
    def watch(self):
        with _HostReadMode(self.found):
            yield


class CudaSyncs:
    """Records, within :meth:`watch`, every synchronising CUDA call (``set_sync_debug_mode("warn")``),
    with where it was made: all of them in one run, rather than only the first as ``"error"`` would."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            stack = [frame for frame in traceback.extract_stack()[:-1]
                     if not frame.filename.endswith("warnings.py")]
            self.found.append(f"{message} at {_where(stack)}")

    @contextlib.contextmanager
    def watch(self):
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)


class StepWatch:
    """Wraps the training minibatches so that ``guard()`` is active around every step but the first
    (and, with ``loading``, around reading each minibatch and copying it to the device)."""

    def __init__(self, guard, loading: bool) -> None:
        self.guard, self.loading = guard, loading
        self.steps = self.watched = 0

    def _maybe(self, on: bool):
        return self.guard() if on else contextlib.nullcontext()

    def wrap(self, epoch_batches):
        def epoch():
            batches = iter(epoch_batches())
            while True:
                watched = self.steps > 0
                with self._maybe(watched and self.loading):
                    batch = next(batches, None)
                if batch is None:
                    return
                self.steps += 1
                self.watched += watched
                with self._maybe(watched):
                    yield batch  # the training step runs here
        return epoch


def watch_training(monkeypatch, guard, loading: bool, model_class=SCVI) -> StepWatch:
    """A :class:`StepWatch` over the training minibatches of every ``model_class.train`` in the test."""
    watch = StepWatch(guard, loading)
    registered = model_class._registered_training_data

    def training_data(self, *args, **kwargs):
        data = registered(self, *args, **kwargs)
        return data._replace(train=watch.wrap(data.train))

    monkeypatch.setattr(model_class, "_registered_training_data", training_data)
    return watch


#: (model options, plan_kwargs): the default, a global latent (θ hyper-prior) with a latent library,
#: and the IWAE objective with vectorised particles
CASES = [
    pytest.param({}, {}, id="default"),
    pytest.param({"dispersion_prior": "gamma", "use_observed_lib_size": False}, {}, id="global-theta"),
    pytest.param({}, {"objective": "iwae", "num_particles": 3}, id="iwae"),
]
EPOCHS, BATCH_SIZE = 2, 64


def _train(adata, model_kwargs, plan_kwargs, accelerator, model_class=SCVI):
    """A model trained for a few epochs; on the CPU with the dense log-density, as on CUDA."""
    if model_class is SCANVI:  # label_0 stands for the unlabelled cells
        SCANVI.setup_anndata(adata, batch_key="batch", labels_key="labels", unlabeled_category="label_0")
    else:
        SCVI.setup_anndata(adata, batch_key="batch")
    model = model_class(adata, **model_kwargs)
    with dense_log_prob() if accelerator == "cpu" else contextlib.nullcontext():
        model.train(max_epochs=EPOCHS, accelerator=accelerator, batch_size=BATCH_SIZE,
                    check_val_every_n_epoch=1, plan_kwargs=plan_kwargs, enable_progress_bar=False)
    return model


def _steps(model) -> int:
    return EPOCHS * math.ceil(len(model.train_indices_) / BATCH_SIZE)


@pytest.mark.parametrize(("model_kwargs", "plan_kwargs"), CASES)
def test_training_steps_read_nothing_back(adata, monkeypatch, model_kwargs, plan_kwargs):
    reads = HostReads()
    watch = watch_training(monkeypatch, reads.watch, loading=False)
    model = _train(adata, model_kwargs, plan_kwargs, "cpu")
    assert watch.watched == _steps(model) - 1 > 0
    assert not reads.found, "host reads in the training step:\n" + "\n".join(sorted(set(reads.found)))
    assert np.isfinite(model.history["elbo_validation"].to_numpy()).all()


def test_scanvi_training_steps_read_nothing_back(adata, monkeypatch):
    reads = HostReads()
    watch = watch_training(monkeypatch, reads.watch, loading=False, model_class=SCANVI)
    model = _train(adata, {}, {}, "cpu", SCANVI)
    assert watch.watched == _steps(model) - 1 > 0
    assert not reads.found, "host reads in the training step:\n" + "\n".join(sorted(set(reads.found)))


def test_categorical_kl_is_torchs():
    logits = torch.randn(4, 3)
    p = dist.Categorical(logits=logits)
    zero = torch.tensor([[0.5, 0.5, 0.0]]).expand(4, 3)
    for first, second in [(p, dist.Categorical(logits=logits.flip(0))), (dist.Categorical(zero), p),
                          (p, dist.Categorical(zero)), (dist.Categorical(zero), dist.Categorical(zero))]:
        expected = torch.distributions.kl_divergence(first, second)
        torch.testing.assert_close(categorical_kl(first, second), expected)
    assert categorical_kl(p, dist.Categorical(zero)).isinf().all()


def test_the_watch_sees_a_read_in_the_step(adata, monkeypatch):
    step = training._svi_step

    def step_reading_the_loss(*args, **kwargs):
        loss = step(*args, **kwargs)
        float(loss)
        return loss

    monkeypatch.setattr(training, "_svi_step", step_reading_the_loss)
    reads = HostReads()
    watch = watch_training(monkeypatch, reads.watch, loading=False)
    model = _train(adata, {}, {}, "cpu")
    assert len(reads.found) == watch.watched == _steps(model) - 1
    assert all(found.startswith("__float__ at tests/test_host_syncs.py") for found in reads.found)


def test_host_reads_are_told_apart_from_device_work():
    reads = HostReads()
    x = torch.arange(6.0)
    with reads.watch():
        x[0].item(), float(x.sum()), bool(x.any()), x.tolist(), x.nonzero(), x[x > 2]
        torch.tensor(1.0, device=x.device)
        # a number parameter becomes torch.tensor(1.0, device=...)
        dist.Normal(torch.zeros(3), 1.0, validate_args=False)
        assert len(reads.found) == 8
        # device work, and host tensors made without a device (data loading, pyro's plate indices)
        (x * 2).sum().exp(), torch.where(x > 2, x, 0.0), x.new_ones(()), torch.full((), 1.5)
        torch.as_tensor(np.arange(3)), torch.tensor(())
        dist.Normal(torch.zeros(3), torch.ones(3), validate_args=False)
    assert len(reads.found) == 8
    assert reads.found[-1].startswith("tensor at ") and "distributions" in reads.found[-1]


@pytest.mark.cuda
def test_cuda_sync_watch_sees_a_sync():
    syncs = CudaSyncs()
    x = torch.ones(3, device="cuda")
    for synchronising in (lambda: x.sum().item(), lambda: torch.tensor(1.0, device="cuda")):
        before = len(syncs.found)
        with syncs.watch():
            synchronising()
        assert len(syncs.found) > before
        assert "tests/test_host_syncs.py" in syncs.found[-1]
    before = len(syncs.found)
    with syncs.watch():
        (x * 2).sum(), torch.full((), 1.0, device="cuda")
    assert len(syncs.found) == before


@pytest.mark.cuda
def test_cuda_scanvi_training_steps_do_not_sync(adata, monkeypatch):
    syncs = CudaSyncs()
    watch = watch_training(monkeypatch, syncs.watch, loading=True, model_class=SCANVI)
    model = _train(adata, {}, {}, "gpu", SCANVI)
    assert model.device.type == "cuda"
    assert watch.watched == _steps(model) - 1 > 0
    assert not syncs.found, (
        "synchronising calls in the training step:\n" + "\n".join(sorted(set(syncs.found))))


@pytest.mark.cuda
@pytest.mark.parametrize(("model_kwargs", "plan_kwargs"), CASES)
def test_cuda_training_steps_do_not_sync(adata, monkeypatch, model_kwargs, plan_kwargs):
    syncs = CudaSyncs()
    watch = watch_training(monkeypatch, syncs.watch, loading=True)
    model = _train(adata, model_kwargs, plan_kwargs, "gpu")
    assert model.device.type == "cuda"
    assert watch.watched == _steps(model) - 1 > 0
    assert not syncs.found, (
        "synchronising calls in the training step:\n" + "\n".join(sorted(set(syncs.found))))
