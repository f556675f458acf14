"""scANVI: the enumerated loss, label transfer on generated data, from_scvi_model, save/load, errors."""

from __future__ import annotations

import numpy as np
import torch
from pyro import poutine

from pyro_scvi import SCANVI
from pyro_scvi.data.synthetic import synthetic_iid
from pyro_scvi.infer.scanvi import scanvi_cell_terms
from pyro_scvi.models.scanvi import Z2, Y
from pyro_scvi.models.sites import X, Z

SMALL = dict(n_hidden=16, n_latent=4)


def _partly_labelled(fraction: float = 0.1, seed: int = 0, n_cells: int = 150, n_genes: int = 60):
    """Three well separated cell types; ``fraction`` of the cells keep their label, the rest "Unknown"."""
    adata = synthetic_iid(batch_size=n_cells, n_genes=n_genes, n_batches=1, n_labels=3, n_markers=10,
                          log_fold_change=2.5, seed=seed)
    truth = np.asarray(adata.obs["labels"].astype(str))
    rng = np.random.default_rng(seed)
    keep = np.zeros(adata.n_obs, dtype=bool)
    for label in np.unique(truth):  # at least a few labels of each type
        cells = np.flatnonzero(truth == label)
        keep[rng.choice(cells, max(2, round(fraction * len(cells))), replace=False)] = True
    adata.obs["partial"] = np.where(keep, truth, "Unknown")
    return adata, truth


def _model(adata, **kwargs):
    SCANVI.setup_anndata(adata, labels_key="partial", unlabeled_category="Unknown")
    return SCANVI(adata, **SMALL, **kwargs)


def test_label_coding_puts_unlabeled_last():
    adata, _ = _partly_labelled()
    model = _model(adata)
    assert list(model._label_mapping) == ["label_2", "label_0", "label_1", "Unknown"]  # scvi-tools' swap
    assert model.n_labels == 3
    codes = adata.obs["_scvi_labels"].to_numpy()
    assert np.all(model._label_mapping[codes] == adata.obs["partial"].to_numpy())


def _fixed(fn, values: dict):
    """``fn`` with the latent sites in ``values`` set to those values (still latent, unlike ``condition``)."""
    trace = poutine.Trace()
    for name, value in values.items():
        trace.add_node(name, name=name, type="sample", is_observed=False, value=value, infer={})
    return poutine.replay(fn, trace=trace)


def test_enumerated_loss_equals_explicit_sum_over_labels():
    """Σ_y by poutine.enum equals a loop over y = k with poutine.condition, weighted by q(y | z1)."""
    adata, _ = _partly_labelled()
    model = _model(adata)
    module = model.module.eval()
    batch = next(model.minibatches(indices=np.arange(12)))
    torch.manual_seed(0)
    z1 = torch.randn(12, 4)
    z2 = torch.randn(3, 12, 4)  # one draw per (label, cell)
    guide = _fixed(module.guide, {Z: z1, Z2: z2})
    with torch.no_grad():
        reconstruction, kl = scanvi_cell_terms(module.model, guide, batch)
        enumerated = reconstruction[X] + sum(kl.values())  # (n,)

        probs = module.classify(z1)  # (n, L)
        explicit = torch.zeros(12)
        for k in range(3):
            y = torch.full((12,), k)
            g = poutine.trace(_fixed(module.guide, {Z: z1, Y: y, Z2: z2[k]})).get_trace(batch)
            m = poutine.trace(poutine.replay(module.model, trace=g)).get_trace(batch)
            per_label = (-m.nodes[X]["fn"].log_prob(m.nodes[X]["value"]) + g.nodes[Z]["fn"].log_prob(z1)
                         - m.nodes[Z]["fn"].log_prob(z1)
                         + torch.distributions.kl_divergence(g.nodes[Z2]["fn"], m.nodes[Z2]["fn"])
                         + g.nodes[Y]["fn"].log_prob(y) - m.nodes[Y]["fn"].log_prob(y))
            explicit += probs[:, k] * per_label
    torch.testing.assert_close(enumerated, explicit, rtol=1e-5, atol=1e-4)


def test_predicts_generated_cell_types_from_ten_percent_of_labels():
    adata, truth = _partly_labelled(0.1)
    model = _model(adata)
    model.train(max_epochs=40, batch_size=64, check_val_every_n_epoch=1)
    predicted = model.predict()
    assert (predicted == truth).mean() >= 0.95
    history = model.history
    for key in ("train_loss", "elbo_train", "train_classification_loss", "train_accuracy",
                "validation_loss", "validation_accuracy"):
        assert key in history, key
    soft = model.predict(soft=True)
    assert list(soft.columns) == ["label_2", "label_0", "label_1"]
    assert list(soft.index) == list(adata.obs_names)
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, rtol=1e-5)
