"""Building the fused kernel with the compiler found here, and choosing between it and the torch formula.

``tests/test_fused.py`` checks the kernel's numbers; here: the build (flags, OpenMP, that the
compiler vectorised every loop the source marks, the fallbacks without OpenMP and with other
compilers) and :mod:`pyro_scvi.distributions.kernel_choice` (the measured choice, its override and
that whichever path it picks computes the same log-density).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyro_scvi.cli import main
from pyro_scvi.distributions import ZeroInflatedNegativeBinomial, fused, kernel_choice, negative_binomial

ROOT = Path(__file__).resolve().parents[1]
TORCH_FORMULA = negative_binomial.torch_formula_log_prob


@pytest.fixture
def kernel():
    if not fused.expected():
        pytest.skip(f"fused kernel not buildable here: {fused.unavailable_reason()}")
    assert fused.available(), f"the fused kernel should build here but did not: {fused.unavailable_reason()}"


@pytest.fixture
def fresh_choice(monkeypatch):
    """No decision yet (restored afterwards), and no override in the environment."""
    monkeypatch.delenv(kernel_choice.KERNEL_VARIABLE, raising=False)
    kernel_choice.reset()
    yield
    kernel_choice.reset()


def _run_python(code: str, env_changes: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_changes}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_build_uses_this_cpu_and_reports_it(kernel):
    info = fused.build_info()
    assert info["available"] and info["reason"] is None
    assert ("-march=native" in info["flags"]) or ("-mcpu=native" in info["flags"])
    assert "-ffast-math" not in info["flags"]  # NaN checks must survive (tests/test_fused.py)
    assert info["openmp"] == ("-fopenmp" in info["flags"])
    assert info["compiler_version"] and info["cpu"]["model"]
    assert Path(info["library"]) == fused.library_path()


def test_the_compiler_vectorises_every_marked_loop(kernel):
    """The compiler found here reports each loop marked ``vector loop`` as vectorised."""
    loops = fused.vectorisation_report()
    assert set(loops) == {"dense", "lgamma", "x terms"}
    assert all(loops.values()), loops


def _fake_compiler(folder: Path, refuse: str) -> Path:
    """A C compiler that fails when given ``refuse`` and else runs the real one."""
    real = shutil.which(os.environ.get("CC", "cc"))
    script = folder / "cc"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{refuse}" ] && exit 1; done\n'
                      f'exec {real} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


_CHECK_BUILD = """
    import torch
    from pyro_scvi.distributions import fused
    assert fused.available(), fused.unavailable_reason()
    info = fused.build_info()
    print("FLAGS", info["flags"])
    print("OPENMP", info["openmp"])
    if {report}:
        print("VECTORISED", all(fused.vectorisation_report().values()))
    inputs = torch.load({inputs!r})
    torch.save(fused.nb_log_prob(*inputs), {out!r})
"""


def _inputs():
    """ZINB inputs with counts in and outside the log-factorial table, for comparing builds."""
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((9, 40), 1.5), generator=g)
    x[0, :3] = torch.tensor([2000.0, 0.5, 7.0])
    mu, theta = torch.rand(9, 40, generator=g) + 0.1, torch.rand(40, generator=g) + 0.5
    return x, mu, theta, torch.randn(9, 40, generator=g)


def _build_elsewhere(tmp_path: Path, name: str, env: dict[str, str], report: bool = True):
    """Build the kernel in a fresh process and cache with ``env``; its printed facts and its
    log-density on :func:`_inputs`, with the log-density of this process's kernel."""
    inputs, out = tmp_path / "inputs.pt", tmp_path / f"{name}.pt"
    torch.save(_inputs(), inputs)
    code = _CHECK_BUILD.format(report=report, inputs=str(inputs), out=str(out))
    result = _run_python(code, {"PYRO_SCVI_CACHE": str(tmp_path / name), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return lines, torch.load(out), fused.nb_log_prob(*_inputs())


def test_without_openmp_the_kernel_builds_single_threaded(kernel, tmp_path):
    """A compiler without OpenMP (clang without libomp): the next flag set builds, and computes the
    same numbers on one thread."""
    compiler = str(_fake_compiler(tmp_path, "-fopenmp"))
    lines, values, reference = _build_elsewhere(tmp_path, "no-openmp", {"CC": compiler}, report=False)
    assert lines["OPENMP"] == "False" and "-fopenmp" not in lines["FLAGS"]
    torch.testing.assert_close(values, reference)


def test_extra_flags_from_the_environment(kernel, tmp_path):
    """$PYRO_SCVI_CFLAGS reaches the build (here: AVX2 code, as for a fleet of AVX2 machines) and the
    cache key; the loops still vectorise."""
    if not fused.cpu_description()["flags"].count("avx2"):
        pytest.skip("needs an AVX2 CPU")
    lines, values, reference = _build_elsewhere(tmp_path, "haswell", {"PYRO_SCVI_CFLAGS": "-march=haswell"})
    assert lines["FLAGS"].endswith("-march=haswell -fopenmp") and lines["VECTORISED"] == "True"
    torch.testing.assert_close(values, reference)


@pytest.mark.parametrize("compiler", ["clang", "clang-16", "clang-14", "gcc-11", "gcc-13", "gcc-14"])
def test_other_compilers_on_this_machine(kernel, tmp_path, compiler):
    """Every other compiler installed here builds a vectorised kernel with the same numbers."""
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    lines, values, reference = _build_elsewhere(tmp_path, compiler, {"CC": compiler})
    assert lines["VECTORISED"] == "True", lines
    torch.testing.assert_close(values, reference)


def test_the_choice_follows_the_measurement(fresh_choice, monkeypatch, kernel):
    """auto keeps the kernel unless the torch formula is faster by more than the margin."""
    for fused_ns, torch_ns, expected in ((2.0, 10.0, True), (10.0, 9.0, True), (10.0, 7.0, False)):
        monkeypatch.setattr(kernel_choice, "measure", lambda *a, **k: {"fused": fused_ns, "torch": torch_ns})
        kernel_choice.reset()
        decided = kernel_choice.choice(TORCH_FORMULA)
        assert decided["use_fused"] is expected and decided["mode"] == "auto"
        assert decided["ns_per_entry"] == {"fused": fused_ns, "torch": torch_ns}


def test_the_choice_is_made_once_per_process(fresh_choice, monkeypatch, kernel):
    calls = []
    timings = {"fused": 1.0, "torch": 5.0}
    monkeypatch.setattr(kernel_choice, "measure", lambda *a, **k: calls.append(1) or timings)
    g = torch.Generator().manual_seed(1)
    x, mu = torch.poisson(torch.ones(4, 7), generator=g), torch.rand(4, 7, generator=g) + 0.1
    for _ in range(3):
        ZeroInflatedNegativeBinomial(mu, torch.ones(7), torch.zeros(4, 7)).log_prob(x)
    assert len(calls) == 1


@pytest.mark.parametrize("mode,uses_fused", [("fused", True), ("torch", False), ("TORCH", False)])
def test_the_environment_overrides_the_measurement(fresh_choice, monkeypatch, kernel, mode, uses_fused):
    monkeypatch.setattr(kernel_choice, "measure", lambda *a, **k: pytest.fail("must not measure"))
    monkeypatch.setenv(kernel_choice.KERNEL_VARIABLE, mode)
    decided = kernel_choice.choice(TORCH_FORMULA)
    assert decided["use_fused"] is uses_fused and decided["mode"] == mode.lower()


def test_a_bad_override_names_the_choices(fresh_choice, monkeypatch):
    monkeypatch.setenv(kernel_choice.KERNEL_VARIABLE, "fast")
    with pytest.raises(ValueError, match="PYRO_SCVI_NB_KERNEL='fast': use one of auto, fused, torch"):
        kernel_choice.choice(TORCH_FORMULA)


def test_torch_override_routes_log_prob_away_from_the_kernel(fresh_choice, monkeypatch, kernel):
    """With the torch formula chosen, log_prob never calls the kernel, and gives its values."""
    monkeypatch.setenv(kernel_choice.KERNEL_VARIABLE, "torch")
    monkeypatch.setattr(fused, "nb_log_prob", lambda *a, **k: pytest.fail("the kernel must not run"))
    g = torch.Generator().manual_seed(2)
    x, mu = torch.poisson(torch.ones(5, 6), generator=g), torch.rand(5, 6, generator=g) + 0.1
    theta, logits = torch.rand(6, generator=g) + 0.5, torch.randn(5, 6, generator=g)
    got = ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(x)
    torch.testing.assert_close(got, TORCH_FORMULA(x, mu, theta, logits))


def test_the_real_measurement_picks_a_working_path(fresh_choice, kernel):
    """Measured here: both paths take a finite, positive time, and the path picked computes the
    log-density and gradients of the other."""
    timings = kernel_choice.measure(TORCH_FORMULA, n_rows=16, n_genes=64, repeats=1)
    assert all(0 < t < 1e6 for t in timings.values()), timings
    decided = kernel_choice.choice(TORCH_FORMULA)
    assert isinstance(decided["use_fused"], bool) and set(decided["ns_per_entry"]) == {"fused", "torch"}
    g = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.full((8, 30), 2.0), generator=g)
    params = [torch.rand(8, 30, generator=g) + 0.1, torch.rand(30, generator=g) + 0.5,
              torch.randn(8, 30, generator=g)]
    grads = []
    paths = (lambda: ZeroInflatedNegativeBinomial(*params).log_prob(x), lambda: TORCH_FORMULA(x, *params))
    for path in paths:
        for p in params:
            p.requires_grad_().grad = None
        log_prob = path()
        log_prob.sum().backward()
        grads.append([log_prob.detach()] + [p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_info_kernel_prints_the_self_check(fresh_choice, kernel, capsys):
    assert main(["info", "--kernel"]) == 0
    out = capsys.readouterr().out
    for text in ("CPU:", "Compiler:", "built with:", "OpenMP:", "ns/entry", "torch formula", "log_prob uses:",
                 "loops vectorised by the compiler: dense: yes", "Checkpoints copy tensors with: kernel ("):
        assert text in out, (text, out)


def test_info_without_a_model_or_kernel_is_an_error(capsys):
    assert main(["info"]) == 1
    assert "needs a model directory" in capsys.readouterr().err


@pytest.mark.parametrize("leading", [(13,), (3, 5)])
def test_theta_gradient_with_one_weight_per_row(kernel, leading):
    """The ELBO weights each cell's summed log-density, so the kernel's upstream gradient is one
    value per row expanded over genes: the per-gene θ gradient (a matrix-vector product then) equals
    the one from the same weights given in full."""
    g = torch.Generator().manual_seed(4)
    shape = (*leading, 21)
    x = torch.poisson(torch.full(shape, 2.0), generator=g)
    mu, logits = torch.rand(shape, generator=g) + 0.1, torch.randn(shape, generator=g)
    weights = torch.rand(leading, generator=g) - 0.5
    grads = []
    for expanded in (True, False):
        theta = (torch.rand(21, generator=torch.Generator().manual_seed(5)) + 0.5).requires_grad_()
        log_prob = fused.nb_log_prob(x, mu, theta, logits)
        if expanded:  # d/d log_prob = weights[..., None] expanded: strides (..., 0)
            (log_prob.sum(-1) * weights).sum().backward()
        else:
            (log_prob * weights[..., None].expand(shape).contiguous()).sum().backward()
        grads.append(theta.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_a_kernel_made_unavailable_after_the_choice_is_not_called(fresh_choice, monkeypatch, kernel):
    """The choice is kept per process, but availability is asked at every call: with the kernel
    switched off after the kernel was chosen, log_prob takes the torch formula."""
    monkeypatch.setenv(kernel_choice.KERNEL_VARIABLE, "fused")
    g = torch.Generator().manual_seed(6)
    x, mu = torch.poisson(torch.ones(3, 8), generator=g), torch.rand(3, 8, generator=g) + 0.1
    ZeroInflatedNegativeBinomial(mu, torch.ones(8), torch.zeros(3, 8)).log_prob(x)
    assert kernel_choice.choice(TORCH_FORMULA)["use_fused"]
    monkeypatch.setattr(fused, "available", lambda: False)
    monkeypatch.setattr(fused, "nb_log_prob", lambda *a, **k: pytest.fail("the kernel must not run"))
    got = ZeroInflatedNegativeBinomial(mu, torch.ones(8), torch.zeros(3, 8)).log_prob(x)
    torch.testing.assert_close(got, TORCH_FORMULA(x, mu, torch.ones(8), torch.zeros(3, 8)))
    assert not kernel_choice.choice(TORCH_FORMULA)["use_fused"]
