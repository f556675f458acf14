"""Fused CPU kernel for the NB / ZINB log-density and its gradient (the training fast path).

The plain torch formula in :mod:`pyro_scvi.distributions` runs about twenty elementwise kernels
forward and as many backward over the ``(n, G)`` count matrix, plus lgamma and digamma per
entry; on a CPU that is most of a training step. ``csrc/nb_log_prob.c`` computes the
log-density *and* its partial derivatives in μ, θ and the zero-inflation logits in one dense
vectorised pass plus a pass over the non-zero counts only (see the C file for why it vectorises
with any gcc or clang on any SIMD width). Backward is then one multiplication per parameter.

The C file is compiled on first use with the system C compiler (``$CC`` or ``cc``) for this CPU
(``-march=native``, ``-mcpu=native`` on ARM64) with OpenMP when the compiler has it, into a
cache folder (``$PYRO_SCVI_CACHE``, else ``$XDG_CACHE_HOME/pyro_scvi`` or ``~/.cache/pyro_scvi``)
keyed by the source, the compiler and the CPU, and loaded with :mod:`ctypes`
(:mod:`pyro_scvi.c_kernels`, shared with the checkpoint copy); nothing is compiled at install time.
Without a compiler, on other platforms or on CUDA the torch formula is used
(:func:`available` says which and :func:`unavailable_reason` why). Values and gradients agree with
the torch formula to float32 precision (``tests/test_fused.py``);
:func:`pyro_scvi.distributions.dense_log_prob` turns this path off along with the other fast paths.

Whether ``log_prob`` uses the kernel is decided by measurement, once per process
(:mod:`pyro_scvi.distributions.kernel_choice`). ``$PYRO_SCVI_CFLAGS`` adds compiler flags (for
example ``-march=haswell`` to build for a family of machines rather than this one). :func:`build_info`
and :func:`vectorisation_report` (``pyro-scvi info --kernel``) say how the kernel was built and
whether the compiler vectorised its loops.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..c_kernels import CKernel, compiler, cpu_description, platform_supported

__all__ = [
    "available", "expected", "unavailable_reason", "nb_log_prob", "supports", "library_path",
    "build_info", "vectorisation_report", "cpu_description",
]

_SOURCE = Path(__file__).with_name("csrc") / "nb_log_prob.c"
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False


def _declare(library: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.nb_log_prob.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    library.nb_log_prob.restype = ctypes.c_int
    library.nb_log_prob_openmp.restype = ctypes.c_int
    library.nb_log_prob_build_flags.restype = ctypes.c_char_p


_KERNEL = CKernel(_SOURCE, _declare, "the fused kernel")


def _compiler() -> str:
    return compiler()


def library_path() -> Path:
    """Where the compiled kernel for this source, compiler and CPU lives (or will live)."""
    return _KERNEL.library_path()


def _load() -> ctypes.CDLL | None:
    global _library, _reason, _loaded
    with _lock:
        if _loaded:
            return _library
        _loaded = True
        _library = _KERNEL.load()
        if _library is None:
            _reason = _KERNEL.reason
            if platform_supported():
                warnings.warn(
                    f"pyro_scvi: {_reason}; the NB/ZINB log-density falls back to the slower torch "
                    "formula. Install a C compiler (e.g. gcc) or set $CC to use the fused kernel.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _library


def expected() -> bool:
    """Whether this machine should be able to build the kernel: a supported platform (Linux on
    x86-64 or ARM64, macOS) with the C compiler (``$CC`` or ``cc``) on the PATH."""
    return platform_supported() and shutil.which(_compiler()) is not None


def available() -> bool:
    """Whether the fused kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (``None`` when it is True)."""
    _load()
    return _reason


def _compiler_version() -> str:
    try:
        result = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    return (result.stdout.splitlines() or ["unknown"])[0]


def build_info() -> dict:
    """How the kernel is built here: ``available`` (and ``reason`` if not), the ``compiler`` and its
    ``compiler_version``, the ``flags`` the loaded library was built with, whether it uses
    ``openmp``, the ``library`` path and the ``cpu`` (model and SIMD flags)."""
    info = {
        "available": available(),
        "reason": unavailable_reason(),
        "compiler": _compiler(),
        "compiler_version": _compiler_version(),
        "library": str(library_path()),
        "cpu": cpu_description(),
    }
    if _library is not None:
        info["flags"] = _library.nb_log_prob_build_flags().decode()
        info["openmp"] = bool(_library.nb_log_prob_openmp())
    return info


def vector_loops() -> dict[str, int]:
    """The loops the source marks ``/* vector loop: NAME */``, by name: their line numbers."""
    loops = {}
    for number, line in enumerate(_SOURCE.read_text().splitlines(), start=1):
        if "/* vector loop: " in line:
            loops[line.split("/* vector loop: ", 1)[1].split("*/", 1)[0].strip()] = number
    return loops


@functools.cache
def vectorisation_report() -> dict[str, bool]:
    """Compile the kernel once more (once per process), with the flags of the loaded library and the
    compiler's vectorisation remarks (gcc's ``-fopt-info-vec-optimized``, clang's
    ``-Rpass=loop-vectorize``), and say for each marked loop (:func:`vector_loops`) whether it was
    vectorised. Raises
    RuntimeError where the kernel is not built or the compiler gives no remarks."""
    if not available():
        raise RuntimeError(f"The fused kernel is not available: {unavailable_reason()}.")
    flags = _library.nb_log_prob_build_flags().decode().split()
    is_clang = "clang" in _compiler_version().lower()
    remark = "-Rpass=loop-vectorize" if is_clang else "-fopt-info-vec-optimized"
    with tempfile.TemporaryDirectory() as folder:
        command = [_compiler(), *flags, remark, "-c", "-o", os.path.join(folder, "k.o"), str(_SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    vectorised_lines = set()
    for line in result.stderr.splitlines():
        if ("loop vectorized" in line or "vectorized loop" in line) and _SOURCE.name in line:
            try:
                vectorised_lines.add(int(line.split(_SOURCE.name + ":", 1)[1].split(":", 1)[0]))
            except (IndexError, ValueError):
                continue
    if not vectorised_lines and "vectoriz" not in result.stderr:
        raise RuntimeError(f"{_compiler()} gave no vectorisation remarks with {remark}.")
    return {name: line in vectorised_lines for name, line in vector_loops().items()}


def _per_gene_theta(theta: torch.Tensor, n_genes: int) -> bool:
    return theta.dim() >= 1 and theta.shape[-1] == n_genes and theta.numel() == n_genes


def supports(value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, logits: torch.Tensor | None) -> bool:
    """Whether :func:`nb_log_prob` takes these arguments: float32 CPU tensors, the counts and μ
    (and the logits) of one shape ``(..., G)`` and θ of that shape or one value per gene."""
    tensors = (value, mu, theta) if logits is None else (value, mu, theta, logits)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    shape = value.shape
    if (
        value.dim() == 0
        or value.numel() == 0
        or mu.shape != shape
        or (logits is not None and logits.shape != shape)
    ):
        return False
    return theta.shape == shape or _per_gene_theta(theta, shape[-1])


class _NBLogProb(torch.autograd.Function):
    """log NB / log ZINB per entry; the kernel's partial derivatives are saved for backward."""

    @staticmethod
    def forward(ctx, value, mu, theta, logits):
        library = _load()
        n_genes = value.shape[-1]
        n_rows = value.numel() // n_genes
        per_gene = theta.shape != value.shape
        x_c, mu_c, theta_c = value.contiguous(), mu.contiguous(), theta.contiguous()
        logits_c = None if logits is None else logits.contiguous()
        log_prob = torch.empty_like(x_c)
        with_grad = any(ctx.needs_input_grad[1:])
        d_mu = torch.empty_like(x_c) if with_grad else None
        d_theta = torch.empty_like(x_c) if with_grad else None
        d_logits = torch.empty_like(x_c) if with_grad and logits is not None else None

        def pointer(t):
            return None if t is None else t.data_ptr()

        status = library.nb_log_prob(
            n_rows,
            n_genes,
            pointer(x_c),
            pointer(mu_c),
            pointer(theta_c),
            0 if per_gene else n_genes,
            pointer(logits_c),
            pointer(log_prob),
            pointer(d_mu),
            pointer(d_theta),
            pointer(d_logits),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("The fused NB kernel could not allocate its per-gene workspace.")
        ctx.per_gene = per_gene
        ctx.theta_shape = theta.shape
        ctx.save_for_backward(d_mu, d_theta, d_logits)
        return log_prob

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        d_mu, d_theta, d_logits = ctx.saved_tensors
        grad_mu = grad * d_mu if ctx.needs_input_grad[1] else None
        grad_theta = None
        if ctx.needs_input_grad[2]:
            n_genes = grad.shape[-1]
            if ctx.per_gene and grad.stride(-1) == 0:
                # one weight per row (the ELBO's per-cell scale, expanded over genes): the sum over
                # rows of weight · ∂θ is a matrix-vector product, without an (n, G) temporary
                row_weights = grad[..., :1].reshape(1, -1)
                grad_theta = (row_weights @ d_theta.reshape(-1, n_genes)).reshape(ctx.theta_shape)
            else:
                grad_theta = grad * d_theta
                if ctx.per_gene:
                    grad_theta = grad_theta.reshape(-1, n_genes).sum(0).reshape(ctx.theta_shape)
        grad_logits = grad * d_logits if ctx.needs_input_grad[3] else None
        return None, grad_mu, grad_theta, grad_logits


def nb_log_prob(
    value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, logits: torch.Tensor | None = None
) -> torch.Tensor:
    """log NB(value | μ, θ), or log ZINB with zero-inflation ``logits``, per entry (shape of ``value``).

    Differentiable in μ, θ and the logits (not in the counts). Requires :func:`available` and
    :func:`supports`; the formula is the one of :mod:`pyro_scvi.distributions`.
    """
    if not available():
        raise RuntimeError(f"The fused kernel is not available: {unavailable_reason()}.")
    if not supports(value, mu, theta, logits):
        raise ValueError(
            "nb_log_prob takes float32 CPU tensors: counts, μ (and logits) of one shape (..., G) "
            "and θ of that shape or of one value per gene."
        )
    if not torch.is_grad_enabled():  # values only: the kernel then skips the derivatives
        mu, theta = mu.detach(), theta.detach()
        logits = None if logits is None else logits.detach()
    return _NBLogProb.apply(value.detach(), mu, theta, logits)
