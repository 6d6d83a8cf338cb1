"""Measure first/last gradient ratios that the default bounds are chosen from.

Run: python benchmarks/measure_bounds.py [--seeds 200]

For each family of networks and each batch size it probes one freshly initialised
model per seed and prints the smallest and largest first/last ratio seen. The
defaults in pytest_gradcheck/core/bounds.py must fail every "must fail" family and pass
every "must pass" one, with at least a 2x margin between each bound and the worst case.
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
from pytest_gradcheck.core.bounds import DEFAULT_MAX_RATIO, DEFAULT_MIN_RATIO

WIDTH = 64


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """50 pre-norm residual blocks between an input and an output projection."""

    def __init__(self, blocks: int = 50, width: int = WIDTH):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        return self.out(self.norm(self.blocks(self.inp(x))))


class Encoder(nn.Module):
    """A 24-layer nn.TransformerEncoder between an input projection and an output head.

    256 wide with 8 heads, the shape of a small real transformer. The head matters:
    the plain sum of a post-norm encoder's LayerNorm output is constant, so without
    a head the default loss would give no gradient at all.
    """

    def __init__(self, norm_first: bool, layers: int = 24, width: int = 256):
        super().__init__()
        self.inp = nn.Linear(width, width)
        layer = nn.TransformerEncoderLayer(
            width, nhead=8, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, width)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)))


# name -> (factory, input maker(batch), must pass?)
FAMILIES = {
    "sigmoid seed net": (SigmoidNet, lambda b: torch.randn(b, WIDTH), False),
    "small-init seed net": (SmallInitNet, lambda b: torch.randn(b, WIDTH), False),
    "ReLU seed net": (ReLUNet, lambda b: torch.randn(b, WIDTH), True),
    "residual MLP, 50 blocks, LayerNorm": (ResidualMLP, lambda b: torch.randn(b, WIDTH), True),
    "TransformerEncoder x24, pre-norm": (lambda: Encoder(True), lambda b: torch.randn(b, 16, 256), True),
    "TransformerEncoder x24, post-norm": (lambda: Encoder(False), lambda b: torch.randn(b, 16, 256), True),
}


def measure(seeds: int, batches: tuple[int, ...]) -> list[dict]:
    rows = []
    for family, (factory, make_input, must_pass) in FAMILIES.items():
        for batch in batches:
            ratios = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                model = factory()
                ratios.append(probe(model, make_input(batch), seed=seed).ratio)
            rows.append(
                {"family": family, "batch": batch, "must_pass": must_pass, "min": min(ratios), "max": max(ratios)}
            )
            print(f"  measured {family} at batch {batch}", file=sys.stderr)
    return rows


def margins(rows: list[dict], low: float, high: float) -> list[tuple[str, float]]:
    """Margin of each row to the bound it must respect (>= 2 is what we require)."""
    out = []
    for row in rows:
        if row["must_pass"]:
            margin = min(row["min"] / low, high / row["max"])
        else:
            margin = low / row["max"]
        out.append((f"{row['family']} (batch {row['batch']})", margin))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = measure(args.seeds, (1, 32))
    table = [
        "| network | batch | must | smallest ratio | largest ratio | margin to bound |",
        "|---|---|---|---|---|---|",
    ]
    for row, (_, margin) in zip(rows, margins(rows, DEFAULT_MIN_RATIO, DEFAULT_MAX_RATIO)):
        must = "pass" if row["must_pass"] else "fail"
        table.append(
            f"| {row['family']} | {row['batch']} | {must} | {row['min']:.3g} | {row['max']:.3g} | {margin:.1f}x |"
        )
    print(f"{args.seeds} seeds per row; defaults min_ratio={DEFAULT_MIN_RATIO}, max_ratio={DEFAULT_MAX_RATIO}\n")
    print("\n".join(table))
    worst = min(margin for _, margin in margins(rows, DEFAULT_MIN_RATIO, DEFAULT_MAX_RATIO))
    ok = worst >= 2.0 and not math.isnan(worst)
    print(f"\nsmallest margin {worst:.2f}x: {'OK' if ok else 'BELOW THE REQUIRED 2x'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
