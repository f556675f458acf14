"""Build the package's C kernels for this CPU on first use, and load them with :mod:`ctypes`.

A kernel is one C file under a ``csrc/`` folder of the package. It is compiled with the system
C compiler (``$CC`` or ``cc``) for this CPU (``-march=native``, ``-mcpu=native`` on ARM64) with
OpenMP when the compiler has it, into a cache folder (``$PYRO_SCVI_CACHE``, else
``$XDG_CACHE_HOME/pyro_scvi`` or ``~/.cache/pyro_scvi``) keyed by the source, the flags, the
compiler and the CPU; nothing is compiled at install time. ``$PYRO_SCVI_CFLAGS`` adds compiler
flags. The flags a library was built with are compiled into it as the string macro
``PYRO_SCVI_BUILD_FLAGS``. Where no compiler works, :meth:`CKernel.load` says why and the caller
takes its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

__all__ = ["CKernel", "cache_dir", "compiler", "cpu_description", "platform_supported"]

#: optimisation flags. No -ffast-math: it would let the compiler drop NaN checks
_OPTIMISE = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC"]
#: the supported platforms: (sys.platform prefix, machine names)
_PLATFORMS = {"linux": ("x86_64", "AMD64", "aarch64", "arm64"), "darwin": ("x86_64", "arm64")}


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("PYRO_SCVI_CACHE"):
        return Path(os.environ["PYRO_SCVI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pyro_scvi"


def cpu_description() -> dict[str, str]:
    """The CPU's model name and the SIMD feature flags that matter here (Linux; else ``platform``)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "flags": ""}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "asimd", "sve")
            if f in flags]
    model = fields.get("model name") or fields.get("CPU part") or platform.machine()
    return {"model": model, "flags": " ".join(simd)}


def _cpu_signature() -> str:
    """The CPU's model and all its feature flags (``-march=native`` code is only valid on the same ones)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))][:3]
    return "\n".join(keep)


def compiler() -> str:
    """The C compiler: ``$CC``, else ``cc``."""
    return os.environ.get("CC", "cc")


def _arch_flag() -> str:
    return "-mcpu=native" if platform.machine() in ("aarch64", "arm64") else "-march=native"


def variants() -> list[list[str]]:
    """Compile flags to try in order: for this CPU with OpenMP, without OpenMP (clang without
    libomp), and without the CPU flag (a compiler that does not know it)."""
    extra = os.environ.get("PYRO_SCVI_CFLAGS", "").split()
    tuned = [*_OPTIMISE, _arch_flag(), *extra]
    return [[*tuned, "-fopenmp"], tuned, [*_OPTIMISE, *extra]]


def platform_supported() -> bool:
    """Linux on x86-64 or ARM64, or macOS."""
    machines = next((m for prefix, m in _PLATFORMS.items() if sys.platform.startswith(prefix)), ())
    return platform.machine() in machines


class CKernel:
    """One C file, built on first use and loaded once per process (thread-safe).

    ``declare(library)`` sets the ``argtypes``/``restype`` of the library's functions; ``name``
    names the kernel in messages.
    """

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None], name: str) -> None:
        self.source, self._declare, self.name = Path(source), declare, name
        self._lock = threading.Lock()
        self._loaded = False
        self.library: ctypes.CDLL | None = None
        #: why :attr:`library` is ``None`` after :meth:`load`
        self.reason: str | None = None

    def library_path(self) -> Path:
        """Where the library for this source, compiler and CPU lives (or will live)."""
        key = hashlib.sha256()
        for part in (self.source.read_bytes(), repr(variants()).encode(), compiler().encode(),
                     _cpu_signature().encode(), platform.machine().encode()):
            key.update(part)
            key.update(b"\0")
        return cache_dir() / f"{self.source.stem}-{key.hexdigest()[:16]}.so"

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, building it first if needed; ``None`` (and :attr:`reason`) if that fails."""
        with self._lock:
            if self._loaded:
                return self.library
            self._loaded = True
            if not platform_supported():
                self.reason = (f"{self.name} is built for Linux (x86-64, ARM64) and macOS only "
                               f"(this is {sys.platform}/{platform.machine()})")
                return None
            try:
                target = self.library_path()
                if not target.exists():
                    self._build(target)
                library = ctypes.CDLL(str(target))
                self._declare(library)
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
                self.reason = f"could not build or load {self.name} ({error})"
                return None
            self.library = library
            return library

    def _compile(self, flags: list[str], target: str, obj: str) -> None:
        openmp = ["-fopenmp"] if "-fopenmp" in flags else []
        described = " ".join(flags).replace('"', "")
        for command in ([compiler(), *flags, f'-DPYRO_SCVI_BUILD_FLAGS="{described}"', "-c", "-o", obj,
                         str(self.source)],
                        [compiler(), "-shared", *openmp, "-o", target, obj, "-lm"]):
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")

    def _build(self, target: Path) -> None:
        """Compile into ``target`` (a temporary file first, then renamed) with the first flag variant
        that builds."""
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
        obj = temporary[:-3] + ".o"
        errors = []
        try:
            for flags in variants():
                try:
                    self._compile(flags, temporary, obj)
                except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                    errors.append(str(error))
                    continue
                os.replace(temporary, target)
                return
            raise RuntimeError(errors[0])
        finally:
            for path in (temporary, obj):
                if os.path.exists(path):
                    os.remove(path)
