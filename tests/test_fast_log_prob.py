"""The fast paths of training give the plain path's numbers.

* The fused CPU kernel (:mod:`pyro_scvi.distributions.fused`), the sparse-aware NB/ZINB log-density
  (lgamma terms only at non-zero counts) against the dense formula: values and gradients to float32
  precision, for every parameter shape the model uses.
* The single joint Adam against Pyro's one-optimiser-per-parameter ``PyroOptim``.
* A whole ELBO step of the model (loss and every parameter gradient) with and without the fast path.
"""

from __future__ import annotations

import pyro
import pyro.optim
import pytest
import torch

import pyro_scvi.distributions.negative_binomial as distributions
from pyro_scvi import SCVI
from pyro_scvi.data.loader import RegisteredData
from pyro_scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial, dense_log_prob, fused
from pyro_scvi.infer.elbo import elbo_terms
from pyro_scvi.infer.optim import JointOptimizer


@pytest.fixture(autouse=True, params=["fused", "sparse", "dense-tables"])
def fast_path(request, monkeypatch):
    """Run every comparison three times: on the fused kernel where it applies, and without it
    always on the sparse-aware path (whatever the density), and always on the dense layout (with
    the per-gene lookup tables where they apply)."""
    if request.param == "fused":
        if not fused.expected():
            pytest.skip(f"fused kernel not buildable here: {fused.unavailable_reason()}")
        assert fused.available(), (
            f"the fused kernel should build here but did not: {fused.unavailable_reason()}"
        )
    else:
        monkeypatch.setattr(fused, "available", lambda: False)
    monkeypatch.setattr(distributions, "SPARSE_DENSITY_THRESHOLD", 1.01 if request.param == "sparse" else 0.0)
    return request.param


def test_the_sparse_path_is_chosen_by_density_device_and_shape(monkeypatch, fast_path):
    # the sparse path is the fallback of the fused kernel
    monkeypatch.setattr(fused, "available", lambda: False)
    monkeypatch.setattr(distributions, "SPARSE_DENSITY_THRESHOLD", 0.5)
    calls = []
    real = distributions._log_zinb_sparse
    monkeypatch.setattr(distributions, "_log_zinb_sparse", lambda *a: calls.append(1) or real(*a))
    mu, theta, logits = torch.ones(4, 10), torch.ones(10), torch.zeros(4, 10)
    sparse_counts = torch.zeros(4, 10)
    sparse_counts[:, 0] = 3.0  # 10% non-zero
    ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(sparse_counts)
    assert len(calls) == 1
    ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(torch.ones(4, 10))  # 100% non-zero: dense
    ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(sparse_counts[0])  # broadcast value: dense
    with dense_log_prob():
        ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(sparse_counts)
    assert len(calls) == 1


def _counts(shape, density, generator):
    counts = torch.poisson(torch.full(shape, 3.0), generator=generator)
    counts[torch.rand(shape, generator=generator) > density] = 0
    counts.view(-1)[0] = 0  # at least one zero and one large count
    counts.view(-1)[-1] = 4000
    return counts


def _value_and_grads(make, value, params, dense: bool):
    for p in params:
        p.grad = None
    if dense:
        with dense_log_prob():
            log_prob = make(*params).log_prob(value)
    else:
        log_prob = make(*params).log_prob(value)
    # a non-uniform upstream gradient
    weights = torch.linspace(0.5, 1.5, log_prob.numel()).reshape(log_prob.shape)
    (log_prob * weights).sum().backward()
    return log_prob.detach(), [p.grad.clone() for p in params]


THETA_SHAPES = {"gene": (7,), "cell-gene": (5, 7), "broadcast-row": (1, 7), "scalar": ()}


@pytest.mark.parametrize("theta_shape", list(THETA_SHAPES))
@pytest.mark.parametrize("density", [0.0, 0.1, 0.6, 1.0])
@pytest.mark.parametrize("zero_inflated", [True, False])
def test_sparse_log_prob_equals_dense_values_and_gradients(theta_shape, density, zero_inflated):
    generator = torch.Generator().manual_seed(7)
    value = _counts((5, 7), density, generator)
    mu = (torch.rand(5, 7, generator=generator) * 20 + 1e-3).requires_grad_()
    theta = (torch.rand(THETA_SHAPES[theta_shape], generator=generator) * 5 + 1e-2).requires_grad_()
    logits = torch.randn(5, 7, generator=generator).requires_grad_()
    if zero_inflated:
        params, make = [mu, theta, logits], ZeroInflatedNegativeBinomial
    else:
        params, make = [mu, theta], NegativeBinomial
    fast, fast_grads = _value_and_grads(make, value, params, dense=False)
    plain, plain_grads = _value_and_grads(make, value, params, dense=True)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, plain, rtol=2e-6, atol=2e-5)
    for got, want in zip(fast_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-5)


def test_sparse_log_prob_on_a_sample_axis_and_per_cell_theta_broadcast():
    # (S, n, G) parameters with (n, G) counts use the dense path; (S, n, G) counts the sparse one
    generator = torch.Generator().manual_seed(3)
    value = _counts((3, 4, 6), 0.3, generator)
    mu = torch.rand(3, 4, 6, generator=generator) * 4 + 0.1
    theta = torch.rand(4, 1, generator=generator) + 0.5  # per cell, broadcast over genes
    logits = torch.randn(4, 6, generator=generator)
    fast = ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(value)
    with dense_log_prob():
        plain = ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(value)
    torch.testing.assert_close(fast, plain)
    small = ZeroInflatedNegativeBinomial(mu, theta, logits).log_prob(value[0])
    assert small.shape == (3, 4, 6)


def test_non_integer_and_tiny_counts_follow_the_dense_rules():
    value = torch.tensor([[0.0, 5e-9, 0.5, 2.0]])
    mu, theta, logits = (
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([2.0, 2.0, 2.0, 2.0]), torch.zeros(1, 4)
    )
    for make, args in ((ZeroInflatedNegativeBinomial, (mu, theta, logits)), (NegativeBinomial, (mu, theta))):
        fast = make(*args, validate_args=False).log_prob(value)
        with dense_log_prob():
            plain = make(*args, validate_args=False).log_prob(value)
        torch.testing.assert_close(fast, plain)


def _model_gradients(model, batch, dense: bool):
    module = model.module
    module.train()
    for p in module.parameters():
        p.grad = None
    pyro.set_rng_seed(11)
    torch.manual_seed(11)
    with model.pyro_scope():
        if dense:
            with dense_log_prob():
                loss, _, _ = elbo_terms(module.model, module.guide, batch)
        else:
            loss, _, _ = elbo_terms(module.model, module.guide, batch)
        loss.backward()
    return loss.detach(), {
        name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize(
    "gene_likelihood,dispersion", [("zinb", "gene"), ("nb", "gene-batch"), ("zinb", "gene-cell")]
)
def test_model_loss_and_gradients_equal_with_and_without_the_fast_path(adata, gene_likelihood, dispersion):
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, gene_likelihood=gene_likelihood, dispersion=dispersion, dropout_rate=0.0)
    batch = RegisteredData(adata, model.registry_).minibatch(range(64))
    fast_loss, fast_grads = _model_gradients(model, batch, dense=False)
    plain_loss, plain_grads = _model_gradients(model, batch, dense=True)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-6, atol=1e-4)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 5
    # float32 summation order differs; a bias before BatchNorm has a gradient that is 0 up to rounding,
    # so the tolerance is relative to the largest gradient entry
    scale = max(g.abs().max().item() for g in plain_grads.values())
    for name in fast_grads:
        torch.testing.assert_close(
            fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name
        )


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_joint_optimizer_takes_the_steps_of_one_optimizer_per_parameter(optimizer):
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in ((3, 4), (4,), (2, 2, 2))]
    grads = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(5)]
    args = {"lr": 1e-2, "eps": 0.01, "weight_decay": 1e-3}

    def run(optim):
        params = [p.clone().requires_grad_() for p in start]
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optim(params)
        return [p.detach() for p in params]

    joint = run(JointOptimizer(optimizer, args))
    per_parameter = run(pyro.optim.PyroOptim(optimizer, args))
    for a, b in zip(joint, per_parameter):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_joint_optimizer_adds_new_parameters_and_skips_those_without_gradient():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    optim = JointOptimizer(torch.optim.Adam, {"lr": 0.1})
    a.grad = torch.ones(3)
    optim([a])
    b.grad = None
    optim([a, b])  # b joins without a gradient: untouched
    assert torch.all(b == 0) and torch.all(a < 0)
    b.grad = torch.ones(2)
    optim([a, b])
    assert torch.all(b < 0)
    state = optim.get_state()
    steps_taken = float(state["optimizer"]["state"][0]["step"])
    fresh = JointOptimizer(torch.optim.Adam, {"lr": 0.1})
    fresh.set_state(state)  # applied at the first step
    fresh([a, b])
    assert float(fresh.optimizer.state_dict()["state"][0]["step"]) == steps_taken + 1


def test_reduce_lr_on_plateau_lowers_the_learning_rate():
    p = torch.zeros(2, requires_grad=True)
    optim = JointOptimizer(torch.optim.Adam, {"lr": 1.0}, {"mode": "min", "factor": 0.5, "patience": 0})
    p.grad = torch.ones(2)
    optim([p])
    for metric in (1.0, 2.0, 3.0):
        optim.step(metric)
    assert optim.lr == pytest.approx(0.25)


def test_counts_that_require_a_gradient_get_it_on_every_path():
    # the fused kernel differentiates in the parameters only; counts with requires_grad take the
    # torch formula, so d log p / d x is the dense one
    generator = torch.Generator().manual_seed(5)
    mu = torch.rand(4, 6, generator=generator) * 5 + 0.1
    theta = torch.rand(6, generator=generator) + 0.5
    logits = torch.randn(4, 6, generator=generator)
    grads = []
    for dense in (False, True):
        value = (torch.rand(4, 6, generator=torch.Generator().manual_seed(9)) * 4 + 0.5).requires_grad_()
        if dense:
            with dense_log_prob():
                ZeroInflatedNegativeBinomial(
                    mu, theta, logits, validate_args=False
                ).log_prob(value).sum().backward()
        else:
            ZeroInflatedNegativeBinomial(
                mu, theta, logits, validate_args=False
            ).log_prob(value).sum().backward()
        grads.append(value.grad)
    assert grads[0] is not None and torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1])
