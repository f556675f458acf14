"""The fused NB / ZINB kernel (:mod:`pyro_scvi.distributions.fused`, ``csrc/nb_log_prob.c``) on its own.

``tests/test_fast_log_prob.py`` checks the distributions' fast paths on small, tame inputs; here
the kernel is checked directly: values and gradients against a float64 reference of the torch
formula over wide parameter ranges, every shape of θ it takes, the values-only path, thread
counts, NaN propagation, what it refuses, the floating-point state of the process, building into
the cache folder and falling back to the torch formula without a compiler.

Error model of the accuracy checks: every float32 operation may be off by a relative ``eps``, so
the error of a result is bounded by a small multiple of ``eps`` times the sum of the magnitudes of
the terms it is made of (including the sensitivity ``|y·ψ(y)|`` of ``lgamma(y)`` to the rounding of
``y = x + θ``, and of a sigmoid to the rounding of its argument). :func:`_scales` computes that sum
per entry in float64; errors are compared in units of ``eps × scale``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial, dense_log_prob, fused

EPS32 = torch.finfo(torch.float32).eps
_EPS = 1e-8  # the ε of the formula
ROOT = Path(__file__).resolve().parents[1]
#: in units of eps × scale: every fused error must stay below HARD, and below SOFT unless the float32
#: torch formula is itself at least half as far off at that entry (observed: at most 2.7 over 40 seeds)
HARD, SOFT = 16.0, 4.0


@pytest.fixture
def kernel():
    """Skip where the kernel cannot be built (not Linux x86-64, or no C compiler); where it can,
    a failed build is a test failure."""
    if not fused.expected():
        pytest.skip(f"fused kernel not buildable here: {fused.unavailable_reason()}")
    assert fused.available(), f"the fused kernel should build here but did not: {fused.unavailable_reason()}"


def _log_uniform(low, high, shape, generator):
    return torch.empty(shape).uniform_(math.log(low), math.log(high), generator=generator).exp()


def _wide_inputs(shape, generator, theta_shape=None):
    """Counts (0, 1, small, up to 1e5, a few non-integers and sub-ε ones), μ in [1e-6, 1e5], θ in
    [1e-4, 1e5] (both log-uniform) and logits in [-30, 30], all float32."""
    kind = torch.randint(0, 5, shape, generator=generator)
    small = torch.randint(2, 20, shape, generator=generator).float()
    large = torch.floor(_log_uniform(20, 1e5, shape, generator))
    value = torch.stack([torch.zeros(shape), torch.ones(shape), small, large, large])
    value = value.gather(0, kind.unsqueeze(0)).squeeze(0)
    flat = value.view(-1)
    if flat.numel() >= 8:
        flat[:4] = torch.tensor([0.0, 1.0, 1e5, 0.5])
        flat[-3:] = torch.tensor([5e-9, 2.5, 1e5])
    mu = _log_uniform(1e-6, 1e5, shape, generator)
    theta = _log_uniform(1e-4, 1e5, shape if theta_shape is None else theta_shape, generator)
    logits = torch.empty(shape).uniform_(-30, 30, generator=generator)
    return value, mu, theta, logits


def _weights(shape, generator):
    """A non-uniform upstream gradient."""
    return torch.empty(shape).uniform_(0.5, 1.5, generator=generator)


def _torch_formula(value, mu, theta, logits, weights, dtype):
    """log-density and gradients (μ, θ[, logits]) of the plain torch formula in ``dtype``."""
    params = [
        p.detach().to(dtype).requires_grad_()
        for p in ((mu, theta) if logits is None else (mu, theta, logits))
    ]
    with dense_log_prob():
        make = NegativeBinomial if logits is None else ZeroInflatedNegativeBinomial
        log_prob = make(*params, validate_args=False).log_prob(value.to(dtype))
    (log_prob * weights.to(dtype)).sum().backward()
    return [log_prob.detach().double()] + [p.grad.double() for p in params]


def _kernel(value, mu, theta, logits, weights):
    """log-density and gradients (μ, θ[, logits]) of :func:`fused.nb_log_prob`."""
    params = [
        p.detach().clone().requires_grad_() for p in ((mu, theta) if logits is None else (mu, theta, logits))
    ]
    log_prob = fused.nb_log_prob(value, *params)
    assert log_prob.shape == value.shape and log_prob.dtype == torch.float32
    (log_prob * weights).sum().backward()
    return [log_prob.detach().double()] + [p.grad.double() for p in params]


def _scales(value, mu, theta, logits):
    """Per entry (shape of ``value``, float64): the sum of magnitudes of the terms of the log-density
    and of its derivatives in μ, θ[, logits], i.e. what float32 rounding is relative to."""
    x, mu, theta = value.double(), mu.double(), theta.double().expand(value.shape)
    log_theta_mu = torch.log(theta + mu + _EPS)
    log_theta, log_mu = torch.log(theta + _EPS), torch.log(mu + _EPS)

    def lgamma_scale(y):  # |lgamma(y)| and its change when y is rounded
        return torch.lgamma(y).abs() + (y * torch.digamma(y)).abs()

    def digamma_scale(y):
        return torch.digamma(y).abs() + (y * torch.polygamma(1, y)).abs()

    zero_part = theta * (log_theta.abs() + log_theta_mu.abs() + 1)  # of log NB(0) = θ·[log(θ+ε) − log(θ+μ+ε)]
    value_nb = zero_part + x * (log_mu.abs() + log_theta_mu.abs() + 1) + lgamma_scale(x + theta)
    value_nb = value_nb + lgamma_scale(theta) + lgamma_scale(x + 1)
    mu_nb = theta / (theta + mu) + x / (mu + _EPS) + x / (theta + mu)
    d_zero_part = log_theta.abs() + log_theta_mu.abs() + 2
    theta_nb = d_zero_part + x / (theta + mu) + digamma_scale(x + theta) + digamma_scale(theta)
    if logits is None:
        return [value_nb + 1, mu_nb, theta_nb]
    ell = logits.double()
    log_nb_zero = theta * (log_theta - log_theta_mu)
    sig = torch.sigmoid(log_nb_zero - ell)
    sensitivity = sig * (1 - sig) * (zero_part + ell.abs() + 1)  # of sigmoid(log NB(0) − ℓ) to rounding
    zero = x < _EPS
    return [
        torch.where(zero, sig * zero_part, value_nb) + ell.abs() + 1,
        torch.where(zero, (sig + sensitivity) * theta / (theta + mu), mu_nb),
        torch.where(zero, (sig + sensitivity) * d_zero_part, theta_nb),
        torch.where(zero, 1 + sensitivity, torch.ones_like(ell)),
    ]


def _assert_accurate(value, mu, theta, logits, weights):
    """Fused values and gradients within HARD (and, unless float32 torch is as bad, SOFT) units of
    eps × scale of the float64 reference; returns the largest errors in those units."""
    reference = _torch_formula(value, mu, theta, logits, weights, torch.float64)
    plain = _torch_formula(value, mu, theta, logits, weights, torch.float32)
    got = _kernel(value, mu, theta, logits, weights)
    scales = _scales(value, mu, theta, logits)
    worst = {}
    for index, name in enumerate(["value", "mu", "theta", "logits"][: len(got)]):
        scale = scales[index] * (weights.double() if index else 1)
        if index:  # gradients of broadcast parameters are sums over the broadcast dims
            scale = scale.sum_to_size(reference[index].shape)
        scale = EPS32 * scale + 1e-37
        error = (got[index] - reference[index]).abs() / scale
        plain_error = (plain[index] - reference[index]).abs() / scale
        assert torch.isfinite(got[index]).all(), name
        bad = ~((error <= SOFT) | (error <= 2 * plain_error)) | (error > HARD)
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} entries off, worst {error.max():.3g} eps·scale (float32 torch: "
            f"{plain_error.max():.3g}); e.g. fused {got[index][bad][:3].tolist()}, "
            f"float64 {reference[index][bad][:3].tolist()}"
        )
        worst[name] = (float(error.max()), float(plain_error.max()))
    return worst


@pytest.mark.parametrize("zero_inflated", [True, False], ids=["zinb", "nb"])
def test_values_and_gradients_match_float64_over_wide_ranges(kernel, zero_inflated):
    """θ ∈ [1e-4, 1e5], μ ∈ [1e-6, 1e5], counts up to 1e5, logits ∈ [-30, 30]: values and the
    gradients of a weighted sum within float32 rounding of the terms, and never much worse than
    the float32 torch formula."""
    generator = torch.Generator().manual_seed(0 if zero_inflated else 1)
    value, mu, theta, logits = _wide_inputs((160, 37), generator)
    worst = _assert_accurate(
        value, mu, theta, None if not zero_inflated else logits, _weights(value.shape, generator)
    )
    # the float32 torch formula has errors of the same order, so the tolerances are not loose
    assert max(plain for _, plain in worst.values()) > 0.25


def test_large_counts_are_at_least_as_accurate_as_the_float32_formula(kernel):
    """lgamma(x + θ) − lgamma(θ) − lgamma(x + 1) in double: at counts near 1e5 the fused value is
    no further from float64 than float32 torch's (which loses digits to cancellation)."""
    generator = torch.Generator().manual_seed(2)
    value = torch.floor(_log_uniform(1e4, 1e5, (64, 16), generator))
    mu = value * torch.empty(value.shape).uniform_(0.5, 2.0, generator=generator)
    theta = _log_uniform(1e-2, 1e3, (16,), generator)
    weights = torch.ones(value.shape)
    reference = _torch_formula(value, mu, theta, None, weights, torch.float64)[0]
    plain = _torch_formula(value, mu, theta, None, weights, torch.float32)[0]
    got = _kernel(value, mu, theta, None, weights)[0]
    fused_error, plain_error = (got - reference).abs().mean(), (plain - reference).abs().mean()
    assert fused_error <= plain_error, (float(fused_error), float(plain_error))


THETA_SHAPES = {"gene": lambda n, G: (G,), "row": lambda n, G: (1, G), "cell-gene": lambda n, G: (n, G)}


@pytest.mark.parametrize("n_genes", [1, 7, 16, 33])
@pytest.mark.parametrize("theta_shape", list(THETA_SHAPES))
def test_theta_shapes_and_vector_tails(kernel, theta_shape, n_genes):
    """θ per gene (G,), (1, G) or per entry (n, G), with G = 1, 7, 16, 33 (scalar tails of the
    vectorised loop), for ZINB and NB."""
    generator = torch.Generator().manual_seed(10 * n_genes + len(theta_shape))
    n = 9
    value, mu, theta, logits = _wide_inputs((n, n_genes), generator, THETA_SHAPES[theta_shape](n, n_genes))
    weights = _weights(value.shape, generator)
    _assert_accurate(value, mu, theta, logits, weights)
    _assert_accurate(value, mu, theta, None, weights)


@pytest.mark.parametrize(
    "value_shape,theta_shape",
    [((3, 5, 7), (7,)), ((3, 5, 7), (1, 1, 7)), ((3, 5, 7), (3, 5, 7)),
     ((1, 33), (33,)), ((33,), (33,)), ((1, 1), (1,))],
)
def test_leading_dims_and_single_rows(kernel, value_shape, theta_shape):
    """Counts with a sample axis (S, n, G), a single row (1, G), a 1-d row (G,) and a single entry."""
    generator = torch.Generator().manual_seed(sum(value_shape) + len(theta_shape))
    value, mu, theta, logits = _wide_inputs(value_shape, generator, theta_shape)
    assert fused.supports(value, mu, theta, logits)
    _assert_accurate(value, mu, theta, logits, _weights(value_shape, generator))


def test_non_contiguous_and_expanded_inputs(kernel):
    """Transposed μ / logits / θ and expanded counts give the results of their contiguous copies."""
    generator = torch.Generator().manual_seed(4)
    value, mu, theta, logits = _wide_inputs((12, 9), generator)
    weights = _weights((12, 9), generator)
    row = value[:1]
    strided = [
        row.expand(12, 9), mu.t().contiguous().t(), theta.t().contiguous().t(), logits.t().contiguous().t()
    ]
    assert not any(t.is_contiguous() for t in strided)
    want = _kernel(*(t.contiguous() for t in strided), weights)
    got = _kernel(*strided, weights)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


class _Spy:
    """Stands in for the loaded library and records the arguments of each kernel call."""

    def __init__(self, library):
        self.library, self.calls = library, []

    def nb_log_prob(self, *args):
        self.calls.append(args)
        return self.library.nb_log_prob(*args)


@pytest.fixture
def spy(kernel, monkeypatch):
    spy = _Spy(fused._library)
    monkeypatch.setattr(fused, "_library", spy)
    return spy


def _derivative_outputs(call):
    """Whether a recorded call asked for d_mu, d_theta, d_logits (non-NULL pointers)."""
    return tuple(pointer is not None for pointer in call[8:11])


@pytest.mark.parametrize("zero_inflated", [True, False], ids=["zinb", "nb"])
def test_values_only_path_gives_the_values_of_the_gradient_path(spy, zero_inflated):
    """Without parameters that require grad the kernel skips the derivatives (NULL outputs) and
    the values are those of the gradient path, to a few ulps: the two are separately compiled loops,
    which the compiler may vectorise at different widths, so they can call different libmvec
    variants of log/exp (each within 4 ulp); on an AVX-512 Xeon (gcc 12) they differ by up to 10
    ulp where θ ≫ μ makes θ·log(θ/(θ+μ)) cancel, and by 1 ulp on an AVX2 EPYC."""
    generator = torch.Generator().manual_seed(5)
    value, mu, theta, logits = _wide_inputs((11, 37), generator, (37,))
    logits = logits if zero_inflated else None
    params = [mu, theta] if logits is None else [mu, theta, logits]
    with_grad = fused.nb_log_prob(value, *(p.clone().requires_grad_() for p in params))
    values_only = fused.nb_log_prob(value, *params)
    with torch.no_grad():
        under_no_grad = fused.nb_log_prob(value, *(p.clone().requires_grad_() for p in params))
    assert _derivative_outputs(spy.calls[0])[:2] == (True, True)
    assert _derivative_outputs(spy.calls[0])[2] == zero_inflated
    assert _derivative_outputs(spy.calls[1]) == (False, False, False)
    assert not values_only.requires_grad and not under_no_grad.requires_grad
    for got in (values_only, under_no_grad):
        torch.testing.assert_close(got, with_grad.detach(), rtol=16 * EPS32, atol=16 * EPS32)
    # a parameter that requires grad alone switches the derivatives on
    fused.nb_log_prob(value, mu, theta.clone().requires_grad_(), logits)
    assert _derivative_outputs(spy.calls[-1])[:2] == (True, True)


def test_no_grad_skips_the_derivatives(spy):
    """Under torch.no_grad() (evaluation) the kernel need not compute the derivatives."""
    value, mu, theta = torch.ones(3, 5), torch.ones(3, 5, requires_grad=True), torch.ones(5)
    with torch.no_grad():
        fused.nb_log_prob(value, mu, theta)
    assert _derivative_outputs(spy.calls[-1]) == (False, False, False)


@pytest.mark.parametrize("n_rows", [1, 13])
def test_results_do_not_depend_on_the_thread_count(kernel, n_rows):
    """1, 2 and 3 threads (13 rows split unevenly, 1 row fewer than threads): bitwise equal."""
    generator = torch.Generator().manual_seed(6)
    value, mu, theta, logits = _wide_inputs((n_rows, 37), generator)
    gene_theta = theta[0]
    weights = _weights(value.shape, generator)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            zinb = _kernel(value, mu, theta, logits, weights)
            nb = _kernel(value, mu, gene_theta, None, weights)
            results.append((zinb, nb))
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous
    (zinb_1, nb_1) = results[0]
    for zinb, nb in results[1:]:
        for a, b in zip(zinb, zinb_1):
            assert torch.equal(a, b)
        for a, b in zip(nb[:2], nb_1[:2]):  # value, μ gradient: elementwise
            assert torch.equal(a, b)
        # the per-gene θ gradient is a torch sum over rows, whose order may depend on the threads
        torch.testing.assert_close(nb[2], nb_1[2], rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("parameter", ["mu", "theta", "gene-theta", "logits"])
@pytest.mark.parametrize("position", [0, 15, 16, 32])
def test_nan_parameters_give_nan_results(kernel, parameter, position):
    """A NaN in μ, θ or the logits (in the vector body or the tail, zero or non-zero count) makes the
    affected entries NaN (the training loop must notice) and leaves the others unchanged."""
    generator = torch.Generator().manual_seed(7)
    value, mu, theta, logits = _wide_inputs((4, 33), generator)
    value[1, ::2], value[2, 1::2] = 0.0, 0.0  # row 1: zero at even positions, row 2 at odd ones
    value[1, 1::2], value[2, ::2] = 3.0, 3.0
    gene_theta = theta[0].clone()
    clean = {
        "value": value,
        "mu": mu,
        "theta": gene_theta if parameter == "gene-theta" else theta,
        "logits": logits,
    }
    dirty = {name: t.clone() for name, t in clean.items()}
    affected = torch.zeros(value.shape, dtype=torch.bool)
    if parameter == "gene-theta":
        dirty["theta"][position] = float("nan")
        affected[:, position] = True
    else:
        for row in (1, 2):
            dirty["theta" if parameter == "theta" else parameter][row, position] = float("nan")
        affected[1:3, position] = True
    for zero_inflated in (True, False):
        if parameter == "logits" and not zero_inflated:
            continue
        args = ["value", "mu", "theta"] + (["logits"] if zero_inflated else [])
        want = fused.nb_log_prob(*(clean[a] for a in args))
        got = fused.nb_log_prob(*(dirty[a] for a in args))
        assert torch.isnan(got[affected]).all(), got[affected]
        assert torch.equal(got[~affected], want[~affected])
        # and the gradient with respect to the NaN parameter is NaN there too (backward of a NaN loss)
        params = [dirty[a].clone().requires_grad_() for a in args[1:]]
        fused.nb_log_prob(dirty["value"], *params).sum().backward()
        grad = params[args[1:].index("theta" if parameter == "gene-theta" else parameter)].grad
        if parameter == "gene-theta":
            assert torch.isnan(grad[position])
        elif parameter == "logits":
            assert torch.isnan(grad[affected]).all()
        else:
            assert (~torch.isfinite(grad[affected])).all()


def test_supports_and_refusals(kernel):
    """float64, broadcast μ or logits, θ per cell (n, 1) or per entry with a sample axis: not
    supported, and nb_log_prob raises ValueError for them."""
    n, G = 4, 6
    value, mu, logits = torch.ones(n, G), torch.ones(n, G), torch.zeros(n, G)
    for theta in (torch.ones(G), torch.ones(1, G), torch.ones(n, G)):
        assert fused.supports(value, mu, theta, logits) and fused.supports(value, mu, theta, None)
    assert fused.supports(torch.ones(2, n, G), torch.ones(2, n, G), torch.ones(1, 1, G), None)
    unsupported = [
        (value.double(), mu.double(), torch.ones(G, dtype=torch.float64), logits.double()),
        (value, mu.double(), torch.ones(G), logits),
        (value, mu, torch.ones(G, dtype=torch.float64), None),
        (value, mu, torch.ones(G), logits.double()),
        (value, torch.ones(1, G), torch.ones(G), logits),  # μ broadcast over rows
        (value, torch.ones(G), torch.ones(G), None),
        (value, mu, torch.ones(G), torch.zeros(1, G)),  # logits broadcast over rows
        (value, mu, torch.ones(G), torch.zeros(n, 1)),
        (value, mu, torch.ones(n, 1), logits),  # θ per cell
        (value, mu, torch.ones(n, 1), None),
        (value, mu, torch.ones(()), None),  # scalar θ
        (value, mu, torch.ones(G + 1), None),
        (torch.ones(2, n, G), torch.ones(2, n, G), torch.ones(n, G), None),  # θ (n, G) under a sample axis
        (torch.ones(()), torch.ones(()), torch.ones(()), None),
        (torch.ones(0, G), torch.ones(0, G), torch.ones(G), None),
    ]
    for args in unsupported:
        assert not fused.supports(*args), [tuple(a.shape) for a in args if a is not None]
        with pytest.raises(ValueError):
            fused.nb_log_prob(*args)


def _subnormals_survive() -> bool:
    tiny = torch.full((1 << 16,), 1e-44)  # large enough for torch to split it over threads
    return bool((tiny / 2 != 0).all()) and bool(np.float32(1e-44) / np.float32(2) != 0) and 1e-310 / 2 != 0


def test_loading_the_library_keeps_subnormals(kernel):
    """-ffast-math is not used to link: loading and running the kernel does not switch on flush-to-zero."""
    fused.nb_log_prob(torch.ones(64, 8), torch.ones(64, 8), torch.ones(8), torch.zeros(64, 8))
    assert float(torch.tensor(1e-44) / 2) != 0.0
    assert _subnormals_survive()


def _run_python(code: str, env_changes: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_changes}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_without_a_compiler_log_prob_falls_back_to_the_torch_formula(tmp_path):
    """CC=/nonexistent/cc: not available, the reason says why, nb_log_prob refuses, ZINB and NB
    log_prob still work and equal the dense formula, and no build leftovers remain."""
    result = _run_python(
        """
        import torch
        from pyro_scvi.distributions import fused
        from pyro_scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial, dense_log_prob
        assert fused.available() is False
        print("REASON", fused.unavailable_reason())
        try:
            fused.nb_log_prob(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3))
        except RuntimeError as error:
            print("REFUSED", error)
        g = torch.Generator().manual_seed(0)
        value = torch.poisson(torch.full((6, 5), 2.0), generator=g)
        mu = torch.rand(6, 5, generator=g) * 5 + 0.1
        theta, logits = torch.rand(5, generator=g) + 0.5, torch.randn(6, 5, generator=g)
        for make, args in (
            (ZeroInflatedNegativeBinomial, (mu, theta, logits)),
            (NegativeBinomial, (mu, theta)),
        ):
            got = make(*args).log_prob(value)
            with dense_log_prob():
                want = make(*args).log_prob(value)
            assert torch.isfinite(got).all() and got.shape == (6, 5)
            torch.testing.assert_close(got, want)
        print("FALLBACK OK")
        """,
        {"CC": "/nonexistent/cc", "PYRO_SCVI_CACHE": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reason = next(line for line in result.stdout.splitlines() if line.startswith("REASON"))
    assert "could not build" in reason and "/nonexistent/cc" in reason, reason
    assert "REFUSED The fused kernel is not available" in result.stdout
    assert "FALLBACK OK" in result.stdout
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_first_use_builds_the_library_into_the_cache_folder(kernel, tmp_path):
    """A fresh PYRO_SCVI_CACHE: the library is compiled into it (only the .so, no .o or temporary
    .so left), loads, computes, and keeps subnormals in the fresh process."""
    cache = tmp_path / "cache"
    result = _run_python(
        """
        import torch, numpy as np
        from pyro_scvi.distributions import fused
        print("BEFORE", fused.library_path().exists())
        assert fused.available(), fused.unavailable_reason()
        assert fused.unavailable_reason() is None
        print("PATH", fused.library_path())
        lp = fused.nb_log_prob(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(3))
        torch.testing.assert_close(lp, torch.full((2, 3), -torch.log(torch.tensor(2.0)).item()))
        tiny = torch.full((1 << 16,), 1e-44)
        print("SUBNORMALS", bool((tiny / 2 != 0).all()), bool(np.float32(1e-44) / np.float32(2) != 0))
        """,
        {"PYRO_SCVI_CACHE": str(cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["BEFORE"] == "False"
    path = Path(lines["PATH"])
    assert path.parent == cache and path.exists() and path.suffix == ".so"
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no .o, no temporary .so
    assert lines["SUBNORMALS"] == "True True"


POINTS = [  # (count, μ, θ, logit)
    (0.0, 5.0, 0.5, -1.0),
    (3.0, 2.0, 1e-3, 0.5),
    (1000.0, 800.0, 50.0, 2.0),
    (7.0, 1e-4, 1e4, -3.0),
    (0.0, 1e3, 1e4, 5.0),
    (1.0, 0.3, 3.0, -15.0),
    (25000.0, 1e5, 0.05, 0.0),
]


@pytest.mark.parametrize("zero_inflated", [True, False], ids=["zinb", "nb"])
def test_gradients_match_central_differences_of_the_float64_formula(kernel, zero_inflated):
    """gradcheck needs float64; instead the kernel's θ (and μ, logit) derivatives are compared with
    central differences of the float64 torch formula, within float32 rounding of their terms."""
    columns = [torch.tensor(c, dtype=torch.float32).unsqueeze(0) for c in zip(*POINTS)]
    value, mu, theta, logits = columns
    logits = logits if zero_inflated else None
    got = _kernel(value, mu, theta, logits, torch.ones(value.shape))
    scales = _scales(value, mu, theta, logits)
    params64 = [p.double() for p in ((mu, theta) if logits is None else (mu, theta, logits))]

    def formula(params):
        with dense_log_prob():
            make = NegativeBinomial if logits is None else ZeroInflatedNegativeBinomial
            return make(*params, validate_args=False).log_prob(value.double())

    for index in range(len(params64)):
        step = 1e-6 * params64[index].abs().clamp_min(1.0) if index == 2 else 1e-6 * params64[index]
        up = [p + step if i == index else p for i, p in enumerate(params64)]
        down = [p - step if i == index else p for i, p in enumerate(params64)]
        difference = (formula(up) - formula(down)) / (2 * step)
        tolerance = 8 * EPS32 * scales[index + 1] + 1e-6 * difference.abs() + 1e-12
        error = (got[index + 1] - difference).abs()
        assert (error <= tolerance).all(), (index, got[index + 1].tolist(), difference.tolist())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0, 1e12, 3e9, 1023.0, 1024.0, 1023.5])
def test_counts_outside_the_log_factorial_table_are_handled(kernel, bad):
    """Counts the log x! table does not cover (NaN, inf, negative, huge, fractional, the table's
    edge) neither index outside it nor change the other entries; finite ones equal the formula."""
    value = torch.full((3, 37), bad)
    value[:, 1] = 2.0
    mu, theta, logits = torch.full((3, 37), 3.0), torch.full((37,), 1.5), torch.zeros(3, 37)
    for args in ((mu, theta, logits), (mu, theta)):
        got = fused.nb_log_prob(value, *args)
        with dense_log_prob():
            make = ZeroInflatedNegativeBinomial if len(args) == 3 else NegativeBinomial
            want = make(*(a.double() for a in args), validate_args=False).log_prob(value.double())
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite) or not finite.all()
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-4)
