"""The Markdown report, for a CI job summary: an overview table, then every layer of every model."""

from __future__ import annotations

import html

from tabulate import tabulate

from pytest_gradcheck.core.findings import CheckResult, failing
from pytest_gradcheck.report.format import finding_lines, ratio_text, time_lines
from pytest_gradcheck.report.table import BAR_COLUMN, layer_rows, summary_line, table_headers


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
        f"ratio {ratio_text(profile.ratio)}, <b>{_verdict(result)}</b>"
    )
    unexpected = failing(findings) and not result.expected_failure
    lines = ["<details open>" if unexpected else "<details>", f"<summary>{summary}</summary>", ""]
    lines.append(f"{summary_line(profile, findings, result.expected_failure)}  ")
    lines.append(f"bounds: {result.bounds.describe()}")
    lines += ["", _md_table(table_headers(profile), rows), ""]
    lines += ["- " + line.strip() for line in time_lines(profile)]
    for finding in findings:
        shown = finding_lines(finding, profile.activations is not None, result.expected_failure)
        lines += ["- " + line.strip() for line in shown]
    return lines + ["", "</details>", ""]


def _verdict(result: CheckResult) -> str:
    return f"{result.verdict} (expected)" if result.expected_failure and failing(result.findings) else result.verdict


def render_markdown(results: list[CheckResult]) -> str:
    """A Markdown report for a CI job summary: an overview table, then every layer of every model."""
    lines = ["## Gradient report", ""]
    if not results:
        return "\n".join(lines + ["No test probed a model.", ""])
    overview = [[f"`{r.title}`", r.profile.model, ratio_text(r.profile.ratio), _verdict(r)] for r in results]
    lines += [_md_table(["test", "model", "first/last ratio", "verdict"], overview), ""]
    for result in results:
        lines += markdown_section(result)
    return "\n".join(lines)
