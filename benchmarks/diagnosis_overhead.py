"""What diagnosis adds to a probe: nothing on a healthy model, one instrumented forward when it runs.

Run: python benchmarks/diagnosis_overhead.py [--quick] [--models relu-net resnet18 gpt2-small ...]

Every number is a median of alternating runs after a warm-up, and every claim is a
ratio of two things measured side by side in this one run:

- probe:    pytest_gradcheck.probe(model, inputs), the floor
- again:    the same probe once more: again / probe is the noise floor of this machine (A/A)
- assess:   pytest_gradcheck.assess(model, inputs, bounds=Bounds()), what gradient_health runs: probe,
            check, and the instrumented activation pass only when vanishing/exploding fires
- diagnose: assess(..., diagnose=True), the pass always (a failing model, or the
            dead_relu/saturation rules switched on)

Ratios are medians of the per-round ratios: the variants of one round run back to back,
so load from other processes on a shared machine cancels out better than in a ratio of
two medians. The target: on a healthy model, assess / probe <= 1.10.
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from models import build  # noqa: E402
from seed_networks import ReLUNet, SigmoidNet  # noqa: E402

from pytest_gradcheck import Bounds, assess, probe  # noqa: E402

HEALTHY_TARGET = 1.10
DEFAULT_MODELS = ["relu-net", "resnet18", "sigmoid-net", "mlp-10", "mlp-100"]


def case(name: str):
    """(model, inputs) for a seed network or one of benchmarks/models.py."""
    torch.manual_seed(0)
    if name == "relu-net":
        return ReLUNet(), torch.randn(8, 64)
    if name == "sigmoid-net":
        return SigmoidNet(), torch.randn(8, 64)
    return build(name)


def timed(fn) -> float:
    """Seconds for one call. Garbage is collected before, not during: on a 1 ms probe a
    collection triggered by the previous variant's garbage would land on whichever runs next."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start
    finally:
        gc.enable()


def alternate(model, inputs, reps: int) -> dict[str, list[float]]:
    """Seconds of each variant per round, interleaved (and reversed every other round) against drift."""
    bounds = Bounds()
    variants = {
        "probe": lambda: probe(model, inputs),
        "again": lambda: probe(model, inputs),
        "assess": lambda: assess(model, inputs, bounds=bounds),
        "diagnose": lambda: assess(model, inputs, bounds=bounds, diagnose=True),
    }
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps):
        order = list(variants.items())
        if rep % 2:
            order.reverse()
        for name, fn in order:
            samples[name].append(timed(fn))
    return samples


def paired(samples: dict[str, list[float]], name: str) -> float:
    """Median over rounds of variant / probe."""
    return statistics.median(a / b for a, b in zip(samples[name], samples["probe"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke run")
    parser.add_argument(
        "--models", nargs="+", default=DEFAULT_MODELS, help="relu-net, sigmoid-net, resnet18, gpt2-small, mlp-<layers>"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    reps = 3 if args.quick else 11
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} rounds\n")
    print(
        "| model | verdict | probe ms | assess ms | diagnose ms | again / probe (A/A) | assess / probe "
        "| diagnose / probe | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for name in args.models:
        model, inputs = case(name)
        model, inputs = model.to(args.device), inputs.to(args.device)
        health = assess(model, inputs, bounds=Bounds(), diagnose=False).verdict
        samples = alternate(model, inputs, reps)
        t = {name: statistics.median(values) for name, values in samples.items()}
        ratio = paired(samples, "assess")
        target = "-"
        if health == "healthy":
            passed = ratio <= HEALTHY_TARGET
            ok &= passed
            target = f"{'ok' if passed else 'MISSED'} (<= {HEALTHY_TARGET})"
        print(
            f"| {name} | {health} | {t['probe'] * 1e3:.1f} | {t['assess'] * 1e3:.1f} | {t['diagnose'] * 1e3:.1f} "
            f"| {paired(samples, 'again'):.3f} | **{ratio:.3f}** | {paired(samples, 'diagnose'):.3f} | {target} |"
        )
        del model, inputs
    print("\nhealthy-model target met" if ok else "\nHEALTHY-MODEL TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
