"""What loading the plugin costs a pytest run that never uses it.

Run: python benchmarks/plugin_load.py [--runs 21]

It writes a small project of plain tests to a temporary folder and times
`pytest --collect-only` with the plugin loaded and with `-p no:gradcheck`,
alternating the two, and prints the medians, their difference, and whether
torch was imported (it must not be). Other installed plugins are switched off
(PYTEST_DISABLE_PLUGIN_AUTOLOAD) in both variants so that their noise stays out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFTEST = """
import sys

def pytest_collection_finish(session):
    print("torch imported:", "torch" in sys.modules)
"""


def make_project(root: Path) -> None:
    (root / "conftest.py").write_text(CONFTEST)
    for module in range(10):
        tests = "\n".join(f"def test_{index}():\n    assert {index} + 1 > {index}\n" for index in range(20))
        (root / f"test_plain_{module}.py").write_text(tests)


def run(root: Path, extra: list[str]) -> tuple[float, str]:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *extra]
    start = time.perf_counter()
    # Bytecode caching on, as in a user's environment: without it every run would also
    # pay for compiling (and pytest for assertion-rewriting) the plugin's modules.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    # Other installed plugins stay out of both variants, so their own start-up noise
    # (hypothesis imports itself at session end) cannot drown what this plugin costs.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    out = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"pytest failed in {root}:\n{out.stdout}\n{out.stderr}")
    return elapsed, out.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_project(root)
        variants = {"plugin loaded": ["-p", "pytest_gradcheck.plugin"], "-p no:gradcheck": ["-p", "no:gradcheck"]}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        torch_seen = []
        for extra in variants.values():  # warm-up: file cache, bytecode
            run(root, extra)
        for index in range(args.runs):
            order = list(variants.items()) if index % 2 == 0 else list(reversed(variants.items()))
            for name, extra in order:
                elapsed, stdout = run(root, extra)
                samples[name].append(elapsed)
                if name == "plugin loaded":
                    torch_seen.append("torch imported: True" in stdout)
    loaded = statistics.median(samples["plugin loaded"])
    without = statistics.median(samples["-p no:gradcheck"])
    print(f"pytest --collect-only on 200 plain tests, median of {args.runs} alternating runs\n")
    print("| variant | median ms |")
    print("|---|---|")
    print(f"| plugin loaded | {loaded * 1e3:.1f} |")
    print(f"| -p no:gradcheck | {without * 1e3:.1f} |")
    print(f"| difference | {(loaded - without) * 1e3:+.1f} (target <= 20) |")
    print(f"\ntorch imported with the plugin loaded: {any(torch_seen)}")
    ok = (loaded - without) <= 0.020 and not any(torch_seen)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
