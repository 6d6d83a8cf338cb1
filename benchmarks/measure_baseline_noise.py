"""Measure how far mean |grad| moves between runs that should compare equal against a baseline.

Run: python benchmarks/measure_baseline_noise.py [--threads 1 2 4]

Each model is built from the same seed and probed on the same batch once per
``torch.set_num_threads`` value; every profile is compared with the first one
(threads=1). Thread count changes how reductions are split, so float32 sums round
differently. As a stand-in for platform noise (another CPU's kernels, another BLAS)
each model is also probed in float64 and compared with float32: a platform
difference is a different float32 rounding, so it stays within that gap.

The output gives, per model, the largest factor between any layer's mean |grad|
(and the first/last ratio) in two runs. The default tolerance in
pytest_gradcheck/core/baseline.py must be far above every number here.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

from seed_networks import ReLUNet, SigmoidNet, SmallInitNet

from pytest_gradcheck import probe
from pytest_gradcheck.core.baseline import DEFAULT_TOLERANCE, compare_baseline, dumps_baseline, loads_baseline


class SmallConvNet(nn.Module):
    """Three conv-BN-ReLU stages and a linear head on 32x32 RGB images."""

    def __init__(self):
        super().__init__()
        layers = []
        channels = 3
        for width in (16, 32, 64):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class TinyEncoder(nn.Module):
    """Two transformer encoder layers: attention softmax and LayerNorm reductions."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)))


MODELS = {
    "ReLUNet": (ReLUNet, (64, 64)),
    "SigmoidNet": (SigmoidNet, (64, 64)),
    "SmallInitNet": (SmallInitNet, (64, 64)),
    "SmallConvNet": (SmallConvNet, (32, 3, 32, 32)),
    "TinyEncoder": (TinyEncoder, (16, 24, 32)),
}


def profile_of(name: str, threads: int, dtype: torch.dtype = torch.float32):
    build, shape = MODELS[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build().to(dtype)
    batch = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)  # same numbers in both dtypes
    return probe(model, batch, seed=0)


def worst(reference, other) -> tuple[float, float]:
    """Largest factor (>= 1) between matching layers, and between the first/last ratios."""
    comparison = compare_baseline(reference, other, DEFAULT_TOLERANCE)
    layer_worst = max(_spread(delta.factor) for delta in comparison.layers)
    return layer_worst, _spread(comparison.ratio_factor)


def _spread(factor: float | None) -> float:
    if factor is None or factor == 0.0 or math.isinf(factor):
        return math.inf
    return max(factor, 1.0 / factor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available by default")
    print("largest relative change of mean |grad| over the layers, and of the first/last ratio")
    print(f"{'model':<14} {'runs':<22} {'layers':>9} {'ratio':>9}  same file bytes")
    overall = 1.0
    for name in MODELS:
        reference = profile_of(name, args.threads[0])
        others = [(f"threads {args.threads[0]} vs {n}", profile_of(name, n)) for n in args.threads[1:]]
        others.append(("float32 vs float64", profile_of(name, args.threads[0], torch.float64)))
        for label, other in others:
            layer_worst, ratio_worst = worst(reference, other)
            overall = max(overall, layer_worst, ratio_worst)
            same_file = dumps_baseline(reference) == dumps_baseline(other)
            # The stored file is rounded; comparing against it must pass as well.
            assert compare_baseline(loads_baseline(dumps_baseline(reference)), other).passed, (name, label)
            print(f"{name:<14} {label:<22} {layer_worst - 1:>9.1e} {ratio_worst - 1:>9.1e}  {same_file}")
    print(f"largest factor seen: 1 + {overall - 1:.1e}; default tolerance {DEFAULT_TOLERANCE:g}x")


if __name__ == "__main__":
    main()
