"""The small pieces every report shares: numbers, ratios, notes, and the lines under a table."""

from __future__ import annotations

import math

from pytest_gradcheck.core.diagnosis import CAUSES, DIAGNOSED_RULES
from pytest_gradcheck.core.findings import CheckResult, Finding
from pytest_gradcheck.core.profile import GradientProfile, LayerStats


def number(value: float | None) -> str:
    """A statistic in a table cell: three significant digits in exponent form, '-' when not measured."""
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3e}"


def ratio_text(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3g}"


def factor_text(factor: float | None) -> str:
    return "-" if factor is None else f"{factor:.3g}x"


RATIO_RULES = ("vanishing", "exploding")


def layer_notes(profile: GradientProfile, layer: LayerStats, findings: list[Finding]) -> str:
    """Short flags for one row: the ratio's picks, findings that name it, sharing."""
    notes = []
    pair = [profile.first.name if profile.first else None, profile.last.name if profile.last else None]
    if profile.first is layer:
        notes.append("ratio: first")
    if profile.last is layer:
        notes.append("ratio: last")
    for finding in findings:
        # The ratio's own finding names its two picks: their note already says so.
        if finding.rule in RATIO_RULES and finding.layers == pair:
            continue
        if layer.name in finding.layers and finding.rule not in notes:
            notes.append(finding.rule)
    if not layer.executed:
        notes.append("not called")
    if layer.shared_with:
        notes.append("shared with " + ", ".join(layer.shared_with))
    return ", ".join(notes)


def finding_lines(finding: Finding, diagnosed: bool = False, expected_failure: bool = False) -> list[str]:
    """The lines under a table for one finding; failures the test expected read XFAIL."""
    marker = ("XFAIL" if expected_failure else "FAIL") if finding.failing else "note"
    return [f"  {marker} {finding.rule}: {finding.message}"] + cause_lines(finding, diagnosed)


def cause_lines(finding: Finding, diagnosed: bool = False) -> list[str]:
    """The finding's best-ranked cause and its fix, one line each.

    With ``diagnosed`` (the diagnosis ran) a failing finding of a rule the diagnosis
    explains, but no cause, says so, and what to try.
    """
    if not finding.causes:
        if diagnosed and finding.failing and finding.rule in DIAGNOSED_RULES:
            return [
                f"    cause: none of the known causes ({', '.join(CAUSES)}) explains it",
                "    try: if the model trains in practice, probe it with its real loss (loss_fn=...), or set a "
                "bound for it (@pytest.mark.gradient_health(...) or the keyword), and please report the model",
            ]
        return []
    cause = finding.causes[0]
    lines = [f"    cause: {cause.summary or cause.cause}"]
    return lines + ([f"    fix: {cause.fix}"] if cause.fix else [])


def time_lines(profile: GradientProfile) -> list[str]:
    """One line per recurrent layer followed through time: how the gradient changes back over its steps."""
    lines = []
    for steps in profile.time:
        ratio, per_step = steps.ratio, steps.per_step
        if ratio == 0.0:
            change = f"exactly 0: it underflows {steps.reached + 1} steps back"
        else:
            change = f"{ratio:.3g} of the latest step's" if ratio is not None else "not measurable"
        rate = f", {per_step:.3g}x per step back" if per_step else ""
        lines.append(
            f"  time: {steps.layer} ({steps.kind}, {len(steps.steps)} steps): the gradient at the earliest step "
            f"is {change}{rate}"
        )
    return lines


def junit_properties(result: CheckResult) -> list[tuple[str, str]]:
    """The ``(name, value)`` pairs a probed test records in the JUnit XML."""
    ratio = result.profile.ratio
    return [("grad_ratio", "n/a" if ratio is None else f"{ratio:.6g}"), ("grad_verdict", result.verdict)]
