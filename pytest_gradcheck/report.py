"""Reports: render profiles and findings as text. They never decide anything."""

from __future__ import annotations

import math

from tabulate import tabulate

from pytest_gradcheck.checks import CheckResult, Finding, failing, verdict
from pytest_gradcheck.profile import GradientProfile, LayerStats

HEADERS = ["#", "layer", "kind", "params", "mean |grad|", "max |grad|", "grad norm", "weight norm", "zeros", "note"]


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


def layer_rows(profile: GradientProfile, findings: list[Finding]) -> list[list[str]]:
    rows = []
    for index, layer in enumerate(profile.layers):
        rows.append(
            [
                str(index),
                layer.name or "(root)",
                layer.kind,
                f"{layer.numel:,}",
                _number(layer.grad_mean_abs),
                _number(layer.grad_max_abs),
                _number(layer.grad_norm),
                _number(layer.weight_norm),
                f"{layer.zero_fraction:.0%}",
                layer_notes(profile, layer, findings),
            ]
        )
    return rows


def summary_line(profile: GradientProfile, findings: list[Finding]) -> str:
    ratio = profile.ratio
    shown = "n/a" if ratio is None else f"{ratio:.3g}"
    first = profile.first.name if profile.first else "-"
    last = profile.last.name if profile.last else "-"
    return f"{profile.model}: first/last ratio {shown} ({first} / {last}), verdict: {verdict(findings)}"


def render_table(profile: GradientProfile, findings: list[Finding], title: str | None = None) -> str:
    """The per-layer table with a heading line and the findings below it."""
    lines = []
    if title:
        lines.append(title)
    lines.append(summary_line(profile, findings))
    lines.append(tabulate(layer_rows(profile, findings), headers=HEADERS, tablefmt="simple", disable_numparse=True))
    for finding in findings:
        marker = "FAIL" if finding.failing else "note"
        lines.append(f"  {marker} {finding.rule}: {finding.message}")
    return "\n".join(lines)


def render_failure(profile: GradientProfile, findings: list[Finding]) -> str:
    """The GradientHealthError message: each failing rule with its numbers, then the table."""
    bad = failing(findings)
    head = [f"gradient health check failed for {profile.model}:"]
    head += [f"  {finding.rule}: {finding.message}" for finding in bad]
    return "\n".join(head) + "\n\n" + render_table(profile, findings)


def render_session(results: list[CheckResult]) -> str:
    """Every probed model of the session, one table each."""
    return "\n\n".join(render_table(r.profile, r.findings, title=r.title) for r in results)
