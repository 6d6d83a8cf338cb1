"""What a probe costs next to the bare forward and backward pass it cannot avoid.

Run: python benchmarks/overhead.py [--quick]

Every number is a median of alternating runs after a warm-up, and every claim is
a ratio of two things measured side by side in this one run:

- probe:  pytest_gradcheck.probe(model, inputs), what gradient_health runs by default
- detail: probe(model, inputs, detail=True), what it runs for --grad-report and plots
- bare:   model(inputs).sum().backward(), the floor
- seed:   the notebook's loop: .backward(), then one .item() per layer (the peer)
- norms:  one torch._foreach_norm pass over all gradients and all weights, the
          physical floor for per-layer statistics; "extra" is probe minus bare.
Each model is timed in a fresh child process, so that one case's leftovers (a heap
the garbage collector has to walk) cannot slow the next. Every variant starts from
``.grad`` None, set outside the clock, as a fresh model does.
With --against DIR, the probe / bare ratios of this tree and of the checkout in DIR are
measured side by side: their child processes alternate, a few rounds each.
Peak memory is measured in a fresh child process per variant: the peak resident
set above what the process held before it built the model (CPU), or
max_memory_allocated (CUDA); both count the model, its inputs and one pass.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from models import build

from pytest_gradcheck import probe

TARGETS = {"gpt2-small": 1.10, "resnet18": 1.10, "mlp-1000": 1.30}


def bare_pass(model, inputs):
    model(inputs).sum().backward()


def seed_loop(model, inputs):
    model(inputs).sum().backward()
    return [
        m.weight.grad.abs().mean().item()
        for m in model.modules()
        if getattr(m, "weight", None) is not None and m.weight.dim() >= 2 and m.weight.grad is not None
    ]


def probe_pass(model, inputs):
    return probe(model, inputs)


def detail_pass(model, inputs):
    return probe(model, inputs, detail=True)


def norms_pass(grads, weights):
    torch._foreach_norm(grads)
    torch._foreach_norm(weights)
    if grads[0].is_cuda:
        torch.cuda.synchronize()


def timed(fn, *args) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - start


def alternate(model, inputs, reps: int) -> dict[str, float]:
    """Median seconds of each variant, interleaved so drift hits all of them alike.

    The ratios are medians of the ratios within each round ("probe/bare": the probe
    over the bare pass of the same round): the load of a shared machine drifts over
    seconds, and a pair measured a few milliseconds apart sees the same load.
    """
    model.train()
    variants = {"probe": probe_pass, "detail": detail_pass, "bare": bare_pass, "seed": seed_loop}
    for fn in variants.values():  # warm-up
        fn(model, inputs)
    bare_pass(model, inputs)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    weights = [p.detach() for p in model.parameters() if p.grad is not None]
    norms_pass(grads, weights)
    samples: dict[str, list[float]] = {name: [] for name in [*variants, "norms"]}
    for rep in range(reps):
        order = list(variants.items())
        if rep % 2:
            order.reverse()
        for name, fn in order:
            # Outside the clock: every variant starts from .grad None, as a fresh model does.
            model.zero_grad(set_to_none=True)
            samples[name].append(timed(fn, model, inputs))
        samples["norms"].append(timed(norms_pass, grads, weights))
    model.zero_grad(set_to_none=True)
    result = {name: statistics.median(values) for name, values in samples.items()}
    for name in ("probe", "detail", "seed"):
        result[f"{name}/bare"] = statistics.median(v / b for v, b in zip(samples[name], samples["bare"]))
    result["extra"] = statistics.median(p - b for p, b in zip(samples["probe"], samples["bare"]))
    result["extra/norms"] = statistics.median(
        (p - b) / n for p, b, n in zip(samples["probe"], samples["bare"], samples["norms"])
    )
    return result


def timings(case: str, reps: int, device: str, package_root: str | None = None) -> dict[str, float]:
    """Median seconds of each variant on ``case``, measured in a fresh child process.

    ``package_root`` is a checkout whose ``pytest_gradcheck`` the child imports instead
    of the installed one (see --against).
    """
    env = dict(os.environ)
    if package_root:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, __file__, "--time-child", case, str(reps), "--device", device],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(models: list[str], reps: dict[str, int], device: str, against: str, rounds: int) -> None:
    """probe / bare of this tree next to another checkout's, children alternating, ``rounds`` each."""
    here = str(pathlib.Path(__file__).resolve().parent.parent)
    print(f"this tree: {here}\nagainst:   {against}\n")
    print(
        "| model | probe / bare, this tree | probe / bare, against | this / against "
        "| detail / bare, this | detail / bare, against |"
    )
    print("|---|---|---|---|---|---|")
    for case in models:
        runs: dict[str, list[dict[str, float]]] = {"this": [], "against": []}
        for turn in range(rounds):
            order = [("this", here), ("against", against)]
            for label, root in order if turn % 2 == 0 else reversed(order):
                runs[label].append(timings(case, reps[case], device, root))
        this = statistics.median(t["probe/bare"] for t in runs["this"])
        other = statistics.median(t["probe/bare"] for t in runs["against"])
        detail_this = statistics.median(t["detail/bare"] for t in runs["this"])
        detail_other = statistics.median(t["detail/bare"] for t in runs["against"])
        print(
            f"| {case} | {this:.3f} | {other:.3f} | **{this / other:.3f}** | {detail_this:.3f} | {detail_other:.3f} |"
        )


def time_child(case: str, reps: int, device: str) -> None:
    model, inputs = build(case)
    model, inputs = model.to(device), inputs.to(device)
    print(json.dumps(alternate(model, inputs, reps)))


def peak_memory(case: str, mode: str, device: str, children: int = 3) -> float:
    """Peak bytes a single pass adds: the median of fresh child processes.

    A CPU's resident set moves by a megabyte or so from one process to the next (the
    allocator's arenas, the thread pool), which is a lot next to a 20 MB pass.
    """
    peaks = []
    for _ in range(children):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", case, mode, "--device", device],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks.append(float(json.loads(out.stdout.strip().splitlines()[-1])["peak"]))
    return statistics.median(peaks)


def memory_child(case: str, mode: str, device: str) -> None:
    # Warm up on small models first: the first call of each kernel maps library code
    # pages into the process, and the first reduction large enough to run in parallel
    # starts the thread pool; both would count as resident memory of the pass.
    for warm, warm_inputs in (build("mlp-2"), (torch.nn.Linear(512, 512), torch.randn(64, 512))):
        probe_pass(warm, warm_inputs)
        probe(warm, warm_inputs, detail=True)
        bare_pass(warm, warm_inputs)
    # Measured from before the model exists, as CUDA's max_memory_allocated counts
    # the parameters too: the peak is the model, its inputs, and the pass.
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_now()
    model, inputs = build(case)
    model, inputs = model.to(device), inputs.to(device)
    model.train()
    (probe_pass if mode == "probe" else bare_pass)(model, inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _peak_rss() - before
    print(json.dumps({"peak": peak}))


def _peak_rss() -> float:
    # VmHWM belongs to this address space. ru_maxrss would not do: Linux carries it
    # over from the parent through fork and exec, so a big parent inflates both variants.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _rss_now() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, for a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS), help="models to measure")
    parser.add_argument(
        "--against",
        metavar="DIR",
        help="a checkout of another version (e.g. `git worktree add /tmp/prev main`): time both side by side",
    )
    parser.add_argument("--rounds", type=int, default=3, help="child processes per version with --against")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--time-child", nargs=2, metavar=("CASE", "REPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.device)
        return 0
    if args.time_child:
        time_child(args.time_child[0], int(args.time_child[1]), args.device)
        return 0

    reps = {
        "gpt2-small": 3 if args.quick else 7,
        "resnet18": 5 if args.quick else 15,
        "mlp-1000": 5 if args.quick else 21,
    }
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.against:
        side_by_side(args.models, reps, args.device, args.against, args.rounds)
        return 0
    rows, ok = [], True
    for case in args.models:
        target = TARGETS[case]
        t = timings(case, reps[case], args.device)
        ratio, extra, extra_vs_norms = t["probe/bare"], t["extra"], t["extra/norms"]
        if args.no_memory:
            memory = float("nan")
        else:
            memory = peak_memory(case, "probe", args.device) / peak_memory(case, "bare", args.device)
        passed = ratio <= target and extra_vs_norms <= 2.0 and (args.no_memory or memory <= 1.10)
        ok &= passed
        rows.append(
            f"| {case} | {t['bare'] * 1e3:.1f} | {t['probe'] * 1e3:.1f} | {t['seed'] * 1e3:.1f} | "
            f"**{ratio:.3f}** (<= {target}) | {t['seed/bare']:.3f} | {extra * 1e3:.1f} | "
            f"{t['norms'] * 1e3:.1f} | {extra_vs_norms:.2f} (<= 2) | {memory:.3f} (<= 1.1) | "
            f"{t['detail/bare']:.3f} | {'ok' if passed else 'MISSED'} |"
        )
    print(
        "| model | bare ms | probe ms | seed loop ms | probe / bare | seed / bare | extra ms | foreach_norm ms "
        "| extra / norms | peak memory probe / bare | detail / bare | targets |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))

    print("\nGrowth with depth (32-wide MLP, batch 8):\n")
    print("| layers | bare ms | probe ms | probe us per layer | extra us per layer |")
    print("|---|---|---|---|---|")
    per_layer = {}
    for layers in (10, 100, 1000):
        t = timings(f"mlp-{layers}", 5 if args.quick else 15, args.device)
        per_layer[layers] = t["extra"] / layers
        print(
            f"| {layers} | {t['bare'] * 1e3:.2f} | {t['probe'] * 1e3:.2f} | {t['probe'] / layers * 1e6:.1f} "
            f"| {per_layer[layers] * 1e6:.1f} |"
        )
    growth = per_layer[1000] / per_layer[100]
    print(f"\nextra cost per layer at 1000 layers / at 100 layers: {growth:.2f}")
    print("(1.0 is linear; a quadratic term shows as ~10)")
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
