"""The failures the ratio cannot see, each caught for its own reason, next to a twin that passes."""

import pytest
import torch
from signal_networks import PlainConvNet, ResidualMLP, SequenceClassifier

from pytest_gradcheck import GradientHealthError

IMAGES = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _same_weights_every_run():
    torch.manual_seed(0)


def test_thirty_layers_with_xavier_init_lose_the_forward_signal(gradient_health):
    with pytest.raises(GradientHealthError, match="vanishing_signal") as failure:
        gradient_health(PlainConvNet(init="xavier"), IMAGES)
    assert "Xavier's scale" in str(failure.value)  # the cause names the init


def test_thirty_layers_with_kaiming_init_keep_it(gradient_health):
    gradient_health(PlainConvNet(init="kaiming"), IMAGES)


def test_residual_blocks_without_normalisation_blow_up_the_signal(gradient_health):
    with pytest.raises(GradientHealthError, match="exploding_signal") as failure:
        gradient_health(ResidualMLP(normalise=False))
    assert "residual branches summed without normalisation" in str(failure.value)


def test_residual_blocks_with_layer_norm_keep_it(gradient_health):
    gradient_health(ResidualMLP(normalise=True))


def test_a_tanh_rnn_over_200_steps_vanishes_through_time(gradient_health):
    with pytest.raises(GradientHealthError, match="vanishing_in_time"):
        gradient_health(SequenceClassifier("RNN"), torch.randn(8, 200, 16))


def test_a_gru_over_20_steps_carries_the_gradient_back(gradient_health):
    gradient_health(SequenceClassifier("GRU"), torch.randn(8, 20, 16))
