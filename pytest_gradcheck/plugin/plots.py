"""--grad-plot: one gradient-flow chart per probed model, drawn by the process that sees every report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_gradcheck.plugin import transport


class GradPlotWriter:
    """Registered as a plugin under --grad-plot: draws each reported result to ``directory``."""

    def __init__(self, directory: Path) -> None:
        from pytest_gradcheck.errors import PlotUnavailable
        from pytest_gradcheck.report.plot import require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailable as error:
            raise pytest.UsageError(f"--grad-plot: {error}") from None
        if directory.exists() and not directory.is_dir():
            raise pytest.UsageError(f"--grad-plot: {directory} exists and is not a folder; name a folder")
        self.directory = directory
        self.written: list[Path] = []
        self.errors: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = transport.read(report)
        if data is None or not data.results:
            return
        from pytest_gradcheck.report.plot import save_result_plots

        try:
            self.written += save_result_plots(data.results, self.directory)
        except OSError as error:  # a full disk or a read-only folder costs the charts, not the run
            self.errors.append(f"gradcheck: could not write a gradient-flow plot to {self.directory}: {error}")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.written:
            terminalreporter.write_line(
                f"gradcheck: wrote {len(self.written)} gradient-flow plot(s) to {self.directory}"
            )
        for line in dict.fromkeys(self.errors):
            terminalreporter.write_line(line, red=True)
