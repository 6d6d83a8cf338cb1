"""Draw the README's figure: the seed's sigmoid net next to its ReLU net (run: python docs/make_figures.py)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pytest_gradcheck.cli import command as cli
from pytest_gradcheck.report.plot import draw

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "seed-gradient-flow.png"
# The same command lines the README shows, so the figure is exactly what a reader gets.
COMMANDS = [
    ["examples/seed_networks.py:SigmoidNet", "--input-shape", "1,64"],
    ["examples/seed_networks.py:ReLUNet", "--input-shape", "1,64"],
]


def assess(argv: list[str]):
    args = cli.build_parser().parse_args(argv)
    return cli.probe_target(args, cli.resolve_bounds(args), cli.input_dtypes(args))


def main() -> None:
    figure = Figure(figsize=(12, 4.6), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, argv in zip(figure.subplots(1, 2), COMMANDS):
        result = assess([str(ROOT / argv[0]), *argv[1:]])
        draw(axes, result.profile, result.findings, result.bounds, title="gradcheck " + " ".join(argv))
    figure.savefig(OUTPUT)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({OUTPUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
