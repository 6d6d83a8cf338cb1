"""The terminal report: one per-layer table per probed model, with a log-scale bar and the findings below."""

from __future__ import annotations

import math

from tabulate import tabulate

from pytest_gradcheck.core.findings import CheckResult, Finding, failing, verdict
from pytest_gradcheck.core.profile import GradientProfile
from pytest_gradcheck.core.signal import signal_curve
from pytest_gradcheck.report.format import cause_lines, finding_lines, layer_notes, number, ratio_text, time_lines

HEADERS = ["#", "layer", "kind", "params", "mean |grad|", "note"]
BAR_COLUMN = HEADERS.index("mean |grad|") + 1
# Shown after the bar when the probe measured them (probe(..., detail=True)).
DETAIL_HEADERS = ["max |grad|", "grad norm", "weight norm", "zeros"]
# The forward signal: the std of the layer's input over the first weight layer's input's.
SIGNAL_HEADER = "signal"
BAR_WIDTH = 12
# The bars show each layer's mean |grad| relative to the ratio's last layer, on one fixed log
# axis: the same bar means the same ratio in every table, and the default bounds (0.02 and
# 50) sit at the same place in each. Values beyond the axis are clipped to its ends.
RELATIVE_AXIS = (1e-4, 1e2)
# Without a last layer, the profile's own range, at least three decades wide.
MIN_BAR_DECADES = 3.0


def bar_scale(profile: GradientProfile) -> tuple[float, float] | None:
    """The (low, high) mean |grad| that map to the shortest and the full bar, or None."""
    last = profile.last
    if last is not None and math.isfinite(last.grad_mean_abs) and last.grad_mean_abs > 0.0:
        return RELATIVE_AXIS[0] * last.grad_mean_abs, RELATIVE_AXIS[1] * last.grad_mean_abs
    values = [
        layer.grad_mean_abs
        for layer in profile.layers
        if layer.received_grad and layer.finite and layer.grad_mean_abs > 0.0
    ]
    if not values:
        return None
    high = max(values)
    return min(min(values), high / 10**MIN_BAR_DECADES), high


def grad_bar(value: float, scale: tuple[float, float] | None, width: int = BAR_WIDTH) -> str:
    """``value`` as a bar of '#' on the log scale: 1 mark at the low end, ``width`` at the high end."""
    if scale is None or value is None or not math.isfinite(value) or value <= 0.0:
        return ""
    low, high = scale
    span = math.log10(high) - math.log10(low)
    fraction = (math.log10(value) - math.log10(low)) / span if span > 0 else 1.0
    return "#" * max(1, min(width, round(1 + fraction * (width - 1))))


def bar_header(profile: GradientProfile) -> str:
    """The bar column's header: the axis, relative to the last layer where there is one."""
    scale = bar_scale(profile)
    if scale is None:
        return "log scale"
    if profile.last is not None and profile.last.grad_mean_abs > 0.0:
        return f"vs last, log {RELATIVE_AXIS[0]:.0e}..{RELATIVE_AXIS[1]:.0e}"
    return f"log {scale[0]:.0e}..{scale[1]:.0e}"


def shown_rows(profile: GradientProfile, findings: list[Finding], max_rows: int | None) -> list[int]:
    """Indices of the layers a table of at most ``max_rows`` rows keeps, in model order.

    In order of priority: the first and last layers, the first/last picks of the
    ratio, the smallest and the largest mean |grad|, every layer a finding names,
    then further layers from both ends of the mean |grad| ranking, alternately.
    """
    layers = profile.layers
    if not max_rows or len(layers) <= max_rows:
        return list(range(len(layers)))
    position = {id(layer): index for index, layer in enumerate(layers)}
    by_name = {layer.name: index for index, layer in enumerate(layers)}
    picks = [position[id(layer)] for layer in (profile.first, profile.last) if layer is not None]
    named = [by_name[name] for finding in findings for name in finding.layers if name in by_name]
    ranked = sorted(
        (index for index, layer in enumerate(layers) if layer.received_grad and layer.finite),
        key=lambda index: layers[index].grad_mean_abs,
    )
    extremes = [index for pair in zip(ranked, reversed(ranked)) for index in pair][: len(ranked)]
    kept: list[int] = []
    for index in [0, len(layers) - 1, *picks, *extremes[:2], *named, *extremes[2:]]:
        if index not in kept:
            kept.append(index)
        if len(kept) == max_rows:
            break
    return sorted(kept)


def layer_rows(profile: GradientProfile, findings: list[Finding], indices: list[int] | None = None) -> list[list[str]]:
    """One row per layer (or per index in ``indices``), with the log-scale bar of mean |grad|."""
    scale = bar_scale(profile)
    detailed = profile.detailed
    signal = dict(signal_curve(profile)) or None
    rows = []
    for index in range(len(profile.layers)) if indices is None else indices:
        layer = profile.layers[index]
        row = [
            str(index),
            layer.name or "(root)",
            layer.kind,
            f"{layer.numel:,}",
            number(layer.grad_mean_abs),
            grad_bar(layer.grad_mean_abs, scale),
        ]
        if signal is not None:
            value = signal.get(layer.name)
            row.append(f"{value:.2g}" if value is not None else "")
        if detailed:
            row += [
                number(layer.grad_max_abs),
                number(layer.grad_norm),
                number(layer.weight_norm),
                f"{layer.zero_fraction:.0%}",
            ]
        rows.append(row + [layer_notes(profile, layer, findings)])
    return rows


def table_headers(profile: GradientProfile) -> list[str]:
    """The column headers; the detail columns only where the probe measured them."""
    headers = HEADERS[:BAR_COLUMN] + [bar_header(profile)]
    headers += [SIGNAL_HEADER] if signal_curve(profile) else []
    return headers + (DETAIL_HEADERS if profile.detailed else []) + HEADERS[BAR_COLUMN:]


def summary_line(profile: GradientProfile, findings: list[Finding], expected_failure: bool = False) -> str:
    shown = ratio_text(profile.ratio)
    first = profile.first.name if profile.first else "-"
    last = profile.last.name if profile.last else "-"
    expected = " (expected: the test expects this failure)" if expected_failure and failing(findings) else ""
    return f"{profile.model}: first/last ratio {shown} ({first} / {last}), verdict: {verdict(findings)}{expected}"


def render_table(
    profile: GradientProfile,
    findings: list[Finding],
    title: str | None = None,
    max_rows: int | None = None,
    failing_shown_above: bool = False,
    expected_failure: bool = False,
) -> str:
    """The per-layer table with a heading line and the findings below it.

    With ``max_rows`` the table keeps at most that many layers (see :func:`shown_rows`)
    and says how many it left out. ``expected_failure`` marks a failing verdict as
    expected (an xfail test's).
    """
    lines = []
    if title:
        lines.append(title)
    lines.append(summary_line(profile, findings, expected_failure))
    indices = shown_rows(profile, findings, max_rows)
    rows = layer_rows(profile, findings, indices)
    lines.append(tabulate(rows, headers=table_headers(profile), tablefmt="simple", disable_numparse=True))
    hidden = len(profile.layers) - len(indices)
    if hidden:
        lines.append(
            f"  ... {hidden} of {len(profile.layers)} layers left out (grad_report_max_rows = {max_rows}; "
            "0 shows all); the report files hold every layer"
        )
    lines += time_lines(profile)
    diagnosed = profile.activations is not None
    for finding in findings:
        if not (failing_shown_above and finding.failing):
            lines += finding_lines(finding, diagnosed, expected_failure)
    return "\n".join(lines)


def render_failure(profile: GradientProfile, findings: list[Finding], max_rows: int | None = None) -> str:
    """The GradientHealthError message: each failing rule with its numbers, then the table."""
    bad = failing(findings)
    head = [f"gradient health check failed for {profile.model}:"]
    for finding in bad:
        head += [f"  {finding.rule}: {finding.message}"] + cause_lines(finding, profile.activations is not None)
    table = render_table(profile, findings, max_rows=max_rows, failing_shown_above=True)
    return "\n".join(head) + "\n\n" + table


def render_session(results: list[CheckResult], max_rows: int | None = None) -> str:
    """Every probed model of the session, one table each."""
    return "\n\n".join(
        render_table(r.profile, r.findings, title=r.title, max_rows=max_rows, expected_failure=r.expected_failure)
        for r in results
    )
