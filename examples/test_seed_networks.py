"""The notebook's three networks as tests: run ``pytest examples --grad-report``."""

import pytest
import torch
from seed_networks import ReLUNet, SigmoidNet, SmallInitNet

from pytest_gradcheck import GradientHealthError


@pytest.fixture(autouse=True)
def _same_weights_every_run():
    torch.manual_seed(0)


def test_relu_net_is_healthy(gradient_health):
    profile = gradient_health(ReLUNet())
    assert 0.2 < profile.ratio < 5.0


@pytest.mark.xfail(raises=GradientHealthError, strict=True, reason="sigmoids saturate: gradients vanish")
def test_sigmoid_net_vanishes(gradient_health):
    gradient_health(SigmoidNet())


def test_small_init_net_vanishes(gradient_health):
    with pytest.raises(GradientHealthError, match="cause: initialisation"):
        gradient_health(SmallInitNet())
