"""The ``gradcheck`` command: options, loading TARGET, the probe, the report and the exit status."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pytest_gradcheck.core.baseline import BaselineComparison
    from pytest_gradcheck.core.bounds import Bounds
    from pytest_gradcheck.core.findings import CheckResult
    from pytest_gradcheck.core.profile import GradientProfile

from pytest_gradcheck.core import bounds as bounds_mod
from pytest_gradcheck.core.baseline import DEFAULT_TOLERANCE
from pytest_gradcheck.core.bounds import BOUND_OPTIONS  # one table: a new bound gets both flags
from pytest_gradcheck.errors import CommandLineError

EXIT_HEALTHY, EXIT_FAILING, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a command that SIGPIPE ended
FORMATS = ("table", "markdown", "json")
INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")

DESCRIPTION = "Probe one PyTorch model (one forward and one backward pass) and report vanishing or exploding gradients."
EPILOG = """\
TARGET is package.module:attr or path/to/file.py:attr, where attr is an nn.Module
instance, an nn.Module subclass with a no-argument constructor, or a function that
takes no arguments and returns a model.

example:
  gradcheck examples/seed_networks.py:SigmoidNet --input-shape 1,64 --plot sig.png
  python -m pytest_gradcheck mypkg.models:build --input-shape 8,16 --input-dtype int64 --format markdown

inputs: each --input-shape is one positional argument of forward(). Floating dtypes
draw from N(0, 1); integer dtypes draw ids in [0, n) with n the smallest num_embeddings
of the model's nn.Embedding layers (2 when it has none); bool draws 0/1. Without
--input-shape the inputs are inferred from the first layer, as the pytest fixture does.
--seed seeds the weight initialisation, the inputs and the probe.

exit status: 0 healthy, 1 a failing finding or a baseline regression, 2 a usage, load or
internal error (--traceback shows where an internal error came from).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcheck",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="TARGET", help="package.module:attr or path/to/file.py:attr")
    model = parser.add_argument_group("model and inputs")
    model.add_argument(
        "--input-shape",
        dest="input_shapes",
        action="append",
        type=parse_shape,
        metavar="D1,D2,...",
        help="shape of one positional input, e.g. 8,64 (repeat for several inputs)",
    )
    model.add_argument(
        "--input-dtype",
        dest="input_dtypes",
        action="append",
        choices=INPUT_DTYPES,
        metavar="DTYPE",
        help="dtype of the inputs: once for all, or once per --input-shape (default float32; "
        f"one of {', '.join(INPUT_DTYPES)})",
    )
    model.add_argument("--device", default="cpu", help="device for the model and inputs, e.g. cuda:0 (default cpu)")
    model.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and the probe (default 0)")
    checks = parser.add_argument_group("bounds (the pytest options --grad-* without 'grad-')")
    for name, pytest_flag, text in BOUND_OPTIONS:
        checks.add_argument(pytest_flag.replace("--grad-", "--"), dest=name, metavar="VALUE", help=text)
    output = parser.add_argument_group("output")
    output.add_argument("--format", choices=FORMATS, default="table", help="report format on stdout (default table)")
    output.add_argument(
        "--traceback", action="store_true", help="on an internal error, print the whole traceback, not one line"
    )
    output.add_argument(
        "--plot", metavar="FILE", help="write a gradient-flow chart to FILE (.png or .svg; needs matplotlib)"
    )
    baselines = parser.add_argument_group("baselines")
    baselines.add_argument(
        "--baseline",
        metavar="FILE",
        help="compare each layer's mean |grad| with a baseline file; a change beyond --tolerance exits 1",
    )
    baselines.add_argument(
        "--save-baseline",
        metavar="FILE",
        help="write this run's profile as a baseline file (the format of the pytest baselines, "
        "see --grad-baseline-update)",
    )
    baselines.add_argument(
        "--tolerance",
        metavar="FACTOR",
        default=None,
        help="factor a layer's mean |grad| may move from --baseline, either way "
        f"(default {DEFAULT_TOLERANCE:g}, as for pytest; 1.1 allows 10%%)",
    )
    return parser


def parse_shape(text: str) -> tuple[int, ...]:
    """'8,64' -> (8, 64); argparse turns the ValueError into a usage error naming the option."""
    try:
        shape = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; write positive integers separated by commas, e.g. 8,64"
        ) from None
    if not shape or any(size <= 0 for size in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; every size must be a positive integer")
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or an argparse usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return run(args)
    except CommandLineError as error:
        print(f"gradcheck: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`gradcheck ... | head -1`): end quietly, as a command killed by SIGPIPE does.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as error:  # a bug: still one line, and never exit 1, which means "unhealthy"
        if args.traceback:
            traceback.print_exc()
        else:
            print(
                f"gradcheck: internal error: {type(error).__name__}: {error} "
                "(rerun with --traceback to see where, and please report it)",
                file=sys.stderr,
            )
        return EXIT_USAGE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without torch is checked before the model loads.
    bounds = resolve_bounds(args)
    dtypes = input_dtypes(args)
    if args.plot:
        check_plot_request(args.plot)
    tolerance, baseline = load_baseline_request(args)
    result = probe_target(args, bounds, dtypes)
    print(render(args.format, result))
    regressed = False
    if baseline is not None and tolerance is not None:
        from pytest_gradcheck.core.baseline import compare_baseline

        comparison = compare_baseline(baseline, result.profile, tolerance)
        print_comparison(args, comparison)
        regressed = not comparison.passed
    write_files(args, result)
    from pytest_gradcheck.core.findings import failing

    return EXIT_FAILING if failing(result.findings) or regressed else EXIT_HEALTHY


def write_files(args: argparse.Namespace, result: CheckResult) -> None:
    """--save-baseline and --plot, each announced on stderr so stdout holds only the report."""
    try:
        if args.save_baseline:
            from pytest_gradcheck.core.baseline import save_baseline

            save_baseline(args.save_baseline, result.profile)
            print(f"gradcheck: wrote baseline to {args.save_baseline}", file=sys.stderr)
        if args.plot:
            from pytest_gradcheck.report.plot import plot_profile

            written = plot_profile(result.profile, result.findings, result.bounds, args.plot, title=args.target)
            print(f"gradcheck: wrote gradient-flow plot to {written}", file=sys.stderr)
    except OSError as error:
        raise CommandLineError(
            f"cannot write {error.filename or 'the output file'}: {error.strerror or error}"
        ) from None


def resolve_bounds(args: argparse.Namespace) -> Bounds:
    given = {name: getattr(args, name) for name, _, _ in BOUND_OPTIONS}
    try:
        return bounds_mod.resolve({name: value for name, value in given.items() if value is not None})
    except (TypeError, ValueError) as error:
        raise CommandLineError(str(error)) from None


def input_dtypes(args: argparse.Namespace) -> list[str]:
    shapes = args.input_shapes or []
    dtypes = args.input_dtypes or ["float32"]
    if args.input_dtypes and not shapes:
        raise CommandLineError("--input-dtype needs --input-shape; give one --input-shape per positional input")
    if len(dtypes) == 1:
        return dtypes * len(shapes)
    if len(dtypes) != len(shapes):
        raise CommandLineError(
            f"got {len(dtypes)} --input-dtype for {len(shapes)} --input-shape; "
            "give one dtype for all inputs or one per shape"
        )
    return dtypes


def check_plot_request(path: str) -> None:
    from pytest_gradcheck.errors import PlotUnavailable
    from pytest_gradcheck.report.plot import check_suffix, require_matplotlib

    try:
        check_suffix(path)
        require_matplotlib()
    except (ValueError, PlotUnavailable) as error:
        raise CommandLineError(f"--plot: {error}") from None


def load_baseline_request(args: argparse.Namespace) -> tuple[float | None, GradientProfile | None]:
    """(tolerance, baseline profile or None), read before the model runs so a bad file fails fast."""
    if args.tolerance is not None and not args.baseline:
        raise CommandLineError("--tolerance applies to --baseline; give --baseline FILE as well")
    if not args.baseline:
        return None, None
    from pytest_gradcheck.core.baseline import load_baseline, parse_tolerance
    from pytest_gradcheck.errors import BaselineFileError

    try:
        tolerance = parse_tolerance(DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance)
    except ValueError as error:
        raise CommandLineError(f"--tolerance: {error}") from None
    try:
        return tolerance, load_baseline(args.baseline)
    except BaselineFileError as error:
        raise CommandLineError(
            f"--baseline: {error.path} {error.problem}; write a fresh one with --save-baseline {args.baseline}"
        ) from None


def print_comparison(args: argparse.Namespace, comparison: BaselineComparison) -> None:
    """The baseline diff after the report; on stderr for JSON so stdout stays one document."""
    from pytest_gradcheck.report.baseline_text import render_baseline_check

    headline = f"baseline {args.baseline}: " + ("within tolerance" if comparison.passed else "REGRESSED")
    text = render_baseline_check(comparison, headline)
    if args.format == "json":
        print(text, file=sys.stderr)
    elif args.format == "markdown":
        print(f"\n```\n{text}\n```")
    else:
        print(f"\n{text}")


def probe_target(args: argparse.Namespace, bounds: Bounds, dtypes: list[str]) -> CheckResult:
    """Load, place and probe the model; every failure on the way is a CommandLineError."""
    import torch  # only now: --help and option errors stay fast

    from pytest_gradcheck.cli.target import load_model
    from pytest_gradcheck.core.findings import CheckResult
    from pytest_gradcheck.errors import ProbeError, TargetError
    from pytest_gradcheck.health import assess
    from pytest_gradcheck.probing.model_io import random_inputs

    device = place(args.device)
    torch.manual_seed(args.seed)  # before loading: the model's initial weights depend on it
    try:
        model = load_model(args.target, args.seed)
    except TargetError as error:
        raise CommandLineError(f"cannot load {args.target!r}: {error}") from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as error:
        raise CommandLineError(f"cannot move {type(model).__name__} to device {args.device!r}: {error}") from None
    inputs = random_inputs(model, args.input_shapes, dtypes, device) if args.input_shapes else None
    try:
        profile, findings = assess(model, inputs, bounds=bounds, seed=args.seed, detail=True)
    except ProbeError as error:
        if error.inputs_shape is None:
            raise CommandLineError(f"cannot probe {args.target!r}: {error}") from None
        shape = ",".join(str(size) for size in error.inputs_shape)
        raise CommandLineError(
            f"cannot probe {args.target!r}: {error.problem}; give the shape of each positional input of "
            f"forward() with --input-shape, e.g. --input-shape {shape} (and --input-dtype int64 for token ids)"
        ) from None
    return CheckResult(args.target, None, profile, bounds, findings)


def place(device_name: str) -> torch.device:
    import torch

    try:
        device = torch.device(device_name)
        torch.empty(0, device=device)  # a missing CUDA build or device fails here, not mid-probe
    except (RuntimeError, AssertionError) as error:
        raise CommandLineError(f"cannot use device {device_name!r}: {error}") from None
    return device


def render(fmt: str, result: CheckResult) -> str:
    if fmt == "markdown":
        from pytest_gradcheck.report.markdown import render_markdown

        return render_markdown([result])
    if fmt == "json":
        from pytest_gradcheck.report.json_report import render_json

        return render_json([result]).rstrip("\n")
    from pytest_gradcheck.report.table import render_table

    return render_table(result.profile, result.findings, title=result.title)
