"""Network layout: the reference architecture's layers, slots, sizes and covariate injection."""

import pytest
import torch
from torch import nn

from pyro_scvi.models.module import SCVIModule
from pyro_scvi.models.networks import FCLayers, GaussianEncoder


def test_fc_layers_slots_and_batchnorm_settings():
    layers = FCLayers(20, 8, n_cat_list=[3, 1, 4], n_layers=2, n_hidden=16, dropout_rate=0.1)
    block = layers.fc_layers[0]
    # 1-category covariate adds nothing
    assert isinstance(block[0], nn.Linear) and block[0].in_features == 20 + 3 + 4
    assert isinstance(block[1], nn.BatchNorm1d) and block[1].momentum == 0.01 and block[1].eps == 1e-3
    assert block[2] is None and isinstance(block[3], nn.ReLU) and isinstance(block[4], nn.Dropout)
    assert layers.fc_layers[1][0].in_features == 16 + 7  # deep injection
    shallow = FCLayers(20, 8, n_cat_list=[3], n_layers=2, n_hidden=16, inject_covariates=False)
    assert shallow.fc_layers[1][0].in_features == 16


def test_fc_layers_one_hot_matches_explicit_concatenation():
    layers = FCLayers(5, 4, n_cat_list=[3], n_layers=1, n_hidden=4, dropout_rate=0.0, use_batch_norm=False)
    x, codes = torch.randn(6, 5), torch.tensor([[0], [2], [1], [2], [0], [1]])
    expected = torch.relu(
        layers.fc_layers[0][0](torch.cat([x, torch.nn.functional.one_hot(codes[:, 0], 3).float()], -1))
    )
    torch.testing.assert_close(layers(x, codes), expected)


def test_three_dimensional_input_equals_per_sample_evaluation():
    layers = FCLayers(5, 4, n_cat_list=[2], n_layers=2, n_hidden=6, dropout_rate=0.0).eval()
    x, codes = torch.randn(3, 7, 5), torch.randint(0, 2, (7, 1))
    stacked = layers(x, codes)
    for s in range(3):
        torch.testing.assert_close(stacked[s], layers(x[s], codes))


def test_encoder_variance_is_activation_plus_eps():
    encoder = GaussianEncoder(4, 2, n_hidden=3, dropout_rate=0.0, var_activation="softplus").eval()
    x = torch.randn(5, 4)
    loc, scale = encoder(x)
    h = encoder.hidden(x)
    torch.testing.assert_close(scale**2, torch.nn.functional.softplus(encoder.var_head(h)) + 1e-4)
    with pytest.raises(ValueError, match="var_activation"):
        GaussianEncoder(4, 2, var_activation=torch.sigmoid)


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_default_module_parameter_shapes_follow_reference():
    G, B = 50, 3
    shapes = _shapes(SCVIModule(G, n_batch=B))
    assert shapes["log_dispersion"] == (G,)
    # encoder ignores batch by default
    assert shapes["z_encoder.hidden.fc_layers.Layer 0.0.weight"] == (128, G)
    assert shapes["library_encoder.hidden.fc_layers.Layer 0.0.weight"] == (128, G)
    assert shapes["library_encoder.loc_head.weight"] == (1, 128)
    assert shapes["decoder.hidden.fc_layers.Layer 0.0.weight"] == (128, 10 + B)
    assert shapes["decoder.scale_head.0.weight"] == (G, 128)
    assert "library_log_means" not in shapes
    # decoder has no dropout; encoder does
    module = SCVIModule(G, n_batch=B)
    assert module.decoder.hidden.fc_layers[0][4] is None
    assert isinstance(module.z_encoder.hidden.fc_layers[0][4], nn.Dropout)


@pytest.mark.parametrize(
    "options, key, shape",
    [
        (dict(dispersion="gene-batch"), "log_dispersion", (50, 3)),
        (dict(dispersion="gene-label", n_labels=4), "log_dispersion", (50, 4)),
        (
            dict(encode_covariates=True, n_cats_per_cov=[2, 5], n_continuous_cov=2),
            "z_encoder.hidden.fc_layers.Layer 0.0.weight",
            (128, 50 + 2 + 3 + 2 + 5),
        ),
        (
            dict(n_cats_per_cov=[2, 5], n_continuous_cov=2),
            "decoder.hidden.fc_layers.Layer 0.0.weight",
            (128, 10 + 2 + 3 + 2 + 5),
        ),
        (dict(n_layers=2), "decoder.hidden.fc_layers.Layer 1.0.weight", (128, 128 + 3)),
        (dict(n_layers=2), "z_encoder.hidden.fc_layers.Layer 1.0.weight", (128, 128)),
        (
            dict(use_observed_lib_size=False, library_log_means=[[1, 2, 3]], library_log_vars=[[1, 1, 1]]),
            "library_log_means",
            (1, 3),
        ),
    ],
)
def test_module_options_change_shapes_like_the_reference(options, key, shape):
    assert _shapes(SCVIModule(50, n_batch=3, **options))[key] == shape


def test_gene_cell_has_no_dispersion_parameter_and_norm_placement():
    module = SCVIModule(20, dispersion="gene-cell", use_batch_norm="decoder", use_layer_norm="encoder")
    assert module.log_dispersion is None
    assert module.z_encoder.hidden.fc_layers[0][1] is None and isinstance(
        module.z_encoder.hidden.fc_layers[0][2], nn.LayerNorm
    )
    assert (
        isinstance(module.decoder.hidden.fc_layers[0][1], nn.BatchNorm1d)
        and module.decoder.hidden.fc_layers[0][2] is None
    )


@pytest.mark.parametrize(
    "name, value",
    [
        ("dispersion", "gene-cells"),
        ("gene_likelihood", "zip"),
        ("latent_distribution", "lognormal"),
        ("use_batch_norm", True),
    ],
)
def test_invalid_choices_raise(name, value):
    with pytest.raises(ValueError, match=name):
        SCVIModule(10, **{name: value})
