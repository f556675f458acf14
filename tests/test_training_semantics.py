"""Training-step semantics that benchmarks/training_equivalence.py checks against scvi-tools.

Each test pins one of them on small generated data, so none can drift back unnoticed: the optimiser
update (Adam with an L2 penalty, scvi-tools' defaults), the KL weight of every step of every epoch,
and BatchNorm's running statistics after one step (and not after validation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_scvi import SCVI
from pyro_scvi.data import synthetic_iid
from pyro_scvi.infer.elbo import CellMeanELBO
from pyro_scvi.infer.training import TrainingPlan


def hand_adam_l2(p, grads, lr=1e-3, eps=0.01, weight_decay=1e-6, betas=(0.9, 0.999)):
    """Adam with the L2 penalty added to the gradient (torch.optim.Adam's ``weight_decay``), in float64."""
    p = p.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double() + weight_decay * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_default_optimiser_step_is_adam_with_l2_penalty():
    torch.manual_seed(0)
    start = torch.randn(50, 7)
    grads = [torch.randn(50, 7) * scale for scale in (1.0, 0.01, 30.0)]  # below and above eps = 0.01
    param = torch.nn.Parameter(start.clone())
    optimiser = TrainingPlan().make_optimizer()  # the training loop's optimiser with scvi-tools' defaults
    for g in grads:
        param.grad = g.clone()
        optimiser([param])
    expected = hand_adam_l2(start, grads)
    torch.testing.assert_close(param.detach().double(), expected, rtol=1e-6, atol=1e-9)
    # the penalty is L2 (coupled), not AdamW's decoupled decay: a zero gradient still moves the weights
    param = torch.nn.Parameter(torch.ones(3))
    optimiser = TrainingPlan(weight_decay=0.5).make_optimizer()
    param.grad = torch.zeros(3)
    optimiser([param])
    torch.testing.assert_close(param.detach(), torch.full((3,), 1 - 1e-3 * 0.5 / (0.5 + 0.01)))


def _record_kl_weights(monkeypatch) -> list[float]:
    weights: list[float] = []
    original = CellMeanELBO.loss_and_grads

    def loss_and_grads(self, *args, **kwargs):
        weights.append(self.kl_weights.get("z", 1.0))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CellMeanELBO, "loss_and_grads", loss_and_grads)
    return weights


@pytest.mark.parametrize("plan, expected", [
    # by epoch (the default schedule, shortened):
    # weight = epoch / n_epochs_kl_warmup for every step of the epoch
    ({"n_epochs_kl_warmup": 4}, [0, 0, 0, .25, .25, .25, .5, .5, .5, .75, .75, .75, 1, 1, 1]),
    # by optimiser step, counted over epochs: weight = step / n_steps_kl_warmup
    ({"n_epochs_kl_warmup": None, "n_steps_kl_warmup": 10}, [min(s / 10, 1.0) for s in range(15)]),
    # from min_kl_weight to max_kl_weight
    ({"n_epochs_kl_warmup": 2, "min_kl_weight": 0.2, "max_kl_weight": 0.8}, [.2] * 3 + [.5] * 3 + [.8] * 9),
])
def test_kl_weight_of_every_step(monkeypatch, plan, expected):
    # 270 training cells: 3 steps per epoch
    adata = synthetic_iid(batch_size=150, n_genes=30, n_batches=2, seed=0)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=3)
    weights = _record_kl_weights(monkeypatch)
    model.train(max_epochs=5, batch_size=100, plan_kwargs=plan, enable_progress_bar=False)
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)
    # the history keeps the weight of each epoch's last step, as scvi-tools logs it
    np.testing.assert_allclose(model.history["kl_weight"]["kl_weight"].to_numpy(), expected[2::3], atol=1e-12)


def test_batchnorm_statistics_after_one_step_and_not_after_validation():
    adata = synthetic_iid(batch_size=70, n_genes=40, n_batches=2, seed=4)  # 126 training cells: one step
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=8, n_latent=3)
    norms = {name: m for name, m in model.module.named_modules() if isinstance(m, torch.nn.BatchNorm1d)}
    assert len(norms) == 3  # z encoder, library encoder, decoder
    before = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in norms.items()}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in norms}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out, name=name: inputs[name].append((mod.training, args[0].detach().clone()))
        )
        for name, m in norms.items()
    ]
    model.train(max_epochs=1, batch_size=128, check_val_every_n_epoch=1, enable_progress_bar=False)
    for hook in hooks:
        hook.remove()
    for name, m in norms.items():
        training = [x for is_training, x in inputs[name] if is_training]
        if name.startswith("library_encoder"):  # observed library: the library encoder never runs
            assert not inputs[name]
            torch.testing.assert_close(m.running_mean, before[name][0])
            assert int(m.num_batches_tracked) == 0
            continue
        assert len(training) == 1, name  # one training step; validation ran in eval mode
        assert any(not is_training for is_training, _ in inputs[name]), "validation should have run"
        x = training[0]
        # momentum 0.01, unbiased batch variance for the running estimate
        # (scvi-tools: BatchNorm1d(momentum=0.01, eps=1e-3))
        torch.testing.assert_close(
            m.running_mean, 0.99 * before[name][0] + 0.01 * x.mean(0), rtol=1e-5, atol=1e-7
        )
        torch.testing.assert_close(
            m.running_var, 0.99 * before[name][1] + 0.01 * x.var(0, unbiased=True), rtol=1e-5, atol=1e-7
        )
        assert int(m.num_batches_tracked) == 1
        assert m.momentum == 0.01 and m.eps == 1e-3
