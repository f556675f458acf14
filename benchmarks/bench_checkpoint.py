"""What a checkpoint every epoch costs: CellBench 5cl, all genes, default SCVI.

Trains the same seeded model twice per repeat, in alternating order: without checkpoints and with
``checkpoint_dir=...`` at the default ``checkpoint_every_n_epochs=1``, and reports

* seconds per epoch of each, and the overhead of checkpointing as a fraction of the epoch: the
  ratio of each pair of neighbouring runs (the machine's speed drifts between pairs far more than
  within one), their median, and their mean with a 95 % interval;
* the time the training thread spends in the checkpoint call, per checkpoint and per epoch, and
  within it the time of ``write_checkpoint`` (tensors and the pickled rest into the slot file,
  manifest), and how the tensors are copied (the C kernel, or torch);
* within one run (``--within-run N`` epochs, a checkpoint every third epoch): for each three
  neighbouring epochs, the extra time of the epoch that ends with a checkpoint and of the one after
  it (which would pay for any cache or page-table disturbance the checkpoint leaves) over the clean
  epoch before them, as a fraction of that epoch; these triples are seconds apart, so the
  machine's drift cancels far better than between whole runs;
* the size of one checkpoint file;
* the extra CPU time of the process (all its threads) per epoch, a figure that other processes on
  the machine disturb less than wall time.

The goal (issue 18) is an overhead of at most 5 % of the epoch. The figures come with the CPU
model, SIMD flags and C compiler. Usage (repository root)::

    .venv/bin/python benchmarks/bench_checkpoint.py                  # all genes, 10 epochs, 8 pairs
    .venv/bin/python benchmarks/bench_checkpoint.py --n-genes 2000 --epochs 30

Without /work/shared/data the data are generated (printed). Validation is off (the default of
``train``), which makes the epoch short and the relative cost of a checkpoint largest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cellbench import DEFAULT_H5AD, load_data, machine_info, wait_idle, write_generated  # noqa: E402


def _instrument():
    """Wrap the checkpoint calls to time them."""
    import pyro_scvi.infer.checkpoint as checkpoint

    times = {"save": [], "write": []}
    save, write = checkpoint.Checkpointer.save, checkpoint.write_checkpoint

    def timed_save(self, *args, **kwargs):
        start = time.perf_counter()
        save(self, *args, **kwargs)
        times["save"].append(time.perf_counter() - start)

    def timed_write(*args, **kwargs):
        start = time.perf_counter()
        path = write(*args, **kwargs)
        times["write"].append(time.perf_counter() - start)
        return path

    checkpoint.Checkpointer.save = timed_save
    checkpoint.write_checkpoint = timed_write
    return times


def train_once(adata, epochs: int, directory: str | None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) per epoch."""
    from pyro_scvi import SCVI, settings

    settings.seed = 0
    model = SCVI(adata)
    start, cpu = time.perf_counter(), time.process_time()
    model.train(max_epochs=epochs, enable_progress_bar=False, checkpoint_dir=directory)
    return (time.perf_counter() - start) / epochs, (time.process_time() - cpu) / epochs


def within_run(adata, epochs: int) -> list[float]:
    """Per triple of epochs (clean, ends with a checkpoint, the one after): the extra time of the
    last two over twice the clean one, as a fraction of the clean one."""
    import pyro_scvi.infer.training as training
    from pyro_scvi import SCVI, settings

    starts = []
    train_epoch = training._SVIRun.train_epoch

    def timed(self, *args, **kwargs):
        starts.append(time.perf_counter())
        return train_epoch(self, *args, **kwargs)

    training._SVIRun.train_epoch = timed
    try:
        settings.seed = 0
        with tempfile.TemporaryDirectory(dir=os.environ.get("CHECKPOINT_BENCH_DIR")) as directory:
            SCVI(adata).train(max_epochs=epochs + 1, enable_progress_bar=False, checkpoint_dir=directory,
                              checkpoint_every_n_epochs=3)
    finally:
        training._SVIRun.train_epoch = train_epoch
    loop = [b - a for a, b in zip(starts, starts[1:])]  # epoch e: train, checks, checkpoint if due
    # checkpoints end epochs 2, 5, 8, ...; epochs 0-2 carry first-run costs (slot files created)
    return [(loop[k + 1] + loop[k + 2] - 2 * loop[k]) / loop[k] for k in range(4, len(loop) - 2, 3)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h5ad", default=DEFAULT_H5AD)
    parser.add_argument("--n-genes", type=int, default=0, help="top genes by variance (0: all)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=8, help="pairs of runs (with and without)")
    parser.add_argument("--within-run", type=int, default=90,
                        help="epochs of the run with a checkpoint every third epoch (0: skip)")
    parser.add_argument("--wait-idle", type=float, default=30.0,
                        help="seconds to wait for other processes to go quiet before each run")
    a = parser.parse_args(argv)

    import torch

    from pyro_scvi import SCVI
    from pyro_scvi.io.slot_file import copy_path

    if not os.path.exists(a.h5ad):
        a.h5ad = str(Path(tempfile.mkdtemp()) / "generated.h5ad")
        write_generated(Path(a.h5ad), 4000, 2000)
        print(f"data: generated ({a.h5ad}); {DEFAULT_H5AD} not found")
    adata = load_data(a.h5ad, a.n_genes)
    SCVI.setup_anndata(adata, batch_key="batch" if "batch" in adata.obs else None)
    print(f"data: {a.h5ad}: {adata.n_obs} cells x {adata.n_vars} genes")
    print("machine:", json.dumps(machine_info()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; slot copy: {copy_path()}")
    times = _instrument()
    train_once(adata, 1, None)  # warm-up: kernel builds and choice, first-call costs
    with tempfile.TemporaryDirectory(dir=os.environ.get("CHECKPOINT_BENCH_DIR")) as directory:
        train_once(adata, 1, directory)
    plain, with_checkpoints = [], []
    for repeat in range(a.repeats):
        # the order alternates: a process's runs get faster as it warms up, which would favour the second
        for checkpointing in ((False, True) if repeat % 2 == 0 else (True, False)):
            wait_idle(a.wait_idle)
            if not checkpointing:
                plain.append(train_once(adata, a.epochs, None))
                continue
            with tempfile.TemporaryDirectory(dir=os.environ.get("CHECKPOINT_BENCH_DIR")) as directory:
                with_checkpoints.append(train_once(adata, a.epochs, directory))
                size = max(p.stat().st_size for p in Path(directory).glob("slot-*.bin"))
        print(f"repeat {repeat}: {plain[-1][0]:.3f} s/epoch plain, {with_checkpoints[-1][0]:.3f} with "
              f"checkpoints; CPU {plain[-1][1]:.3f} and {with_checkpoints[-1][1]:.3f} s/epoch")
    epoch = statistics.median(p[0] for p in plain)
    ratios = [c[0] / p[0] - 1 for p, c in zip(plain, with_checkpoints)]
    overhead = statistics.median(ratios)
    spread = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
    half_width = _t95(len(ratios) - 1) * spread if len(ratios) > 1 else 0.0
    cpu_plain = statistics.median(p[1] for p in plain)
    cpu_overhead = statistics.median(c[1] for c in with_checkpoints) / cpu_plain - 1
    save_ms = 1e3 * statistics.median(times["save"])
    write_ms = 1e3 * statistics.median(times["write"])
    print(f"\ncheckpoint every epoch, {adata.n_vars} genes: epoch {epoch:.3f} s plain; overhead "
          f"{100 * overhead:+.1f} % of the epoch (median of {a.repeats} pairs; mean "
          f"{100 * statistics.mean(ratios):+.1f} ± {100 * half_width:.1f} %), CPU time "
          f"{100 * cpu_overhead:+.1f} %; training thread blocked "
          f"{save_ms:.1f} ms per checkpoint ({100 * save_ms / 1e3 / epoch:.1f} % of the epoch), of which "
          f"write_checkpoint {write_ms:.1f} ms; slot file {size / 2**20:.1f} MiB")
    if a.within_run:
        wait_idle(a.wait_idle)
        costs = within_run(adata, a.within_run)
        spread = _t95(len(costs) - 1) * statistics.stdev(costs) / len(costs) ** 0.5
        print(f"within one run ({a.within_run} epochs, {len(costs)} triples): a checkpoint and the epoch "
              f"after it cost {100 * statistics.mean(costs):+.1f} ± {100 * spread:.1f} % of an epoch "
              f"(mean, 95 % interval; median {100 * statistics.median(costs):+.1f} %)")


def _t95(degrees: int) -> float:
    """The two-sided 95 % quantile of Student's t."""
    from scipy import stats

    return float(stats.t.ppf(0.975, degrees))


if __name__ == "__main__":
    main()
