"""The pytest plugin (entry point ``pytest11: gradcheck``): thin glue between pytest and the engine.

Each role has its module: ``options`` (command line, ini, marker, settings), ``fixture``
(``gradient_health``), ``transport`` (report data for pytest-xdist), ``session`` (the
report at the end), ``baselines`` (baseline files), ``plots`` (--grad-plot) and
``hookspecs`` (the plugin's own hooks). Loading it never imports torch.
"""

from __future__ import annotations

import pytest

from pytest_gradcheck.plugin.baselines import BaselineSession
from pytest_gradcheck.plugin.fixture import gradient_health
from pytest_gradcheck.plugin.options import (
    MARKER_HELP,
    SETTINGS_KEY,
    pytest_addhooks,
    pytest_addoption,
    pytest_report_header,
    read_settings,
)
from pytest_gradcheck.plugin.session import GradcheckSession
from pytest_gradcheck.plugin.transport import (
    pytest_report_from_serializable,
    pytest_report_to_serializable,
    pytest_runtest_makereport,
)

__all__ = [
    "gradient_health",
    "pytest_addhooks",
    "pytest_addoption",
    "pytest_configure",
    "pytest_report_from_serializable",
    "pytest_report_header",
    "pytest_report_to_serializable",
    "pytest_runtest_makereport",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    settings = read_settings(config)
    config.stash[SETTINGS_KEY] = settings
    config.pluginmanager.register(GradcheckSession(config, settings), "gradcheck-session")
    config.pluginmanager.register(BaselineSession(config, settings), "gradcheck-baselines")
    # The controller draws from the results it receives, so under xdist workers never
    # race for a file and a plain run takes the same path.
    if settings.plot_dir is not None and not hasattr(config, "workerinput"):
        from pytest_gradcheck.plugin.plots import GradPlotWriter

        config.pluginmanager.register(GradPlotWriter(settings.plot_dir), "gradcheck-plot-writer")
