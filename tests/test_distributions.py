"""Tests of pyro_scvi.distributions: NB / ZINB in scVI's (μ, θ, ℓ) parametrisation.

Reference values are computed in float64 with SciPy. About the ε = 1e-8 of scvi-tools'
formula (``log(μ+ε)``, ``log(θ+ε)``, ``log(θ+μ+ε)``): it shifts the log-density from the exact
negative binomial by at most about ``2ε + x·ε·θ / (μ·(θ+μ))`` nats. With μ ≥ 1e-3 and x ≤ 1e5 that
is below 1e-5 relative to the log-density itself (worst case ≈ 9.5e-6 at μ = 1e-3, θ = 1e-4,
x = 1e5), so the SciPy comparison uses rtol = atol = 1e-5 on that range. Smaller μ or θ are
checked against a direct float64 evaluation of the ε-formula instead, where the ε matters.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from pyro_scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial

EPS = 1e-8
THETAS = [1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6]
MUS = [1e-3, 1e-2, 0.1, 1.0, 10.0, 1e2, 1e3, 1e4]
COUNTS = [0, 1, 2, 3, 7, 20, 100, 1_000, 10_000, 100_000]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def _grid_and_random(rng, n_random=3000):
    """(x, μ, θ) as float64 arrays: the full grid of extreme values plus random log-uniform draws."""
    x, mu, theta = (a.ravel() for a in np.meshgrid(COUNTS, MUS, THETAS, indexing="ij"))
    r_theta = np.exp(rng.uniform(np.log(1e-4), np.log(1e6), n_random))
    r_mu = np.exp(rng.uniform(np.log(1e-3), np.log(1e4), n_random))
    # half near the mean (the likely counts), half spread up to 1e5
    r_x = np.concatenate(
        [
            rng.poisson(r_mu[: n_random // 2]).clip(max=100_000),
            np.floor(rng.uniform(0, 1, n_random - n_random // 2) ** 4 * 100_000),
        ]
    )
    return (
        np.concatenate([x, r_x]).astype(np.float64),
        np.concatenate([mu, r_mu]),
        np.concatenate([theta, r_theta]),
    )


def _scipy_nb_logpmf(x, mu, theta):
    return stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))


def _eps_formula_log_nb(x, mu, theta):
    """scvi-tools' ε-formula, evaluated directly in float64 NumPy/SciPy."""
    log_theta_mu_eps = np.log(theta + mu + EPS)
    return (
        theta * (np.log(theta + EPS) - log_theta_mu_eps)
        + x * (np.log(mu + EPS) - log_theta_mu_eps)
        + special.gammaln(x + theta)
        - special.gammaln(theta)
        - special.gammaln(x + 1)
    )


def _scipy_zinb_logpmf(x, mu, theta, logits):
    """log(π + (1−π)·NB(0)) at x = 0 and log(1−π) + log NB(x) at x > 0 (float64).

    The x = 0 case is written as logaddexp(log π, log(1−π) + log NB(0)), the same quantity
    without underflow of NB(0) (which is below 1e-308 for e.g. θ = 1e6, μ = 1e4).
    """
    log_pi = -np.logaddexp(0, -logits)  # log sigmoid(ℓ)
    log_one_minus_pi = -np.logaddexp(0, logits)  # log sigmoid(−ℓ)
    log_nb = _scipy_nb_logpmf(x, mu, theta)
    return np.where(x == 0, np.logaddexp(log_pi, log_one_minus_pi + log_nb), log_one_minus_pi + log_nb)


def _t(*arrays, dtype=torch.float64):
    return tuple(torch.as_tensor(a, dtype=dtype) for a in arrays)


# ---------------------------------------------------------------------------------------------
# 1. NB log-density
# ---------------------------------------------------------------------------------------------


def test_nb_log_prob_matches_scipy(rng):
    x, mu, theta = _grid_and_random(rng)
    tx, tmu, ttheta = _t(x, mu, theta)
    ours = NegativeBinomial(tmu, ttheta).log_prob(tx).numpy()
    np.testing.assert_allclose(ours, _scipy_nb_logpmf(x, mu, theta), rtol=1e-5, atol=1e-5)


def test_nb_log_prob_matches_eps_formula_including_tiny_parameters(rng):
    # Down to μ, θ = 1e-7, where ε = 1e-8 is no longer negligible and SciPy would differ.
    n = 4000
    theta = np.exp(rng.uniform(np.log(1e-7), np.log(1e6), n))
    mu = np.exp(rng.uniform(np.log(1e-7), np.log(1e4), n))
    x = np.floor(rng.uniform(0, 1, n) ** 4 * 100_000)
    x[: n // 4] = 0
    ours = NegativeBinomial(*_t(mu, theta)).log_prob(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(ours, _eps_formula_log_nb(x, mu, theta), rtol=1e-9, atol=1e-8)


def test_nb_eps_explains_difference_from_scipy_at_tiny_mean():
    # μ = 1e-6, θ = 1, x = 1000: ε adds ≈ x·ε/μ = 10 nats to the exact log-density.
    x, mu, theta = np.array([1000.0]), np.array([1e-6]), np.array([1.0])
    ours = NegativeBinomial(*_t(mu, theta)).log_prob(torch.as_tensor(x)).numpy()
    exact = _scipy_nb_logpmf(x, mu, theta)
    np.testing.assert_allclose(ours - exact, x * np.log1p(EPS / mu), rtol=1e-4)


def test_nb_float32_agrees_with_float64_on_moderate_parameters(rng):
    # float32 loses absolute precision in lgamma(x+θ) − lgamma(θ) (values ~1e3–1e4 here) —
    # the same cancellation scvi-tools has; for θ ≳ 1e4 the float32 error reaches 1e-2..1 nats.
    n = 5000
    theta = np.exp(rng.uniform(np.log(0.1), np.log(100), n))
    mu = np.exp(rng.uniform(np.log(0.01), np.log(1000), n))
    x = np.concatenate([rng.poisson(mu[: n // 2]), rng.integers(0, 1000, n - n // 2)]).astype(float)
    lp64 = NegativeBinomial(*_t(mu, theta)).log_prob(torch.as_tensor(x)).numpy()
    lp32 = NegativeBinomial(*_t(mu, theta, dtype=torch.float32)).log_prob(
        torch.as_tensor(x, dtype=torch.float32)
    )
    assert lp32.dtype == torch.float32
    np.testing.assert_allclose(lp32.double().numpy(), lp64, rtol=1e-3, atol=5e-3)


def test_integer_values_are_accepted():
    d = NegativeBinomial(torch.tensor([2.0, 3.0]), torch.tensor(1.5))
    np.testing.assert_array_equal(
        d.log_prob(torch.tensor([0, 4])).numpy(), d.log_prob(torch.tensor([0.0, 4.0])).numpy()
    )


# ---------------------------------------------------------------------------------------------
# 2. ZINB log-density
# ---------------------------------------------------------------------------------------------


def test_zinb_log_prob_matches_scipy(rng):
    x, mu, theta = _grid_and_random(rng)
    x[::3] = 0  # plenty of zeros for every parameter combination
    logits = rng.uniform(-10, 10, x.shape)
    ours = ZeroInflatedNegativeBinomial(*_t(mu, theta, logits)).log_prob(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(
        ours, _scipy_zinb_logpmf(x, mu, theta, logits), rtol=1e-5, atol=1e-5
    )


def test_zinb_with_very_negative_logits_is_nb():
    mu, theta = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    x = torch.tensor([[0.0], [1.0], [9.0]], dtype=torch.float64)
    zinb = ZeroInflatedNegativeBinomial(mu, theta, torch.tensor(-40.0, dtype=torch.float64))
    torch.testing.assert_close(
        zinb.log_prob(x), NegativeBinomial(mu, theta).log_prob(x), rtol=1e-12, atol=1e-12
    )


# ---------------------------------------------------------------------------------------------
# 3. Sampling moments
# ---------------------------------------------------------------------------------------------

N_SAMPLES = 200_000
MOMENT_CASES = [  # (μ, θ, ℓ)
    (5.0, 2.0, -1.0),
    (0.3, 10.0, 0.5),
    (40.0, 0.8, -2.0),
    (2.0, 1e4, 0.0),
]


def _check_mean_and_variance(samples, mean, var, n_se=5.0):
    n = samples.numel()
    s = samples.double()
    centred = s - s.mean()
    sample_var = centred.pow(2).mean()
    se_mean = (var / n) ** 0.5
    # standard error of the sample variance: sqrt((m4 − σ⁴)/n), m4 estimated from the draws
    se_var = ((centred.pow(4).mean() - sample_var**2) / n).sqrt().item()
    assert abs(s.mean().item() - mean) < n_se * se_mean, (s.mean().item(), mean, se_mean)
    assert abs(sample_var.item() - var) < n_se * se_var, (sample_var.item(), var, se_var)


@pytest.mark.parametrize("mu,theta,logits", MOMENT_CASES)
def test_nb_sample_moments(mu, theta, logits):
    d = NegativeBinomial(torch.tensor(mu), torch.tensor(theta))
    samples = d.sample((N_SAMPLES,))
    assert samples.shape == (N_SAMPLES,) and samples.dtype == torch.float32
    assert torch.all(samples >= 0) and torch.all(samples == samples.round())
    _check_mean_and_variance(samples, mu, mu + mu**2 / theta)
    assert d.mean.item() == pytest.approx(mu)
    assert d.variance.item() == pytest.approx(mu + mu**2 / theta)


@pytest.mark.parametrize("mu,theta,logits", MOMENT_CASES)
def test_zinb_sample_moments_and_zero_fraction(mu, theta, logits):
    d = ZeroInflatedNegativeBinomial(torch.tensor(mu), torch.tensor(theta), torch.tensor(logits))
    samples = d.sample((N_SAMPLES,))
    assert samples.shape == (N_SAMPLES,) and samples.dtype == torch.float32
    pi = 1 / (1 + np.exp(-logits))
    mean = (1 - pi) * mu
    var = (1 - pi) * mu * (mu + theta + pi * mu * theta) / theta
    _check_mean_and_variance(samples, mean, var)
    assert d.mean.item() == pytest.approx(mean, rel=1e-6)
    assert d.variance.item() == pytest.approx(var, rel=1e-5)
    assert d.nb_mean.item() == pytest.approx(mu)
    assert d.zero_inflation_probs.item() == pytest.approx(pi, rel=1e-6)

    p_zero = pi + (1 - pi) * (theta / (theta + mu)) ** theta
    frac_zero = (samples == 0).double().mean().item()
    assert abs(frac_zero - p_zero) < 5 * np.sqrt(p_zero * (1 - p_zero) / N_SAMPLES)


def test_sampling_respects_manual_seed():
    d = ZeroInflatedNegativeBinomial(torch.full((50,), 3.0), torch.tensor(2.0), torch.zeros(50))
    torch.manual_seed(7)
    a = d.sample((3,))
    torch.manual_seed(7)
    b = d.sample((3,))
    torch.testing.assert_close(a, b)


def test_sampling_extreme_parameters_is_finite():
    mu = torch.tensor([1e-3, 1e4, 1e4, 1.0])
    theta = torch.tensor([1e-4, 1e-4, 1e6, 1e6])
    samples = NegativeBinomial(mu, theta).sample((1000,))
    assert torch.isfinite(samples).all() and (samples >= 0).all()
    assert samples.max() <= 1e8 * 1.01  # gamma draw clamped to 1e8 before the Poisson


# ---------------------------------------------------------------------------------------------
# 4. Gradients
# ---------------------------------------------------------------------------------------------


def test_gradients_are_finite_float32_with_zeros_and_nonzeros():
    n, g = 64, 30
    mu = torch.exp(torch.empty(n, g).uniform_(np.log(1e-3), np.log(1e4))).requires_grad_()
    theta = torch.exp(torch.empty(g).uniform_(np.log(1e-4), np.log(1e4))).requires_grad_()
    logits = torch.empty(n, g).uniform_(-10, 10).requires_grad_()
    x = torch.poisson(mu.detach())
    x[torch.rand(n, g) < 0.8] = 0
    assert (x == 0).any() and (x > 0).any()

    lp = ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(x)
    lp.sum().backward()
    for p in (mu, theta, logits):
        assert torch.isfinite(p.grad).all()

    mu.grad = theta.grad = None
    NegativeBinomial(mu, theta).log_prob(x).sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(theta.grad).all()


def test_zinb_gradient_at_zero_is_that_of_the_zero_branch():
    # At x = 0 the gradient must come from softplus(−ℓ + log NB(0)) − softplus(−ℓ) only.
    mu = torch.tensor([0.7, 12.0], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([3.0, 0.2], dtype=torch.float64, requires_grad=True)
    logits = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(
        torch.zeros(2, dtype=torch.float64)
    ).sum().backward()
    # closed form: log(π + (1−π)p0), p0 = (θ/(θ+μ))^θ
    m, t, lg = (v.detach() for v in (mu, theta, logits))
    pi = torch.sigmoid(lg)
    p0 = (t / (t + m)) ** t
    denom = pi + (1 - pi) * p0
    dp0_dmu = p0 * (-t / (t + m))
    torch.testing.assert_close(mu.grad, (1 - pi) * dp0_dmu / denom, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(logits.grad, pi * (1 - pi) * (1 - p0) / denom, rtol=1e-6, atol=1e-10)


def test_gradcheck_float64():
    x = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 30.0]], dtype=torch.float64)
    mu = torch.tensor([[0.5, 2.0, 10.0], [3.0, 0.1, 25.0]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.7, 5.0, 2.0], dtype=torch.float64, requires_grad=True)
    logits = torch.tensor([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(
        lambda m, t, lg: ZeroInflatedNegativeBinomial(m, t, lg).log_prob(x), (mu, theta, logits)
    )
    assert torch.autograd.gradcheck(lambda m, t: NegativeBinomial(m, t).log_prob(x), (mu, theta))


# ---------------------------------------------------------------------------------------------
# 5. Shapes, expand, to_event, Pyro integration, validation
# ---------------------------------------------------------------------------------------------


def _zinb_params(n=5, g=7):
    return torch.rand(n, g) * 5 + 0.1, torch.rand(g) + 0.5, torch.randn(n, g)


def test_broadcasting_and_batch_shape():
    mu, theta, logits = _zinb_params()
    nb = NegativeBinomial(mu, theta)
    zinb = ZeroInflatedNegativeBinomial(mu, theta, logits)
    for d in (nb, zinb):
        assert d.batch_shape == (5, 7) and d.event_shape == ()
        assert d.inverse_dispersion.shape == (5, 7)
        assert d.mean.shape == d.variance.shape == (5, 7)
        assert d.sample().shape == (5, 7)
        assert d.sample((3,)).shape == (3, 5, 7)
        assert d.log_prob(torch.zeros(5, 7)).shape == (5, 7)
        assert d.log_prob(torch.tensor(2.0)).shape == (5, 7)  # scalar value broadcasts
        assert d.log_prob(torch.zeros(4, 1, 1)).shape == (4, 5, 7)
    assert zinb.nb_mean.shape == zinb.zero_inflation_logits.shape == zinb.zero_inflation_probs.shape == (5, 7)
    # Python numbers are accepted and broadcast
    assert ZeroInflatedNegativeBinomial(mu, 2.0, 0.0).batch_shape == (5, 7)
    assert NegativeBinomial(1.0, 2.0).batch_shape == ()


def test_expand():
    mu, theta, logits = _zinb_params()
    x = torch.poisson(torch.rand(3, 5, 7) * 4)
    for d in (NegativeBinomial(mu, theta), ZeroInflatedNegativeBinomial(mu, theta, logits)):
        e = d.expand((3, 5, 7))
        assert type(e) is type(d) and e.batch_shape == (3, 5, 7)
        assert e.sample().shape == (3, 5, 7)
        torch.testing.assert_close(e.log_prob(x), d.log_prob(x))
        torch.testing.assert_close(e.mean, d.mean.expand(3, 5, 7))
    # expanding singleton dims of the parameters
    small = ZeroInflatedNegativeBinomial(mu[:1], theta, logits[:1]).expand((5, 7))
    full = ZeroInflatedNegativeBinomial(mu[:1].expand(5, 7), theta, logits[:1].expand(5, 7))
    x = torch.poisson(torch.rand(5, 7) * 4)
    torch.testing.assert_close(small.log_prob(x), full.log_prob(x))
    assert small.log_prob(torch.tensor(0.0)).shape == (5, 7)


def test_to_event_log_prob_shape():
    mu, theta, logits = _zinb_params()
    x = torch.poisson(mu)
    d = ZeroInflatedNegativeBinomial(mu, theta, logits).to_event(1)
    assert d.batch_shape == (5,) and d.event_shape == (7,)
    lp = d.log_prob(x)
    assert lp.shape == (5,)
    torch.testing.assert_close(lp, ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(x).sum(-1))


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_pyro_sample_in_plate(zero_inflated):
    mu, theta, logits = _zinb_params()
    x = torch.poisson(mu)

    def model(obs=None):
        with pyro.plate("cells", 5):
            d = (
                ZeroInflatedNegativeBinomial(mu, theta, logits)
                if zero_inflated
                else NegativeBinomial(mu, theta)
            )
            return pyro.sample("x", d.to_event(1), obs=obs)

    tr = poutine.trace(model).get_trace(x)
    tr.compute_log_prob()
    assert tr.nodes["x"]["log_prob"].shape == (5,)
    assert torch.isfinite(tr.log_prob_sum())

    tr = poutine.trace(model).get_trace()
    assert tr.nodes["x"]["value"].shape == (5, 7)

    # a distribution with a smaller batch shape is expanded by the plate
    def model_expand():
        with pyro.plate("cells", 5, dim=-2):
            return pyro.sample("x", ZeroInflatedNegativeBinomial(mu[0], theta, logits[0]))

    assert poutine.trace(model_expand).get_trace().nodes["x"]["value"].shape == (5, 7)


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_validation(zero_inflated):
    def make(mu, theta, validate_args):
        if zero_inflated:
            return ZeroInflatedNegativeBinomial(mu, theta, torch.zeros(()), validate_args=validate_args)
        return NegativeBinomial(mu, theta, validate_args=validate_args)

    d = make(torch.tensor([1.0, 2.0]), torch.tensor(3.0), True)
    for bad in ([0.5, 1.0], [-1.0, 0.0]):
        with pytest.raises(ValueError):
            d.log_prob(torch.tensor(bad))
    with pytest.raises(ValueError):
        d.log_prob(torch.zeros(3))  # not broadcastable with batch_shape (2,)
    with pytest.raises(ValueError):
        make(torch.tensor([1.0, -2.0]), torch.tensor(3.0), True)
    with pytest.raises(ValueError):
        make(torch.tensor([1.0, 2.0]), torch.tensor(0.0), True)
    # without validation, non-integer values are scored by the continuous formula
    d = make(torch.tensor([1.0, 2.0]), torch.tensor(3.0), False)
    assert torch.isfinite(d.log_prob(torch.tensor([0.5, 1.5]))).all()
    assert d.expand((4, 2))._validate_args is False


# ---------------------------------------------------------------------------------------------
# 6. Property tests
# ---------------------------------------------------------------------------------------------


@st.composite
def _shape_and_params(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    size = int(np.prod(shape)) if shape else 1
    floats = lambda lo, hi: st.lists(st.floats(lo, hi), min_size=size, max_size=size)  # noqa: E731
    mu = np.array(draw(floats(np.log(1e-3), np.log(50.0))))
    theta = np.array(draw(floats(np.log(0.1), np.log(100.0))))
    logits = np.array(draw(floats(-5.0, 5.0)))
    as_t = lambda a: torch.tensor(a, dtype=torch.float64).reshape(shape)  # noqa: E731
    return shape, as_t(np.exp(mu)), as_t(np.exp(theta)), as_t(logits)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(_shape_and_params())
def test_property_log_prob_nonpositive_and_normalised(case):
    shape, mu, theta, logits = case
    # Truncation point with a negligible tail: the NB tail decays like (μ/(θ+μ))^x, so
    # 40·(θ+μ)/θ terms beyond the bulk leave < e^-40; plus 40 standard deviations for large θ.
    sd = torch.sqrt(mu + mu**2 / theta)
    k = int((mu + 40 * sd + 40 * (theta + mu) / theta).max().item()) + 50
    x = torch.arange(k + 1, dtype=torch.float64).reshape((-1,) + (1,) * len(shape))
    for d in (NegativeBinomial(mu, theta), ZeroInflatedNegativeBinomial(mu, theta, logits)):
        lp = d.log_prob(x)
        assert lp.shape == (k + 1,) + shape
        assert (lp <= 1e-12).all()
        # ε = 1e-8 makes the ε-formula sum to ((θ+ε)/θ)^θ ≈ 1 + ε, not exactly 1
        total = torch.logsumexp(lp, dim=0).exp()
        torch.testing.assert_close(total, torch.ones(shape, dtype=torch.float64), rtol=0, atol=1e-6)
