"""The session's results: collected from every test report, printed at the end, written to report files."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gradcheck.core.findings import failing
from pytest_gradcheck.plugin import transport
from pytest_gradcheck.plugin.options import Settings

if TYPE_CHECKING:
    from pytest_gradcheck.core.findings import CheckResult


class GradcheckSession:
    """Registered as a plugin: collects every probed model's result and reports them at the end."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.results: list[CheckResult] = []
        # Collection position of each test: results are reported in this order, which
        # is the same whether the tests ran serially or on pytest-xdist workers.
        self.positions: dict[str, int] = {}
        self.file_lines: list[tuple[str, bool]] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._remember_positions(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        # The xdist controller collects nothing itself; every worker sends the same ids.
        self._remember_positions(ids)

    def _remember_positions(self, nodeids: Any) -> None:
        if not self.positions:
            self.positions = {nodeid: position for position, nodeid in enumerate(nodeids)}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Runs in the controller under xdist and in-process otherwise: one path for both.
        data = transport.read(report)
        if data is not None:
            # A failing verdict the test expected is marked so in the reports: the test is marked
            # xfail and failed, or it passed, having caught the failure (pytest.raises).
            expected = report.passed or (bool(getattr(report, "wasxfail", None)) and report.skipped)
            self.results.extend(
                dataclasses.replace(r, expected_failure=expected and bool(failing(r.findings))) for r in data.results
            )

    def ordered_results(self) -> list[CheckResult]:
        """The results in collection order; a stable sort keeps each test's probes in call order."""
        unknown = len(self.positions)
        return sorted(self.results, key=lambda result: (self.positions.get(result.nodeid, unknown), result.nodeid))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Only the process that saw every report writes: the xdist controller, or the only process.
        if hasattr(self.config, "workerinput") or not self.settings.report_files:
            return
        from pytest_gradcheck.core.files import write_atomically
        from pytest_gradcheck.report.json_report import render_json
        from pytest_gradcheck.report.markdown import render_markdown

        results = self.ordered_results()
        for path, kind in self.settings.report_files:
            text = render_json(results) if kind == "json" else render_markdown(results)
            try:
                write_atomically(path, text)
            except OSError as error:
                self.file_lines.append((f"gradcheck: could not write --grad-report-{kind} {path}: {error}", True))
            else:
                label = "JSON" if kind == "json" else "Markdown"
                self.file_lines.append((f"gradcheck: wrote the {label} gradient report to {path}", False))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.settings.report and self.results:
            from pytest_gradcheck.report.table import render_session

            terminalreporter.write_sep("=", "gradient report")
            terminalreporter.write_line(render_session(self.ordered_results(), self.settings.max_rows))
        for line, is_error in self.file_lines:
            terminalreporter.write_line(line, red=is_error)
