"""The Kaiming and Xavier reference scales of a weight matrix, given the activation that follows it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pytest_gradcheck.core.profile import InitScale

# Functions that pass the positive half of their input (the smooth ones at scale too).
DYING = frozenset({"relu", "relu6"})  # gradient exactly zero for x <= 0: only these units can die
RECTIFIERS = DYING | {"leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "softplus", "hardswish"}
# torch.nn.init.calculate_gain, extended to the smooth rectifiers (they are ReLU-like at scale).
GAINS = {"linear": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3.0, "selu": 0.75, "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2))}
RECTIFIER_GAIN = math.sqrt(2.0)


def init_nonlinearity(function: str) -> str:
    """The ``nonlinearity=`` argument of nn.init.kaiming_normal_ that fits ``function``."""
    return function if function in ("relu", "tanh", "sigmoid", "linear", "selu") else "relu"


def gain(function: str) -> float:
    """The init gain for a layer followed by ``function`` ('linear' when nothing follows)."""
    if function in GAINS:
        return GAINS[function]
    return RECTIFIER_GAIN if function in RECTIFIERS else 1.0


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of ``shape``, as torch.nn.init computes them."""
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def init_scale(layer: str, parameter: str, shape: Sequence[int], std: float, function: str) -> InitScale:
    """A weight's measured ``std`` next to the Kaiming and Xavier references for ``function``."""
    fan_in, fan_out = fans(shape)
    layer_gain = gain(function)
    return InitScale(
        layer=layer,
        parameter=parameter,
        fan_in=fan_in,
        fan_out=fan_out,
        std=std,
        activation=function,
        gain=layer_gain,
        kaiming_std=layer_gain / math.sqrt(fan_in) if fan_in else math.inf,
        xavier_std=layer_gain * math.sqrt(2.0 / (fan_in + fan_out)) if fan_in + fan_out else math.inf,
    )
