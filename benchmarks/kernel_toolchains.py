"""The fused NB/ZINB kernel under every C compiler and target found on this machine.

For each compiler (``gcc``, ``gcc-11`` … ``gcc-14``, ``clang``, ``clang-14`` … ``clang-18``, and the
ARM64 cross compilers ``aarch64-linux-gnu-gcc`` / ``clang --target=aarch64-linux-gnu`` when
``qemu-aarch64`` can run their output) and each target (``-march=native``, ``haswell`` (AVX2),
``znver3``, ``x86-64-v2`` (SSE4.2), ``skylake-avx512``; ``neoverse-n1``/``apple-m1`` on ARM64) it

1. compiles ``pyro_scvi/distributions/csrc/nb_log_prob.c`` with the package's flags and the
   compiler's vectorisation remarks, and lists which of the loops marked ``vector loop`` were
   vectorised;
2. links a small driver that times the kernel (ZINB and NB, values and gradients, one thread,
   128 × 2000 at 30 % non-zero counts, best of 20, thread CPU time) on x86 targets this CPU can
   run, and under qemu on ARM64 only checks the numbers (emulated timings mean nothing);
3. compares the log-density and gradients with the float64 torch formula on wide-range inputs
   (the error in units of float32 eps × the magnitude of the terms, as ``tests/test_fused.py``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/kernel_toolchains.py            # table to stdout and results/
    .venv/bin/python benchmarks/kernel_toolchains.py --old REV  # also the kernel of git revision REV

Install more compilers with ``apt-get install gcc-11 clang-16 gcc-aarch64-linux-gnu
libc6-dev-arm64-cross qemu-user``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pyro_scvi.distributions import (  # noqa: E402
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
    dense_log_prob,
    fused,  # noqa: E402
)

SOURCE = REPO / "pyro_scvi" / "distributions" / "csrc" / "nb_log_prob.c"
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC"]

DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int nb_log_prob(int64_t, int64_t, const float *, const float *, const float *, int64_t, const float *,
                float *, float *, float *, float *, int);
static double cpu_seconds(void) {
    struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec;
}
static uint64_t state = 88172645463325252ULL;
static double uniform(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                              return (state >> 11) * (1.0 / 9007199254740992.0); }
static float *read_floats(const char *path, size_t n) {
    float *out = malloc(n * 4); FILE *f = fopen(path, "rb");
    if (!f || fread(out, 4, n, f) != n) { fprintf(stderr, "cannot read %s\n", path); exit(1); }
    fclose(f); return out;
}
static void write_floats(FILE *f, const float *a, size_t n) { fwrite(a, 4, n, f); }
int main(int argc, char **argv) {
    /* accuracy: the inputs of argv[1] ((n, G) counts, mu, logits, (G,) theta), outputs to argv[2] */
    const int64_t n = atoi(argv[3]), G = atoi(argv[4]);
    const size_t N = (size_t)n * G;
    float *in = read_floats(argv[1], 3 * N + G);
    float *x = in, *mu = in + N, *logits = in + 2 * N, *theta = in + 3 * N;
    float *out = malloc(4 * N * 4);
    FILE *f = fopen(argv[2], "wb");
    for (int zi = 1; zi >= 0; --zi) {
        nb_log_prob(n, G, x, mu, theta, 0, zi ? logits : NULL, out, out + N, out + 2 * N,
                    zi ? out + 3 * N : NULL, 1);
        write_floats(f, out, (zi ? 4 : 3) * N);
    }
    fclose(f);
    if (argc > 5 && atoi(argv[5]) == 0) return 0;
    /* speed: 128 x 2000, 30 % non-zero counts, one thread */
    const int64_t tn = 128, tg = 2000; const size_t TN = (size_t)tn * tg;
    float *tx = malloc(TN * 4), *tm = malloc(TN * 4), *tl = malloc(TN * 4), *tt = malloc(tg * 4);
    float *o = malloc(4 * TN * 4);
    for (size_t i = 0; i < TN; ++i) {
        tx[i] = uniform() < 0.3 ? (float)(1 + (int)(uniform() * 5)) : 0.0f;
        tm[i] = 0.1f + 3.0f * (float)uniform(); tl[i] = -2.0f + (float)uniform();
    }
    for (int64_t g = 0; g < tg; ++g) tt[g] = 0.5f + 5.0f * (float)uniform();
    for (int zi = 1; zi >= 0; --zi) {
        double best = 1e9;
        for (int r = 0; r < 20; ++r) {
            double t = cpu_seconds();
            nb_log_prob(tn, tg, tx, tm, tt, 0, zi ? tl : NULL, o, o + TN, o + 2 * TN,
                        zi ? o + 3 * TN : NULL, 1);
            t = cpu_seconds() - t; if (t < best) best = t;
        }
        printf("%s %.3f\n", zi ? "zinb" : "nb", best / TN * 1e9);
    }
    return 0;
}
"""


def _run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def toolchains() -> list[dict]:
    """(name, compiler command, target flags, runs natively / under qemu) for what is installed."""
    x86 = platform.machine() in ("x86_64", "AMD64")
    found = []
    compilers = ["gcc", *[f"gcc-{v}" for v in range(11, 15)], "clang", *[f"clang-{v}" for v in range(14, 19)]]
    cpu_flags = fused.cpu_description()["flags"].split()
    targets = ["native"]
    if x86:
        targets += [t for t, need in (("haswell", "avx2"), ("znver3", "avx2"), ("x86-64-v2", "sse4_2"),
                                      ("skylake-avx512", "avx512bw")) if need in cpu_flags]
    for compiler in compilers:
        if shutil.which(compiler) is None:
            continue
        for target in targets:
            found.append({"compiler": [compiler], "target": [f"-march={target}"], "runner": [],
                          "name": f"{compiler} -march={target}"})
    qemu = shutil.which("qemu-aarch64")
    sysroot = "/usr/aarch64-linux-gnu"
    if x86 and qemu and shutil.which("aarch64-linux-gnu-gcc"):
        for target in ("-mcpu=neoverse-n1", "-march=armv8-a"):
            found.append({"compiler": ["aarch64-linux-gnu-gcc"], "target": [target], "name":
                          f"aarch64-linux-gnu-gcc {target}", "runner": [qemu, "-L", sysroot]})
        for clang in ("clang-16", "clang"):
            if shutil.which(clang):
                found.append({"compiler": [clang, "--target=aarch64-linux-gnu"],
                              "target": ["-mcpu=apple-m1"], "name": f"{clang} aarch64 -mcpu=apple-m1",
                              "runner": [qemu, "-L", sysroot]})
                break
    return found


def vectorised_loops(chain: dict, source: Path, folder: Path) -> dict[str, bool] | str:
    is_clang = "clang" in chain["compiler"][0]
    remark = "-Rpass=loop-vectorize" if is_clang else "-fopt-info-vec-optimized"
    result = _run([*chain["compiler"], *FLAGS, *chain["target"], remark, "-c", "-o", str(folder / "k.o"),
                   str(source)])
    if result.returncode != 0:
        return f"compile failed: {result.stderr.strip()[-300:]}"
    lines = set()
    for line in result.stderr.splitlines():
        if ("loop vectorized" in line or "vectorized loop" in line) and f"{source.name}:" in line:
            lines.add(int(line.split(f"{source.name}:", 1)[1].split(":", 1)[0]))
    marked = {}
    for number, text in enumerate(source.read_text().splitlines(), start=1):
        if "/* vector loop: " in text:
            marked[text.split("/* vector loop: ", 1)[1].split("*/", 1)[0].strip()] = number in lines
    return marked


def wide_inputs(n: int = 64, G: int = 37, seed: int = 0):
    """Counts 0 … 1e5 (and fractional), μ in [1e-6, 1e5], θ in [1e-4, 1e5], logits in [-30, 30]."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 5, (n, G))
    value = np.choose(kind, [np.zeros((n, G)), np.ones((n, G)), rng.integers(2, 20, (n, G)),
                             np.floor(np.exp(rng.uniform(np.log(20), np.log(1e5), (n, G)))),
                             rng.integers(1, 4, (n, G))]).astype(np.float32)
    value[0, :3] = [0.5, 2.5, 1e5]
    mu = np.exp(rng.uniform(np.log(1e-6), np.log(1e5), (n, G))).astype(np.float32)
    logits = rng.uniform(-30, 30, (n, G)).astype(np.float32)
    theta = np.exp(rng.uniform(np.log(1e-4), np.log(1e5), G)).astype(np.float32)
    return value, mu, logits, theta


def reference(value, mu, logits, theta) -> list[np.ndarray]:
    """float64 torch formula: ZINB log-density and d/dμ, d/dθ (per entry), d/dℓ; then NB's three."""
    out = []
    for zero_inflated in (True, False):
        m = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
        t = torch.tensor(np.broadcast_to(theta, value.shape).copy(), dtype=torch.float64, requires_grad=True)
        ell = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
        x = torch.tensor(value, dtype=torch.float64)
        with dense_log_prob():
            lp = (ZeroInflatedNegativeBinomial(m, t, ell, validate_args=False) if zero_inflated
                  else NegativeBinomial(m, t, validate_args=False)).log_prob(x)
        lp.sum().backward()
        out += [lp.detach().numpy(), m.grad.numpy(), t.grad.numpy()]
        if zero_inflated:
            out.append(ell.grad.numpy())
    return out


def relative_errors(got: np.ndarray, want: list[np.ndarray]) -> float:
    """Largest |got − want| / (|want| + 1) over all outputs (a coarse check that the build is right;
    tests/test_fused.py has the exact error model)."""
    n_values = sum(w.size for w in want)
    if got.size != n_values:
        return float("inf")
    worst, start = 0.0, 0
    for w in want:
        g = got[start:start + w.size].reshape(w.shape).astype(np.float64)
        start += w.size
        finite = np.isfinite(w)
        worst = max(worst, float(np.max(np.abs(g[finite] - w[finite]) / (np.abs(w[finite]) + 1.0))))
    return worst


def check(chain: dict, source: Path, folder: Path, inputs_path: Path, shape, want, time_it: bool) -> dict:
    row = {"toolchain": chain["name"], "source": source.name}
    row["vectorised"] = vectorised_loops(chain, source, folder)
    driver, binary = folder / "driver.c", folder / "driver"
    driver.write_text(DRIVER)
    libraries = ["-lmvec", "-lm"] if source != SOURCE else ["-lm"]  # the old kernel called libmvec
    build = _run([*chain["compiler"], *FLAGS, *chain["target"], "-o", str(binary), str(driver), str(source),
                  *libraries])
    if build.returncode != 0:
        row["error"] = build.stderr.strip()[-300:]
        return row
    outputs = folder / "out.bin"
    arguments = [str(inputs_path), str(outputs), str(shape[0]), str(shape[1]), "1" if time_it else "0"]
    result = _run([*chain["runner"], str(binary), *arguments], timeout=600)
    if result.returncode != 0:
        row["error"] = result.stderr.strip()[-300:]
        return row
    row["max_relative_error"] = relative_errors(np.fromfile(outputs, dtype=np.float32), want)
    for line in result.stdout.splitlines():
        name, value = line.split()
        row[f"{name}_ns_per_entry"] = float(value)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="also build the kernel of this git revision (e.g. HEAD~3)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kernel_toolchains.json"))
    args = parser.parse_args()
    value, mu, logits, theta = wide_inputs()
    want = reference(value, mu, logits, theta)
    sources = [SOURCE]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = folder / "inputs.bin"
        np.concatenate([value.ravel(), mu.ravel(), logits.ravel(), theta]).astype(np.float32).tofile(inputs)
        if args.old:
            old = folder / "nb_log_prob_old.c"
            old.write_text(_run(["git", "-C", str(REPO), "show",
                                 f"{args.old}:pyro_scvi/distributions/csrc/nb_log_prob.c"]).stdout)
            sources.append(old)
        for chain in toolchains():
            for source in sources:
                if source != SOURCE and chain["runner"]:
                    continue  # the old kernel needs libmvec, which the ARM64 cross libc lacks
                chain_flags = chain
                if source != SOURCE:  # the old kernel was built with -ffast-math and libmvec
                    chain_flags = dict(chain, target=[*chain["target"], "-ffast-math"])
                native = not chain["runner"]
                row = check(chain_flags, source, folder, inputs, value.shape, want, time_it=native)
                rows.append(row)
                print(json.dumps(row), flush=True)
    cpu = fused.cpu_description()
    print(f"\nCPU: {cpu['model']} ({cpu['flags']}); one thread, 128 x 2000, 30 % non-zero; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| toolchain | kernel | loops vectorised | ZINB ns/entry | NB ns/entry "
          "| max rel. error vs float64 |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        loops = row["vectorised"]
        shown = loops
        if isinstance(loops, dict):
            shown = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in loops.items())
        if row["source"] != SOURCE.name:
            shown = "(old kernel)"
        print(f"| {row['toolchain']} | {'new' if row['source'] == SOURCE.name else 'old'} | {shown} | "
              f"{row.get('zinb_ns_per_entry', float('nan')):.2f} | "
              f"{row.get('nb_ns_per_entry', float('nan')):.2f} | "
              f"{row.get('max_relative_error', float('nan')):.1e} {row.get('error', '')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
