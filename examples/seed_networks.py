"""The three 4-layer, 64-wide MLPs of the "vanishing gradients" notebook this project started from."""

import torch
from torch import nn

WIDTH = 64


class _FourLayerMLP(nn.Module):
    def __init__(self, activation: nn.Module | None = None):
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.fc3 = nn.Linear(WIDTH, WIDTH)
        self.fc4 = nn.Linear(WIDTH, WIDTH)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = fc(x)
            if self.activation is not None:
                x = self.activation(x)
        return x


class SigmoidNet(_FourLayerMLP):
    """Sigmoid after every layer: each one scales the gradient by at most 1/4."""

    def __init__(self):
        super().__init__(nn.Sigmoid())


class SmallInitNet(_FourLayerMLP):
    """No activation, weights drawn from N(0, 0.01): each layer shrinks the gradient ~12x."""

    def __init__(self):
        super().__init__(None)
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            nn.init.normal_(fc.weight, std=0.01)


class ReLUNet(_FourLayerMLP):
    """ReLU after every layer with PyTorch's default init: gradients stay balanced."""

    def __init__(self):
        super().__init__(nn.ReLU())
