"""Networks the first/last gradient ratio alone cannot judge, each next to a twin that trains.

- He et al. (2015, Fig. 3): a 30-layer plain ReLU conv net stalls with Xavier's init and trains
  with Kaiming's. Scaling every weight scales every weight gradient alike, so the ratio reads
  the same for both; the forward signal does not.
- Residual blocks summed without normalisation let the signal grow block after block (Fixup,
  Zhang et al. 2019); a LayerNorm before each block keeps it in check.
- A tanh RNN over 200 steps passes almost nothing back to its first steps; a GRU over 20 does.
"""

import torch
from torch import nn


class PlainConvNet(nn.Module):
    """``depth`` 3x3 convolutions with ReLUs, no normalisation and no shortcut, then a linear head."""

    def __init__(self, depth: int = 30, width: int = 16, init: str = "kaiming"):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1) for i in range(depth - 1))
        self.head = nn.Linear(width, 10)
        for conv in self.convs:
            if init == "xavier":
                nn.init.xavier_normal_(conv.weight)  # gain 1: right for tanh, half the variance a ReLU needs
            else:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


class ResidualMLP(nn.Module):
    """``blocks`` residual blocks x + fc2(relu(fc1(x))); normalised: pre-norm, a LayerNorm before each
    block and one before the head, as pre-norm transformers have."""

    def __init__(self, blocks: int = 100, width: int = 64, normalise: bool = False):
        super().__init__()
        self.stem = nn.Linear(32, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width) if normalise else nn.Identity(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width))
            for _ in range(blocks)
        )  # fmt: skip
        self.final_norm = nn.LayerNorm(width) if normalise else nn.Identity()
        self.head = nn.Linear(width, 10)
        for block in self.blocks:
            for layer in block:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.final_norm(x))


class SequenceClassifier(nn.Module):
    """A recurrent layer over the whole sequence, and a linear head on its last state."""

    def __init__(self, cell: str = "RNN", features: int = 16, hidden: int = 64):
        super().__init__()
        self.rnn = getattr(nn, cell)(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])
