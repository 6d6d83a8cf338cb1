"""Baseline comparisons as text: what moved, the per-layer diff table, and the session's counts."""

from __future__ import annotations

from tabulate import tabulate

from pytest_gradcheck.core.baseline import BaselineComparison, LayerDelta
from pytest_gradcheck.report.format import factor_text, number, ratio_text

BASELINE_HEADERS = ["layer", "kind", "baseline", "now", "factor", ""]
_LOSSES = {
    "sum": "the sum of the outputs (the default loss of earlier versions)",
    "random": "the default random-direction loss",
    "loss_fn": "the test's loss_fn",
    "model": "the model's own loss",
}


def problem_lines(comparison: BaselineComparison) -> list[str]:
    """One line per reason the comparison fails, with the numbers; empty when it passes."""
    lines = []
    if comparison.model_changed:
        lines.append(
            f"the model changed: the baseline was recorded from {comparison.baseline_model}, "
            f"this run probed {comparison.model}"
        )
    if comparison.loss_changed:
        before, now = (_LOSSES.get(kind or "", kind) for kind in (comparison.baseline_loss_kind, comparison.loss_kind))
        lines.append(
            f"the loss changed: the baseline's gradients come from {before}, this run's from {now}, "
            "so no layer compares; record the baseline again (--grad-baseline-update)"
        )
        return lines
    if comparison.moved:
        shown = ", ".join(f"{d.name or '(root)'} {factor_text(d.factor)}" for d in comparison.moved)
        lines.append(f"mean |grad| moved beyond {comparison.tolerance:g}x in {len(comparison.moved)} layer(s): {shown}")
    if comparison.ratio_moved:
        lines.append(
            f"first/last ratio moved {factor_text(comparison.ratio_factor)} "
            f"(baseline {ratio_text(comparison.baseline_ratio)}, now {ratio_text(comparison.ratio)}), "
            f"beyond {comparison.tolerance:g}x"
        )
    if comparison.added:
        lines.append("layers added: " + ", ".join(comparison.added))
    if comparison.removed:
        lines.append("layers removed: " + ", ".join(comparison.removed))
    if comparison.renamed:
        lines.append("layers renamed: " + ", ".join(f"{old} -> {new}" for old, new in comparison.renamed))
    return lines


def _marker(delta: LayerDelta) -> str:
    if delta.status == "moved":
        return "<< out of tolerance"
    if delta.status == "renamed":
        return f"<< renamed from {delta.renamed_from}"
    if delta.status in ("added", "removed"):
        return f"<< {delta.status}"
    return ""


def render_baseline_diff(comparison: BaselineComparison) -> str:
    """The baseline diff table: layer, baseline, now, factor, marker, and the first/last ratio last."""
    rows = [
        [
            delta.name or "(root)",
            delta.kind,
            number(delta.baseline),
            number(delta.now),
            factor_text(delta.factor),
            _marker(delta),
        ]
        for delta in comparison.layers
    ]
    rows.append(
        [
            "first/last ratio",
            "",
            ratio_text(comparison.baseline_ratio),
            ratio_text(comparison.ratio),
            factor_text(comparison.ratio_factor),
            "<< out of tolerance" if comparison.ratio_moved else "",
        ]
    )
    head = (
        f"{comparison.model}: mean |grad| per layer against the baseline "
        f"(tolerance {comparison.tolerance:g}x either way)"
    )
    return head + "\n" + tabulate(rows, headers=BASELINE_HEADERS, tablefmt="simple", disable_numparse=True)


def render_baseline_check(comparison: BaselineComparison, headline: str, next_step: str | None = None) -> str:
    """``headline``, the reasons the comparison fails, the diff table, and the user's next step."""
    lines = [headline, *(f"  {problem}" for problem in problem_lines(comparison)), "", render_baseline_diff(comparison)]
    if next_step:
        lines += ["", next_step]
    return "\n".join(lines)


def render_baseline_failure(comparison: BaselineComparison, path: str, rerun: str) -> str:
    """The GradientHealthError message of a failed baseline comparison, ending with the command to refresh it."""
    headline = f"gradient baseline check failed for {comparison.model} against {path}:"
    return render_baseline_check(comparison, headline, f"If the change is intended, refresh the baseline: {rerun}")


def render_baseline_summary(
    counts: dict[str, int], unused: list[str], pruned: bool, unclaimed: list[str] | None = None
) -> list[str]:
    """Session-end lines: baselines created, updated, compared and failed, then unused and unclaimed files."""
    actions = ("created", "updated", "compared", "failed")
    lines = [", ".join(f"{counts.get(action, 0)} {action}" for action in actions)]
    if unused:
        what = "deleted (--grad-baseline-prune)" if pruned else "unused (delete them with --grad-baseline-prune)"
        lines.append(f"{len(unused)} baseline file(s) {what}:")
        lines += [f"  {path}" for path in unused]
    if unclaimed:
        lines.append(
            f"{len(unclaimed)} baseline file(s) belong to no test collected in this run, and are kept "
            "(a test of another machine, or of a test since renamed: delete those by hand):"
        )
        lines += [f"  {path}" for path in unclaimed]
    return lines
