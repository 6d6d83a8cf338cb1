"""Reports: render profiles and findings as text. They never decide anything."""

from __future__ import annotations

import html
import json
import math
from typing import Any

from tabulate import tabulate

from pytest_gradcheck import __version__
from pytest_gradcheck.checks import CheckResult, Finding, failing, verdict
from pytest_gradcheck.files import strict_json
from pytest_gradcheck.profile import GradientProfile, LayerStats

HEADERS = ["#", "layer", "kind", "params", "mean |grad|", "note"]
BAR_COLUMN = HEADERS.index("mean |grad|") + 1
# Shown after the bar when the probe measured them (probe(..., detail=True)).
DETAIL_HEADERS = ["max |grad|", "grad norm", "weight norm", "zeros"]
BAR_WIDTH = 12
# Healthy profiles span well under three decades; a floor on the scale keeps their
# bars near-full instead of stretching a 2x spread across the whole column.
MIN_BAR_DECADES = 3.0
# Version of the --grad-report-json document; bump it when a key changes meaning or goes away.
SCHEMA_VERSION = 1


def _number(value: float) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3e}"


def layer_notes(profile: GradientProfile, layer: LayerStats, findings: list[Finding]) -> str:
    """Short flags for one row: first/last pick, findings that name it, sharing."""
    notes = []
    if profile.first is layer:
        notes.append("first")
    if profile.last is layer:
        notes.append("last")
    for finding in findings:
        if layer.name in finding.layers and finding.rule not in notes:
            notes.append(finding.rule)
    if not layer.executed:
        notes.append("not called")
    if layer.shared_with:
        notes.append("shared with " + ", ".join(layer.shared_with))
    return ", ".join(notes)


def bar_scale(profile: GradientProfile) -> tuple[float, float] | None:
    """The (low, high) mean |grad| that map to the shortest and the full bar, or None."""
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


def bar_header(scale: tuple[float, float] | None) -> str:
    return "log scale" if scale is None else f"log {scale[0]:.0e}..{scale[1]:.0e}"


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


def layer_rows(
    profile: GradientProfile, findings: list[Finding], indices: list[int] | None = None
) -> list[list[str]]:
    """One row per layer (or per index in ``indices``), with the log-scale bar of mean |grad|."""
    scale = bar_scale(profile)
    detailed = profile.detailed
    rows = []
    for index in range(len(profile.layers)) if indices is None else indices:
        layer = profile.layers[index]
        row = [
            str(index),
            layer.name or "(root)",
            layer.kind,
            f"{layer.numel:,}",
            _number(layer.grad_mean_abs),
            grad_bar(layer.grad_mean_abs, scale),
        ]
        if detailed:
            row += [
                _number(layer.grad_max_abs),
                _number(layer.grad_norm),
                _number(layer.weight_norm),
                f"{layer.zero_fraction:.0%}",
            ]
        rows.append(row + [layer_notes(profile, layer, findings)])
    return rows


def table_headers(profile: GradientProfile) -> list[str]:
    """The column headers; the detail columns only where the probe measured them."""
    headers = HEADERS[:BAR_COLUMN] + [bar_header(bar_scale(profile))]
    return headers + (DETAIL_HEADERS if profile.detailed else []) + HEADERS[BAR_COLUMN:]


def summary_line(profile: GradientProfile, findings: list[Finding]) -> str:
    shown = ratio_text(profile.ratio)
    first = profile.first.name if profile.first else "-"
    last = profile.last.name if profile.last else "-"
    return f"{profile.model}: first/last ratio {shown} ({first} / {last}), verdict: {verdict(findings)}"


def finding_lines(finding: Finding) -> list[str]:
    """The lines under a table for one finding."""
    marker = "FAIL" if finding.failing else "note"
    return [f"  {marker} {finding.rule}: {finding.message}"] + cause_lines(finding)


def cause_lines(finding: Finding) -> list[str]:
    """The finding's best-ranked cause and its fix (pytest_gradcheck.diagnosis), one line each."""
    if not finding.causes:
        return []
    cause = finding.causes[0]
    lines = [f"    cause: {cause.get('summary') or cause.get('cause')}"]
    return lines + ([f"    fix: {cause['fix']}"] if cause.get("fix") else [])


def render_table(
    profile: GradientProfile,
    findings: list[Finding],
    title: str | None = None,
    max_rows: int | None = None,
    failing_shown_above: bool = False,
) -> str:
    """The per-layer table with a heading line and the findings below it.

    With ``max_rows`` the table keeps at most that many layers (see :func:`shown_rows`)
    and says how many it left out.
    """
    lines = []
    if title:
        lines.append(title)
    lines.append(summary_line(profile, findings))
    indices = shown_rows(profile, findings, max_rows)
    rows = layer_rows(profile, findings, indices)
    lines.append(tabulate(rows, headers=table_headers(profile), tablefmt="simple", disable_numparse=True))
    hidden = len(profile.layers) - len(indices)
    if hidden:
        lines.append(
            f"  ... {hidden} of {len(profile.layers)} layers left out (grad_report_max_rows = {max_rows}; "
            "0 shows all); the report files hold every layer"
        )
    for finding in findings:
        if not (failing_shown_above and finding.failing):
            lines += finding_lines(finding)
    return "\n".join(lines)


def render_failure(profile: GradientProfile, findings: list[Finding], max_rows: int | None = None) -> str:
    """The GradientHealthError message: each failing rule with its numbers, then the table."""
    bad = failing(findings)
    head = [f"gradient health check failed for {profile.model}:"]
    for finding in bad:
        head += [f"  {finding.rule}: {finding.message}"] + cause_lines(finding)
    table = render_table(profile, findings, max_rows=max_rows, failing_shown_above=True)
    return "\n".join(head) + "\n\n" + table


def render_session(results: list[CheckResult], max_rows: int | None = None) -> str:
    """Every probed model of the session, one table each."""
    return "\n\n".join(render_table(r.profile, r.findings, title=r.title, max_rows=max_rows) for r in results)


def ratio_text(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3g}"


def junit_properties(result: CheckResult) -> list[tuple[str, str]]:
    """The ``(name, value)`` pairs a probed test records in the JUnit XML."""
    ratio = result.profile.ratio
    return [("grad_ratio", "n/a" if ratio is None else f"{ratio:.6g}"), ("grad_verdict", result.verdict)]


def _md_cell(text: str) -> str:
    # A bare '|' would end the cell, even inside a code span.
    return text.replace("|", "\\|")


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    cells = [[_md_cell(cell) for cell in row] for row in rows]
    return tabulate(cells, headers=[_md_cell(h) for h in headers], tablefmt="github", disable_numparse=True)


def markdown_section(result: CheckResult) -> list[str]:
    """One probed model as a collapsible block: every layer, the bounds, the findings."""
    profile, findings = result.profile, result.findings
    rows = layer_rows(profile, findings)
    for row in rows:
        row[1] = f"`{row[1]}`"
        row[BAR_COLUMN] = f"`{row[BAR_COLUMN]}`" if row[BAR_COLUMN] else ""
    summary = (
        f"<code>{html.escape(result.title)}</code>: {html.escape(profile.model)}, "
        f"ratio {ratio_text(profile.ratio)}, <b>{result.verdict}</b>"
    )
    lines = ["<details open>" if failing(findings) else "<details>", f"<summary>{summary}</summary>", ""]
    lines.append(f"{summary_line(profile, findings)}  ")
    lines.append(f"bounds: {result.bounds.describe()}")
    lines += ["", _md_table(table_headers(profile), rows), ""]
    for finding in findings:
        lines += ["- " + line.strip() for line in finding_lines(finding)]
    return lines + ["", "</details>", ""]


def render_markdown(results: list[CheckResult]) -> str:
    """A Markdown report for a CI job summary: an overview table, then every layer of every model."""
    lines = ["## Gradient report", ""]
    if not results:
        return "\n".join(lines + ["No test probed a model.", ""])
    overview = [[f"`{r.title}`", r.profile.model, ratio_text(r.profile.ratio), r.verdict] for r in results]
    lines += [_md_table(["test", "model", "first/last ratio", "verdict"], overview), ""]
    for result in results:
        lines += markdown_section(result)
    return "\n".join(lines)


def json_document(results: list[CheckResult]) -> dict[str, Any]:
    """The --grad-report-json document: every probed model with profile, bounds and findings."""
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": f"pytest-gradcheck {__version__}",
        "results": [strict_json(result.to_dict()) for result in results],
    }


def render_json(results: list[CheckResult]) -> str:
    return json.dumps(json_document(results), indent=2, allow_nan=False) + "\n"


BASELINE_HEADERS = ["layer", "kind", "baseline", "now", "factor", ""]


def _factor_text(factor: float | None) -> str:
    return "-" if factor is None else f"{factor:.3g}x"


def _baseline_marker(delta) -> str:
    if delta.status == "moved":
        return "<< out of tolerance"
    if delta.status == "renamed":
        return f"<< renamed from {delta.renamed_from}"
    if delta.status in ("added", "removed"):
        return f"<< {delta.status}"
    return ""


def render_baseline_diff(comparison) -> str:
    """The baseline diff table of a BaselineComparison: layer, baseline, now, factor, marker."""
    rows = [
        [
            delta.name or "(root)",
            delta.kind,
            _number(delta.baseline),
            _number(delta.now),
            _factor_text(delta.factor),
            _baseline_marker(delta),
        ]
        for delta in comparison.layers
    ]
    rows.append(
        [
            "first/last ratio",
            "",
            ratio_text(comparison.baseline_ratio),
            ratio_text(comparison.ratio),
            _factor_text(comparison.ratio_factor),
            "<< out of tolerance" if comparison.ratio_moved else "",
        ]
    )
    head = f"{comparison.model}: mean |grad| per layer against the baseline (tolerance {comparison.tolerance:g}x either way)"
    return head + "\n" + tabulate(rows, headers=BASELINE_HEADERS, tablefmt="simple", disable_numparse=True)


def render_baseline_failure(comparison, path: str, rerun: str) -> str:
    """The GradientHealthError message of a failed baseline comparison, ending with the next step."""
    lines = [f"gradient baseline check failed for {comparison.model} against {path}:"]
    lines += [f"  {problem}" for problem in comparison.problems()]
    lines += ["", render_baseline_diff(comparison), ""]
    lines.append(f"If the change is intended, refresh the baseline: {rerun}")
    return "\n".join(lines)


def render_baseline_summary(counts: dict[str, int], unused: list[str], pruned: bool) -> list[str]:
    """Session-end lines: baselines created, updated, compared and failed, then unused files."""
    lines = [", ".join(f"{counts.get(action, 0)} {action}" for action in ("created", "updated", "compared", "failed"))]
    if unused:
        what = "deleted (--grad-baseline-prune)" if pruned else "unused (delete them with --grad-baseline-prune)"
        lines.append(f"{len(unused)} baseline file(s) {what}:")
        lines += [f"  {path}" for path in unused]
    return lines
