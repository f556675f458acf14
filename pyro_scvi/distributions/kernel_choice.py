"""Which path computes the NB / ZINB log-density on the CPU: the fused kernel or the torch formula.

Decided by measurement, once per process: on the first ``log_prob`` the fused kernel could serve,
:func:`choice` times both paths on one generated ZINB minibatch (values and gradients, a few
milliseconds) and keeps the faster (the kernel unless the torch formula wins by more than 25 %).
A compiler that vectorises the kernel poorly, or a machine where torch has many more threads than
the kernel can use, then costs nothing. ``$PYRO_SCVI_NB_KERNEL``
overrides the choice: ``fused`` (whenever the kernel is available), ``torch``, or ``auto`` (the
default, measure). :func:`choice` reports what was decided and why (``pyro-scvi info --kernel``).
"""

from __future__ import annotations

import os
import threading
import time

import torch

from . import fused

__all__ = ["choice", "measure", "report", "reset", "KERNEL_VARIABLE"]

#: environment variable choosing the path: auto (measure), fused or torch
KERNEL_VARIABLE = "PYRO_SCVI_NB_KERNEL"
_MODES = ("auto", "fused", "torch")
#: the kernel is kept unless the torch formula is faster by more than this factor, so that timing
#: noise does not flip the choice (and the last float bits of results) between processes
_MARGIN = 1.25

_lock = threading.Lock()
_choice: dict | None = None


def _generated_minibatch(n_rows: int, n_genes: int):
    """UMI-like counts (about a third non-zero) with ZINB parameters, fixed by a private generator."""
    generator = torch.Generator().manual_seed(0)
    mu = torch.empty(n_rows, n_genes).log_normal_(-1.0, 1.5, generator=generator)
    theta = torch.empty(n_genes).log_normal_(0.0, 1.0, generator=generator)
    logits = torch.randn(n_rows, n_genes, generator=generator) - 2.0
    value = torch.poisson(0.6 * mu, generator=generator)
    return value, mu, theta, logits


def _seconds(step, repeats: int) -> float:
    step()  # warm-up: first-call work (allocations, thread start-up)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def measure(
    torch_formula, n_rows: int = 64, n_genes: int = 512, repeats: int = 3, with_grad: bool = True
) -> dict[str, float]:
    """Nanoseconds per entry of the ZINB log-density, with its gradient (forward and backward) or
    values only, by the fused kernel and by ``torch_formula(value, mu, theta, logits)`` (the torch
    path of :mod:`.negative_binomial`), best of ``repeats``, on a generated ``(n_rows, n_genes)``
    minibatch. ``fused`` is ``inf`` where the kernel is not available."""
    value, mu, theta, logits = _generated_minibatch(n_rows, n_genes)
    params = [p.requires_grad_(with_grad) for p in (mu, theta, logits)]

    def run(log_prob):
        with torch.set_grad_enabled(with_grad):
            total = log_prob().sum()
            if with_grad:
                total.backward()

    def fused_step():
        run(lambda: fused.nb_log_prob(value, *params))

    def torch_step():
        run(lambda: torch_formula(value, *params))

    entries = n_rows * n_genes * 1e-9
    return {
        "fused": _seconds(fused_step, repeats) / entries if fused.available() else float("inf"),
        "torch": _seconds(torch_step, repeats) / entries,
    }


def report(torch_formula, n_rows: int = 128, n_genes: int = 2000, repeats: int = 5) -> str:
    """A self-check of the kernel on this machine, as text: CPU, compiler, flags, OpenMP, whether
    each of its loops is vectorised, ns per entry of both paths and the path ``log_prob`` uses."""
    info = fused.build_info()
    lines = [
        f"CPU: {info['cpu']['model']} (SIMD: {info['cpu']['flags'] or 'none reported'}), "
        f"{os.cpu_count()} logical cores",
        f"Compiler: {info['compiler']} ({info['compiler_version']})",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    ]
    if not info["available"]:
        lines.append(f"Fused kernel: not available ({info['reason']})")
    else:
        lines.append(f"Fused kernel: {info['library']}")
        openmp = "yes" if info["openmp"] else "no (one thread)"
        lines.append(f"  built with: {info['flags']}; OpenMP: {openmp}")
        try:
            loops = fused.vectorisation_report()
            shown = ", ".join(f"{name}: {'yes' if done else 'NO'}" for name, done in loops.items())
            lines.append(f"  loops vectorised by the compiler: {shown}")
        except (RuntimeError, OSError) as error:
            lines.append(f"  loops vectorised: unknown ({error})")
    for with_grad, title in ((True, "values and gradients"), (False, "values only")):
        timings = measure(torch_formula, n_rows, n_genes, repeats, with_grad=with_grad)
        ratio = timings["torch"] / timings["fused"]
        lines.append(f"ZINB {title}, {n_rows} x {n_genes}: fused {timings['fused']:.2f} ns/entry, "
                     f"torch formula {timings['torch']:.2f} ns/entry ({ratio:.1f}x)")
    decided = choice(torch_formula)
    lines.append(f"log_prob uses: {'the fused kernel' if decided['use_fused'] else 'the torch formula'} "
                 f"({decided['reason']}; ${KERNEL_VARIABLE}={decided['mode']})")
    return "\n".join(lines)


def _mode() -> str:
    mode = os.environ.get(KERNEL_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"${KERNEL_VARIABLE}={mode!r}: use one of {', '.join(_MODES)}.")
    return mode


def choice(torch_formula) -> dict:
    """The decision for this process (made on the first call, measuring against ``torch_formula``
    as :func:`measure` does): ``use_fused``, the ``mode`` and ``reason``, and for ``auto`` the
    measured ``ns_per_entry`` of both paths."""
    global _choice
    if not fused.available():  # nothing to choose, and nothing kept: the next call looks again
        return {"mode": _mode(), "use_fused": False, "reason": fused.unavailable_reason()}
    with _lock:
        if _choice is not None:
            return _choice
        mode = _mode()
        if mode == "torch":
            decided = {"use_fused": False, "reason": f"${KERNEL_VARIABLE}=torch"}
        elif mode == "fused":
            decided = {"use_fused": True, "reason": f"${KERNEL_VARIABLE}=fused"}
        else:
            timings = measure(torch_formula)
            faster = timings["fused"] <= _MARGIN * timings["torch"]
            decided = {
                "use_fused": faster,
                "reason": "measured: the {} is faster".format("fused kernel" if faster else "torch formula"),
                "ns_per_entry": timings,
            }
        _choice = {"mode": mode, **decided}
        return _choice


def reset() -> None:
    """Forget the decision, so that the next :func:`choice` decides again (for tests)."""
    global _choice
    with _lock:
        _choice = None
