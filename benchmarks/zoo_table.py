"""The docs' zoo tables from the JSON rows of ``benchmarks/zoo.py`` runs, side by side.

Run: python benchmarks/zoo_table.py b2=broken-b2.jsonl b2=hf-b2.jsonl b32=broken-b32.jsonl ...

Each argument is LABEL=PATH: the rows of one run (one batch size, say) under a label, which
names its columns. Per set, one row per model: the verdict and ratio of every label and loss
(a wrong verdict marked), the forward signal at the head's input and its peak, the initial
cross-entropy over ln(classes) under the natural loss (all three from the first label's
rows), the first and last layer and the top cause. Then a summary per set and label, and
every verdict that changes between labels (a flip). Reads plain JSON and the pure core: no
torch needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pytest_gradcheck import GradientProfile
from pytest_gradcheck.core.signal import first_input_std, main_path_end, output_signal, signal_curve

LOSSES = ("default", "natural")
NOT_PROBED = ("error", "skipped")


@dataclass
class Runs:
    """Rows by label, then by (set, model, loss); labels and models in the order first seen."""

    labels: list[str] = field(default_factory=list)
    rows: dict[str, dict[tuple[str, str, str], dict[str, Any]]] = field(default_factory=dict)
    models: dict[str, list[str]] = field(default_factory=dict)

    def add(self, label: str, row: dict[str, Any]) -> None:
        if label not in self.rows:
            self.labels.append(label)
            self.rows[label] = {}
        self.rows[label][row["set"], row["model"], row["loss"]] = row
        names = self.models.setdefault(row["set"], [])
        if row["model"] not in names:
            names.append(row["model"])

    def get(self, label: str, set_name: str, model: str, loss: str) -> dict[str, Any] | None:
        return self.rows[label].get((set_name, model, loss))


def number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    return f"{value:.2g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3g}"


def right(row: dict[str, Any]) -> bool | None:
    """Whether the verdict matches the ground truth; None for a row that was not probed."""
    if row["verdict"] in NOT_PROBED:
        return None
    return (row["truth"] == "trains") == (row["verdict"] == "healthy")


def signals(row: dict[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """The forward signal at the head's input and at its peak, as the signal rules judge them
    (relative to the first layer's input, at unit scale), and the initial loss over ln(classes)."""
    if not row or not row.get("profile"):
        return None, None, None
    profile = GradientProfile.from_dict(row["profile"])
    curve, reference = signal_curve(profile), first_input_std(profile)
    head = peak = None
    if len(curve) >= 2 and reference is not None:
        head = curve[main_path_end(profile, curve)][1] * max(reference, 1.0)
        output = output_signal(profile)
        peak = max([value for _, value in curve] + ([output] if output is not None else [])) * min(reference, 1.0)
    loss = None
    if profile.under_softmax_loss and profile.expected_loss is not None and (profile.output_classes or 0) > 1:
        loss = profile.expected_loss / math.log(profile.output_classes or 2)
    return head, peak, loss


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if row["verdict"] in NOT_PROBED:
        return row["verdict"]
    return f"{row['verdict']} {number(row['ratio'])}" + ("" if right(row) else " ✗")


def model_table(runs: Runs, set_name: str) -> list[str]:
    columns = [f"{label}: {loss}" for label in runs.labels for loss in LOSSES]
    lines = [
        "| model | truth | "
        + " | ".join(columns)
        + " | head-input signal | peak signal | loss / ln C | first → last | top cause |",
        "|---|---|" + "---|" * len(columns) + "---|---|---|---|---|",
    ]
    first_label = runs.labels[0]
    for model in runs.models[set_name]:
        found = [runs.get(label, set_name, model, loss) for label in runs.labels for loss in LOSSES]
        truth = next(row["truth"] for row in found if row)
        default, natural = (runs.get(first_label, set_name, model, loss) for loss in LOSSES)
        head, peak, _ = signals(default)
        _, _, loss_ratio = signals(natural)
        cause = next((row["cause"] for row in found if row and row.get("cause")), "") or "-"
        layers = f"{default['first']} → {default['last']}" if default and default.get("first") else "-"
        lines.append(
            f"| {model} | {truth} | "
            + " | ".join(cell(row) for row in found)
            + f" | {number(head)} | {number(peak)} | {number(loss_ratio)} | {layers} | {cause} |"
        )
    return lines


def summary(runs: Runs) -> list[str]:
    lines = [
        "| set | run | models | rows | right | trains but flagged | fails but healthy | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name, models in runs.models.items():
        for label in runs.labels:
            counts: Counter[str] = Counter()
            seen = set()
            for model in models:
                for loss in LOSSES:
                    row = runs.get(label, set_name, model, loss)
                    if row is None:
                        continue
                    seen.add(model)
                    counts["rows"] += 1
                    verdict_right = right(row)
                    if verdict_right is None:
                        counts["error"] += 1
                    elif verdict_right:
                        counts["right"] += 1
                    else:
                        counts["false alarm" if row["truth"] == "trains" else "missed"] += 1
            if counts["rows"]:
                lines.append(
                    f"| {set_name} | {label} | {len(seen)} | {counts['rows']} | {counts['right']} | "
                    f"{counts['false alarm']} | {counts['missed']} | {counts['error']} |"
                )
    return lines


def flips(runs: Runs) -> list[str]:
    """Every (model, loss) whose healthy-or-not verdict differs between two labels."""
    found = []
    for set_name, models in runs.models.items():
        for model in models:
            for loss in LOSSES:
                verdicts = {
                    label: row["verdict"]
                    for label in runs.labels
                    if (row := runs.get(label, set_name, model, loss)) and row["verdict"] not in NOT_PROBED
                }
                if len({verdict == "healthy" for verdict in verdicts.values()}) > 1:
                    found.append(f"{set_name} {model} ({loss}): " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH", help="the JSON rows of one run, under a label")
    args = parser.parse_args(argv)
    runs = Runs()
    for argument in args.runs:
        label, separator, path = argument.partition("=")
        if not separator or not label or not path:
            parser.error(f"{argument!r} is not LABEL=PATH (e.g. b2=rows.jsonl)")
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    runs.add(label, json.loads(line))
    for set_name in runs.models:
        print(f"### {set_name}\n")
        print("\n".join(model_table(runs, set_name)) + "\n")
    print("### Summary\n")
    print("\n".join(summary(runs)) + "\n")
    changed = flips(runs)
    print(f"Verdicts that change between runs: {len(changed)}")
    for line in changed:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
