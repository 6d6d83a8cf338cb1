"""The pytest plugin: options, ini, marker, fixture, report transport and session summary.

Thin glue only: probing, checking and rendering live in their own modules, and
torch is imported only when a test calls the fixture.
"""

from __future__ import annotations

import pytest

from pytest_gradcheck import bounds as bounds_mod
from pytest_gradcheck.checks import CheckResult, failing
from pytest_gradcheck.errors import GradientHealthError
from pytest_gradcheck.health import assess

SESSION_KEY = pytest.StashKey["GradcheckSession"]()
PENDING_KEY = pytest.StashKey[list]()
MARKER = "gradient_health"

# Command-line options and ini keys for each bound: (bound, flag, help).
_BOUND_OPTIONS = (
    ("min_ratio", "--grad-min-ratio", "fail when first/last mean |grad| falls below this (or 'off')"),
    ("max_ratio", "--grad-max-ratio", "fail when first/last mean |grad| rises above this (or 'off')"),
    ("max_grad", "--grad-max-grad", "fail when any |grad| exceeds this absolute value (default: off)"),
    ("fail_on_unused", "--grad-fail-on-unused", "fail when trainable parameters get no gradient (true/false)"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradient health checks (pytest-gradcheck)")
    group.addoption(
        "--grad-report",
        action="store_true",
        dest="grad_report",
        default=False,
        help="print a per-layer gradient table for every model probed by gradient_health",
    )
    for name, flag, text in _BOUND_OPTIONS:
        group.addoption(flag, dest=f"grad_{name}", default=None, metavar="VALUE", help=text)
        parser.addini(f"grad_{name}", text, type="string", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(min_ratio=None, max_ratio=None, max_grad=None, fail_on_unused=False): "
        "bounds for the gradient_health fixture in this test (pytest-gradcheck)",
    )
    session = GradcheckSession(config)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, "gradcheck-session")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        config.pluginmanager.unregister(session)


def session_bounds(config: pytest.Config) -> tuple[dict, dict]:
    """The ini and command-line layers of the bounds, holding only what was set."""
    ini_layer, cli_layer = {}, {}
    for name, _, _ in _BOUND_OPTIONS:
        ini_value = config.getini(f"grad_{name}")
        if ini_value != "":
            ini_layer[name] = ini_value
        cli_value = config.getoption(f"grad_{name}")
        if cli_value is not None:
            cli_layer[name] = cli_value
    return ini_layer, cli_layer


@pytest.fixture
def gradient_health(request: pytest.FixtureRequest):
    """Probe a model, check its gradients, and fail the test when they are unhealthy.

    Call it as ``gradient_health(model, inputs=None, *, loss_fn=None, seed=0,
    name=None, **bounds)``; it returns the GradientProfile.
    """
    config = request.config
    marker = request.node.get_closest_marker(MARKER)
    marker_layer = dict(marker.kwargs) if marker else {}
    ini_layer, cli_layer = session_bounds(config)

    def gradient_health(model, inputs=None, *, loss_fn=None, seed=0, name=None, **overrides):
        __tracebackhide__ = True
        bounds = bounds_mod.resolve(ini_layer, cli_layer, marker_layer, overrides)
        profile, findings = assess(model, inputs, bounds=bounds, loss_fn=loss_fn, seed=seed)
        result = CheckResult(request.node.nodeid, name, profile, bounds, findings)
        request.node.stash.setdefault(PENDING_KEY, []).append(result)
        if failing(findings):
            from pytest_gradcheck.report import render_failure

            raise GradientHealthError(render_failure(profile, findings), profile, findings)
        return profile

    return gradient_health


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    pending = item.stash.get(PENDING_KEY, None)
    if pending:
        # Plain dicts ride on the test's own report, so pytest-xdist carries them
        # to the controller and a crashed worker loses only its own tests.
        report.gradcheck = [result.to_dict() for result in pending]
        pending.clear()
    return report


@pytest.hookimpl(wrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report):
    data = yield
    if data is not None and getattr(report, "gradcheck", None):
        data["gradcheck"] = report.gradcheck
    return data


@pytest.hookimpl(wrapper=True)
def pytest_report_from_serializable(config: pytest.Config, data):
    report = yield
    if report is not None and "gradcheck" in data:
        report.gradcheck = data["gradcheck"]
    return report


class GradcheckSession:
    """Session-wide state, registered as a plugin: collects results, prints the report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[CheckResult] = []

    def pytest_runtest_logreport(self, report) -> None:
        # Runs in the controller under xdist and in-process otherwise: one path for both.
        for record in getattr(report, "gradcheck", None) or ():
            self.results.append(CheckResult.from_dict(record))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.config.getoption("grad_report") or not self.results:
            return
        from pytest_gradcheck.report import render_session

        terminalreporter.write_sep("=", "gradient report")
        terminalreporter.write_line(render_session(self.results))
