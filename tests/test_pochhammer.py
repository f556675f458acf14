"""Per-gene lookup tables for the NB count terms against lgamma/digamma (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import gammaln

from pyro_scvi.distributions.pochhammer import TABLE_SIZE, is_integer_valued, log_factorial, log_pochhammer


@pytest.fixture
def counts_and_theta():
    generator = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.full((6, 9), 8.0, dtype=torch.float64), generator=generator)
    counts[0, 0], counts[1, 1], counts[2, 2] = 0, TABLE_SIZE, TABLE_SIZE + 1  # the table's edges
    counts[3, 3] = 25_000  # far beyond the table
    theta = (torch.rand(9, generator=generator, dtype=torch.float64) * 50 + 1e-3).requires_grad_()
    return counts, theta


@pytest.mark.parametrize("layout", ["dense", "flat"])
def test_log_pochhammer_equals_lgamma_difference_and_its_gradient(counts_and_theta, layout):
    counts, theta = counts_and_theta
    expected = gammaln(counts.numpy() + theta.detach().numpy()) - gammaln(theta.detach().numpy())
    if layout == "dense":
        got = log_pochhammer(counts, theta)
    else:
        gene = torch.arange(9).repeat(6)
        got = log_pochhammer(counts.reshape(-1), theta, gene).reshape(6, 9)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-12, atol=1e-10)
    upstream = torch.linspace(-1, 2, got.numel(), dtype=torch.float64).reshape(got.shape)
    (got * upstream).sum().backward()
    expected_grad = ((torch.digamma(counts + theta) - torch.digamma(theta)) * upstream).sum(0)
    torch.testing.assert_close(theta.grad, expected_grad.detach(), rtol=1e-10, atol=1e-10)


def test_gradcheck_and_leading_dims(counts_and_theta):
    counts, theta = counts_and_theta
    assert torch.autograd.gradcheck(
        lambda t: log_pochhammer(counts[:, :4], t), (theta[:4].detach().requires_grad_(),)
    )
    stacked = log_pochhammer(counts.expand(2, 6, 9), theta)  # (S, n, G) counts
    torch.testing.assert_close(stacked[1], log_pochhammer(counts, theta))


def test_log_factorial_and_integer_check():
    x = torch.tensor([0.0, 1.0, 5.0, float(TABLE_SIZE), TABLE_SIZE + 1.0, 1e6])
    np.testing.assert_allclose(log_factorial(x).numpy(), gammaln(x.numpy() + 1), rtol=1e-6)
    assert is_integer_valued(x) and not is_integer_valued(torch.tensor([1.0, 2.5]))
