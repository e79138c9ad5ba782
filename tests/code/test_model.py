import math

import pytest
import torch

from pneumo.model import TinyNet, keras_parameter_count, trainable_parameter_count


def test_parameter_count_matches_the_seed():
    model = TinyNet()
    assert trainable_parameter_count(model) == 2489
    assert keras_parameter_count(model) == 2541


def test_forward_returns_one_probability_per_row():
    model = TinyNet().eval()
    probabilities = model(torch.randn(7, 140) * 5)
    assert probabilities.shape == (7,)
    assert torch.all((probabilities > 0) & (probabilities < 1))


def test_batchnorm_uses_keras_defaults():
    model = TinyNet()
    for norm in (model.norm1, model.norm2):
        assert norm.eps == pytest.approx(1e-3)
        assert norm.momentum == pytest.approx(0.01)  # Keras momentum 0.99


def test_initialisation_follows_keras_limits():
    torch.manual_seed(0)
    model = TinyNet()
    he_limit = math.sqrt(6 / 140)
    glorot_limit = math.sqrt(6 / (16 + 10))
    w1 = model.hidden1.weight
    assert w1.abs().max() <= he_limit
    assert w1.abs().max() > 0.9 * he_limit  # uniform over the whole range, not a narrower default
    assert model.hidden2.weight.abs().max() <= glorot_limit
    assert model.hidden2.weight.abs().max() > 0.8 * glorot_limit
    for layer in (model.hidden1, model.hidden2, model.output):
        assert torch.all(layer.bias == 0)


def test_other_feature_counts():
    model = TinyNet(n_features=20).eval()
    assert model(torch.zeros(3, 20)).shape == (3,)
    assert trainable_parameter_count(model) == 2489 - 120 * 16
