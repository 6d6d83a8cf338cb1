"""Gradient-flow charts: mean and max |grad| per layer in execution order (needs matplotlib)."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_gradcheck.core.bounds import Bounds
from pytest_gradcheck.core.files import safe_name
from pytest_gradcheck.core.findings import CheckResult, Finding, failing, verdict
from pytest_gradcheck.core.profile import GradientProfile, LayerStats, TimeProfile
from pytest_gradcheck.core.signal import signal_curve
from pytest_gradcheck.errors import PlotUnavailable, SettingError
from pytest_gradcheck.report.format import ratio_text

# A matplotlib Axes; matplotlib is optional, so it is not imported to name the type.
Axes = Any

INSTALL = (
    'pip install "pytest-gradcheck[plot]" (from a clone of the repository: pip install -e ".[plot]"; '
    "or just pip install matplotlib)"
)
SUFFIXES = (".png", ".svg")
DPI = 100
LABEL_LIMIT = 32  # characters of a layer name shown under its tick
MAX_TICKS = 80  # beyond this, label every k-th layer (plus first and last) to keep names legible
MAX_WIDTH = 22.0  # inches; wider charts are hard to view, so long models thin their labels instead
CHAR_INCHES = 0.075  # width of one character of an 8-point tick label
TIME_PANEL_HEIGHT = 2.4  # inches per recurrent layer's panel
FILENAME_LIMIT = 150  # well under the 255-byte limit of common filesystems, leaving room for a suffix


def require_matplotlib() -> None:
    """Fail fast, before any model runs, when a plot was asked for but cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable(f"gradient-flow plots need matplotlib, which is not installed; run: {INSTALL}")


def check_suffix(path: str | Path) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise SettingError(
            "plot",
            f"cannot write a plot to {str(path)!r}: the file name must end in .png or .svg, "
            f"got {suffix or 'no suffix'!r}",
        )


def short_label(name: str, limit: int = LABEL_LIMIT) -> str:
    """A layer name that fits under a tick, e.g. 'trans…11.self_attention.out_proj'.

    The most specific end of the name (block index, sub-module) is kept whole; what
    room is left goes to the start of the name.
    """
    if not name:
        return "(root)"
    if len(name) <= limit:
        return name
    parts = name.split(".")
    room = limit - 1  # one character for the ellipsis
    tail = parts[-1]
    if len(tail) > room:  # one very long last component: keep its end
        return "…" + tail[-room:]
    for part in reversed(parts[1:-1]):
        if len(tail) + len(part) + 1 > room:
            break
        tail = f"{part}.{tail}"
    return name[: room - len(tail)] + "…" + tail


def label_rotation(labels: list[str]) -> int:
    """0 when every name fits flat under its tick, 35 degrees for a few layers, else 90."""
    longest = max((len(label) for label in labels), default=0)
    width = _base_width(len(labels))
    ticks = min(len(labels), MAX_TICKS)
    if longest * CHAR_INCHES < 0.85 * width / max(1, ticks):
        return 0
    return 35 if len(labels) <= 12 else 90


def _base_width(n_layers: int) -> float:
    return min(MAX_WIDTH, max(6.4, 2.5 + 0.3 * n_layers))


def figure_size(labels: list[str]) -> tuple[float, float]:
    """Width grows with the layer count; height leaves room for the rotated names."""
    rotation = label_rotation(labels)
    longest = max((len(label) for label in labels), default=0)
    label_height = longest * CHAR_INCHES * math.sin(math.radians(rotation))
    width = _base_width(len(labels))
    return width, round(4.2 + 0.1 * (width - 6.4) + label_height, 2)


def plot_profile(
    profile: GradientProfile,
    findings: list[Finding],
    bounds: Bounds,
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Draw the gradient-flow chart of ``profile`` to ``path`` (.png or .svg) and return the path."""
    check_suffix(path)
    require_matplotlib()
    # Figure + Agg canvas, not pyplot: no global backend switch and no figure registry,
    # so a test session that uses matplotlib itself is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [short_label(layer.name) for layer in profile.layers]
    width, height = figure_size(labels)
    panels = 1 + len(profile.time)  # one more panel per recurrent layer followed through time
    figure = Figure(figsize=(width, height + TIME_PANEL_HEIGHT * len(profile.time)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, squeeze=False, height_ratios=[height] + [TIME_PANEL_HEIGHT] * len(profile.time))
    draw(axes[0][0], profile, findings, bounds, title=title)
    for row, steps in zip(axes[1:], profile.time):
        draw_time(row[0], steps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def draw(
    axes: Axes, profile: GradientProfile, findings: list[Finding], bounds: Bounds, *, title: str | None = None
) -> None:
    """Draw the chart on matplotlib ``axes``, e.g. one panel of a figure with several models."""
    labels = [short_label(layer.name) for layer in profile.layers]
    _draw(axes, profile, findings, bounds, labels)
    _title(axes, profile, findings, title)


def _draw(axes: Axes, profile: GradientProfile, findings: list[Finding], bounds: Bounds, labels: list[str]) -> None:
    layers = profile.layers
    x = list(range(len(layers)))
    means = [_positive(layer.grad_mean_abs) if layer.received_grad else math.nan for layer in layers]
    # The largest |grad| is there when the probe measured it (detail=True, as gradcheck and --grad-plot do).
    maxes = []
    if profile.detailed:
        maxes = [_positive(layer.grad_max_abs) if layer.received_grad else math.nan for layer in layers]
    low, high = _value_range(means + maxes + _bound_levels(profile, bounds))
    axes.set_yscale("log")
    axes.set_ylim(low / 3, high * 3)
    size = 6 if len(layers) <= MAX_TICKS else 2  # hundreds of layers: markers would merge into a band
    if maxes:
        axes.plot(x, maxes, marker="^", markersize=size - 1, linestyle=":", color="tab:orange", label="max |grad|")
    axes.plot(x, means, marker="o", markersize=size, linewidth=2, color="tab:blue", label="mean |grad|")
    _draw_bounds(axes, profile, bounds)
    _draw_unplottable(axes, layers, low, high)
    _mark_first_last(axes, profile)
    axes.set_xlim(-0.5, len(layers) - 0.5)
    _ticks(axes, profile, findings, labels)
    axes.set_xlabel("layer, in execution order")
    axes.set_ylabel("|grad| (log scale)")
    axes.grid(axis="y", which="major", alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    signal = _draw_signal(axes, profile, bounds, size)
    if signal is not None:
        more_handles, more_names = signal.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    axes.legend(handles, names, loc="best", fontsize="small", framealpha=0.85)


def _draw_signal(axes: Axes, profile: GradientProfile, bounds: Bounds, size: int) -> Axes | None:
    """The forward signal beside the gradients, on its own log axis: each layer's input std over the first's."""
    curve = dict(signal_curve(profile))
    if len(curve) < 2:
        return None
    x = [index for index, layer in enumerate(profile.layers) if layer.name in curve]
    values = [curve[profile.layers[index].name] for index in x]
    signal_axes = axes.twinx()
    signal_axes.set_yscale("log")
    levels = [level for level in (bounds.min_signal, bounds.max_signal) if level]
    low, high = _value_range(values + levels)
    signal_axes.set_ylim(low / 3, high * 3)
    signal_axes.plot(
        x,
        values,
        marker="s",
        markersize=size - 2,
        linestyle="--",
        color="tab:green",
        label="forward signal (right axis)",
    )
    for level in levels:
        signal_axes.axhline(level, color="tab:green", linestyle=":", linewidth=1)
    signal_axes.set_ylabel("input std / first layer's (log scale)")
    return signal_axes


def draw_time(axes: Axes, steps: TimeProfile) -> None:
    """The mean |grad| that reached each step of one recurrent layer, earliest step first."""
    values = [_positive(value) for value in steps.steps]
    low, high = _value_range(values)
    axes.set_yscale("log")
    axes.set_ylim(low / 3, high * 3)
    axes.plot(range(len(values)), values, color="tab:purple", linewidth=1.5, label="mean |grad| at the step")
    axes.set_xlabel(f"time step of {steps.layer} ({steps.kind})")
    axes.set_ylabel("|grad| (log scale)")
    ratio = steps.ratio
    shown = "n/a" if ratio is None else f"{ratio:.3g}"
    axes.set_title(f"{steps.layer} through time: earliest / latest step {shown}", fontsize="small")
    axes.grid(axis="y", which="major", alpha=0.3)


def _positive(value: float | None) -> float:
    """Log axes cannot show 0, NaN or Inf; those layers get their own markers instead."""
    return value if value is not None and math.isfinite(value) and value > 0 else math.nan


def _value_range(values: Iterable[float]) -> tuple[float, float]:
    shown = [value for value in values if math.isfinite(value) and value > 0]
    if not shown:
        return 1e-3, 1.0
    low, high = min(shown), max(shown)
    if high / low < 100:  # a log axis over a fraction of a decade labels itself badly
        middle = math.sqrt(low * high)
        low, high = min(low, middle / 10), max(high, middle * 10)
    return low, high


def _bound_levels(profile: GradientProfile, bounds: Bounds) -> list[float]:
    last = profile.last
    if last is None or not math.isfinite(last.grad_mean_abs) or last.grad_mean_abs <= 0:
        return []
    return [last.grad_mean_abs * ratio for ratio in (bounds.min_ratio, bounds.max_ratio) if ratio]


def _draw_bounds(axes: Axes, profile: GradientProfile, bounds: Bounds) -> None:
    """The band the first layer's mean |grad| must stay in, drawn relative to the last layer."""
    last = profile.last
    if last is None or not _bound_levels(profile, bounds):
        return
    base = last.grad_mean_abs
    for name, bound, colour in (
        ("min_ratio", bounds.min_ratio, "tab:red"),
        ("max_ratio", bounds.max_ratio, "tab:purple"),
    ):
        if bound:
            axes.axhline(
                base * bound, color=colour, linestyle="--", linewidth=1, label=f"{name} {bound:g} × last layer"
            )
    if bounds.min_ratio and bounds.max_ratio:
        axes.axhspan(base * bounds.min_ratio, base * bounds.max_ratio, color="tab:green", alpha=0.07)


def _draw_unplottable(axes: Axes, layers: list[LayerStats], low: float, high: float) -> None:
    """Dead, non-finite and gradient-less layers, pinned to the bottom or top edge."""
    groups = {
        "all-zero grad (dead)": ([i for i, layer in enumerate(layers) if layer.dead], low / 2, "v", "tab:red"),
        "NaN/Inf grad": (
            [i for i, layer in enumerate(layers) if layer.received_grad and not layer.finite],
            high * 2,
            "X",
            "tab:red",
        ),
        "no grad (unused)": ([i for i, layer in enumerate(layers) if not layer.received_grad], low / 2, "o", "grey"),
    }
    for label, (indices, level, marker, color) in groups.items():
        if indices:
            axes.scatter(indices, [level] * len(indices), marker=marker, s=60, color=color, zorder=3, label=label)


def _mark_first_last(axes: Axes, profile: GradientProfile) -> None:
    """Shade the two layers whose ratio decides vanishing/exploding, and say which is which."""
    picks = [(profile.first, "first"), (profile.last, "last")]
    for layer, word in picks:
        if layer is None:
            continue
        index = profile.layers.index(layer)
        axes.axvspan(index - 0.3, index + 0.3, color="0.92", zorder=0)
        axes.annotate(
            word,
            xy=(index, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize="small",
            fontweight="bold",
        )


def _ticks(axes: Axes, profile: GradientProfile, findings: list[Finding], labels: list[str]) -> None:
    count = len(labels)
    step = max(1, math.ceil(count / MAX_TICKS))
    picks = {profile.layers.index(layer) for layer in (profile.first, profile.last) if layer is not None}
    shown = sorted(set(range(0, count, step)) | picks)
    rotation = label_rotation(labels)
    axes.set_xticks(shown)
    axes.set_xticklabels(
        [labels[i] for i in shown],
        rotation=rotation,
        fontsize=8,
        ha="center" if rotation in (0, 90) else "right",
        rotation_mode="anchor" if rotation == 35 else "default",
    )
    flagged = {
        name for finding in failing(findings) if not _is_ratio_finding(finding, profile) for name in finding.layers
    }
    for tick, index in zip(axes.get_xticklabels(), shown):
        if profile.layers[index].name in flagged:
            tick.set_color("tab:red")


def _is_ratio_finding(finding: Finding, profile: GradientProfile) -> bool:
    """The first/last ratio finding names both picks; the band already shows which one is off."""
    return finding.rule in ("vanishing", "exploding") and finding.value == profile.ratio


def _title(axes: Axes, profile: GradientProfile, findings: list[Finding], title: str | None) -> None:
    shown = ratio_text(profile.ratio)
    outcome = verdict(findings)
    heading = f"{profile.model}: {outcome.upper()}, first/last mean |grad| ratio {shown}"
    if title:
        heading = f"{title}\n{heading}"
    axes.set_title(heading, color="tab:red" if failing(findings) else "darkgreen", fontsize="medium", pad=14)


def plot_filename(nodeid: str, name: str | None = None, index: int = 0, suffix: str = ".png") -> str:
    """A filesystem-safe file name from a test's node id, e.g. 'tests.test_x--test_y[a-1].png'."""
    path, _, rest = nodeid.partition("::")
    path = re.sub(r"\.py$", "", path).replace("/", ".").replace("\\", ".")
    parts = [path, *rest.split("::"), name or ""]
    # The same rule as the baseline files: an altered part gets a hash, so ids never collide.
    stem = "--".join(safe_name(part) for part in parts if part) or "gradcheck"
    if index:
        stem += f"-{index + 1}"
    if len(stem) > FILENAME_LIMIT:  # keep it unique: a short hash of the full id replaces the middle
        digest = hashlib.sha1(stem.encode()).hexdigest()[:10]
        stem = f"{stem[: FILENAME_LIMIT - 40]}~{digest}~{stem[-28:]}"
    return stem + suffix


def save_result_plots(results: list[CheckResult], directory: str | Path) -> list[Path]:
    """One chart per probed model of a test; unnamed repeats within a test get -2, -3..."""
    seen: dict[tuple[str, str | None], int] = {}
    written = []
    for result in results:
        key = (result.nodeid, result.name)
        index = seen.get(key, 0)
        seen[key] = index + 1
        target = Path(directory) / plot_filename(result.nodeid, result.name, index)
        written.append(plot_profile(result.profile, result.findings, result.bounds, target, title=result.title))
    return written
