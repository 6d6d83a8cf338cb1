"""The pytest plugin: options, ini, marker, fixture, report transport and session summary.

Thin glue only: probing, checking and rendering live in their own modules, and
torch is imported only when a test calls the fixture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pytest_gradcheck import bounds as bounds_mod
from pytest_gradcheck.bounds import BOUND_OPTIONS
from pytest_gradcheck.baseline_session import BaselineSession, baseline_settings, check_baseline, split_marker_kwargs

if TYPE_CHECKING:
    from pytest_gradcheck.checks import CheckResult

SESSION_KEY = pytest.StashKey["GradcheckSession"]()
PENDING_KEY = pytest.StashKey[list]()
MARKER = "gradient_health"
DEFAULT_MAX_ROWS = 40

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradient health checks (pytest-gradcheck)")
    group.addoption(
        "--grad-report",
        action="store_true",
        dest="grad_report",
        default=False,
        help="print a per-layer gradient table for every model probed by gradient_health",
    )
    for name, flag, text in BOUND_OPTIONS:
        group.addoption(flag, dest=f"grad_{name}", default=None, metavar="VALUE", help=text)
        parser.addini(f"grad_{name}", text, type="string", default="")
    group.addoption(
        "--grad-plot",
        dest="grad_plot",
        default=None,
        metavar="DIR",
        help="write a gradient-flow chart (PNG) per probed model to DIR, named from the test's node id; needs matplotlib",
    )
    group.addoption(
        "--grad-report-json",
        dest="grad_report_json",
        default=None,
        metavar="PATH",
        help="write every probed model (profile, bounds, findings) to PATH as JSON at session end",
    )
    group.addoption(
        "--grad-report-md",
        dest="grad_report_md",
        default=None,
        metavar="PATH",
        help="write the gradient report to PATH as Markdown (e.g. for a CI job summary) at session end",
    )
    group.addoption(
        "--grad-baseline-update",
        action="store_true",
        dest="grad_baseline_update",
        default=False,
        help="write missing gradient baselines and refresh existing ones (bounds still apply)",
    )
    group.addoption(
        "--grad-baseline-prune",
        action="store_true",
        dest="grad_baseline_prune",
        default=False,
        help="delete baseline files that no test of a fully run module used",
    )
    parser.addini("grad_baseline", "compare every gradient_health call with its baseline file", type="bool", default=False)
    parser.addini(
        "grad_baseline_tolerance",
        "factor a layer's mean |grad| may move from its baseline, either way (default 2.0)",
        type="string",
        default="2.0",
    )
    parser.addini(
        "grad_report_max_rows",
        f"most layer rows per table in the terminal report (default {DEFAULT_MAX_ROWS}; 0 shows all)",
        type="string",
        default="",
    )


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_gradcheck import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(min_ratio=None, max_ratio=None, max_grad=None, fail_on_unused=False, dead_relu=None, "
        "saturation=None, baseline=None, tolerance=None): "
        "bounds and baseline settings for the gradient_health fixture in this test (pytest-gradcheck)",
    )
    # A typo in pyproject.toml or on the command line stops the run at once, naming
    # the setting, instead of failing every test that uses the fixture.
    ini_layer, cli_layer = session_bounds(config)
    for where, layer in ((lambda name: f"ini option grad_{name}", ini_layer), (_flag_of, cli_layer)):
        for name, value in layer.items():
            try:
                bounds_mod.parse_bound(name, value)
            except ValueError as error:
                raise pytest.UsageError(f"{where(name)}: {error}") from None
    try:
        bounds_mod.resolve(ini_layer, cli_layer)
    except ValueError as error:  # each fine alone, contradictory together (min above max)
        raise pytest.UsageError(str(error)) from None
    session = GradcheckSession(config)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, "gradcheck-session")
    config.pluginmanager.register(BaselineSession(config), "gradcheck-baselines")
    # The controller draws from the results it receives, so under xdist workers never
    # race for a file and a plain run takes the same path.
    if config.getoption("grad_plot") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(GradPlotWriter(config), "gradcheck-plot-writer")


def _flag_of(name: str) -> str:
    return next(flag for bound, flag, _ in BOUND_OPTIONS if bound == name)


def session_bounds(config: pytest.Config) -> tuple[dict, dict]:
    """The ini and command-line layers of the bounds, holding only what was set."""
    ini_layer, cli_layer = {}, {}
    for name, _, _ in BOUND_OPTIONS:
        ini_value = config.getini(f"grad_{name}")
        if ini_value != "":
            ini_layer[name] = ini_value
        cli_value = config.getoption(f"grad_{name}")
        if cli_value is not None:
            cli_layer[name] = cli_value
    return ini_layer, cli_layer


def plugin_in_use(config: pytest.Config) -> bool:
    """Whether the run asks anything of the plugin: a --grad-* option or a grad_* ini key."""
    # Every --grad-* option defaults to None or False, so any other value was given by the user.
    given = [
        value
        for dest, value in vars(config.option).items()
        if dest.startswith("grad_") and value is not None and value is not False and value != []
    ]
    ini_names = [f"grad_{name}" for name, _, _ in BOUND_OPTIONS] + ["grad_report_max_rows"]
    return bool(given) or any(config.getini(name) != "" for name in ini_names)


def pytest_report_header(config: pytest.Config) -> str | None:
    if not plugin_in_use(config):
        return None
    return f"gradcheck: {bounds_mod.resolve(*session_bounds(config)).describe()}"


@pytest.fixture
def gradient_health(request: pytest.FixtureRequest):
    """Probe a model, check its gradients, and fail the test when they are unhealthy.

    Call it as ``gradient_health(model, inputs=None, *, loss_fn=None, seed=0,
    name=None, baseline=None, tolerance=None, **bounds)``; it returns the GradientProfile.
    """
    config = request.config
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None and marker.args:
        raise TypeError(
            f"@pytest.mark.{MARKER} takes keyword arguments only, e.g. "
            f"@pytest.mark.{MARKER}(min_ratio=0.01); got positional {marker.args!r}"
        )
    marker_layer, marker_baseline = split_marker_kwargs(dict(marker.kwargs) if marker else {})
    ini_layer, cli_layer = session_bounds(config)

    def gradient_health(
        model, inputs=None, *, loss_fn=None, seed=0, name=None, baseline=None, tolerance=None, **overrides
    ):
        __tracebackhide__ = True
        # Imported here, not at plugin load: every pytest run in the environment loads the plugin.
        from pytest_gradcheck.checks import CheckResult, failing
        from pytest_gradcheck.errors import GradientHealthError
        from pytest_gradcheck.health import assess
        from pytest_gradcheck.report import junit_properties, render_failure

        item = request.node
        bounds = bounds_mod.resolve(ini_layer, cli_layer, marker_layer, overrides)
        use_baseline, factor = baseline_settings(config, marker_baseline, baseline, tolerance)
        if inputs is None:
            # item.ihook, not config.hook: a conftest.py answers for its own directory only.
            inputs = item.ihook.pytest_gradcheck_make_inputs(model=model)
        session = config.stash[SESSION_KEY]
        profile, findings = assess(
            model, inputs, bounds=bounds, loss_fn=loss_fn, seed=seed, detail=session.detail
        )
        item.ihook.pytest_gradcheck_profile(item=item, profile=profile)
        result = CheckResult(item.nodeid, name, profile, bounds, findings)
        item.stash.setdefault(PENDING_KEY, []).append(result)
        item.user_properties.extend(junit_properties(result))
        if failing(findings):
            raise GradientHealthError(render_failure(profile, findings, session.max_rows), profile, findings)
        if use_baseline:
            check_baseline(request, profile, name, factor)
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


# Plain data the plugin attaches to test reports: results, and the baseline session's
# file events and module facts. pytest-xdist carries them from workers to the controller.
REPORT_KEYS = ("gradcheck", "gradcheck_baselines", "gradcheck_module")


@pytest.hookimpl(wrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report):
    data = yield
    if data is not None:
        for key in REPORT_KEYS:
            if getattr(report, key, None):
                data[key] = getattr(report, key)
    return data


@pytest.hookimpl(wrapper=True)
def pytest_report_from_serializable(config: pytest.Config, data):
    report = yield
    if report is not None:
        for key in REPORT_KEYS:
            if key in data:
                setattr(report, key, data[key])
    return report


class GradcheckSession:
    """Session-wide state, registered as a plugin: collects results, prints the report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[CheckResult] = []
        self.max_rows = report_max_rows(config)
        # Collection position of each test: results are reported in this order, which
        # is the same whether the tests ran serially or on pytest-xdist workers.
        self.positions: dict[str, int] = {}
        self.report_files = [
            (config.invocation_params.dir / path, kind)
            for kind in ("json", "md")
            if (path := config.getoption(f"grad_report_{kind}"))
        ]
        self.file_lines: list[tuple[str, bool]] = []
        # The report table and the charts show more than mean |grad|; a run without
        # them probes with the single L1 norm per gradient that the checks need.
        self.detail = bool(config.getoption("grad_report") or self.report_files or config.getoption("grad_plot"))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._remember_positions(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        # The xdist controller collects nothing itself; every worker sends the same ids.
        self._remember_positions(ids)

    def _remember_positions(self, nodeids) -> None:
        if not self.positions:
            self.positions = {nodeid: position for position, nodeid in enumerate(nodeids)}

    def pytest_runtest_logreport(self, report) -> None:
        # Runs in the controller under xdist and in-process otherwise: one path for both.
        records = getattr(report, "gradcheck", None)
        if records:
            from pytest_gradcheck.checks import CheckResult

            self.results.extend(CheckResult.from_dict(record) for record in records)

    def ordered_results(self) -> list[CheckResult]:
        """The results in collection order; a stable sort keeps each test's probes in call order."""
        unknown = len(self.positions)
        return sorted(self.results, key=lambda result: (self.positions.get(result.nodeid, unknown), result.nodeid))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Only the process that saw every report writes: the xdist controller, or the only process.
        if hasattr(self.config, "workerinput") or not self.report_files:
            return
        from pytest_gradcheck.files import write_atomically
        from pytest_gradcheck.report import render_json, render_markdown

        results = self.ordered_results()
        for path, kind in self.report_files:
            text = render_json(results) if kind == "json" else render_markdown(results)
            try:
                write_atomically(path, text)
            except OSError as error:
                self.file_lines.append((f"gradcheck: could not write --grad-report-{kind} {path}: {error}", True))
            else:
                label = "JSON" if kind == "json" else "Markdown"
                self.file_lines.append((f"gradcheck: wrote the {label} gradient report to {path}", False))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.config.getoption("grad_report") and self.results:
            from pytest_gradcheck.report import render_session

            terminalreporter.write_sep("=", "gradient report")
            terminalreporter.write_line(render_session(self.ordered_results(), self.max_rows))
        for line, is_error in self.file_lines:
            terminalreporter.write_line(line, red=is_error)


def report_max_rows(config: pytest.Config) -> int:
    """The grad_report_max_rows ini value, checked: a whole number, 0 meaning every layer."""
    raw = config.getini("grad_report_max_rows").strip()
    if raw == "":
        return DEFAULT_MAX_ROWS
    if not raw.isdigit():
        raise pytest.UsageError(
            f"gradcheck: grad_report_max_rows must be a whole number of rows (0 shows every layer), got {raw!r}"
        )
    return int(raw)


class GradPlotWriter:
    """--grad-plot: one gradient-flow chart per probed model, drawn from the reported results."""

    def __init__(self, config: pytest.Config) -> None:
        from pytest_gradcheck.plot import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailable as error:
            raise pytest.UsageError(f"--grad-plot: {error}") from None
        self.directory = config.invocation_params.dir / config.getoption("grad_plot")
        if self.directory.exists() and not self.directory.is_dir():
            raise pytest.UsageError(f"--grad-plot: {self.directory} exists and is not a folder; name a folder")
        self.written: list = []
        self.errors: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        records = getattr(report, "gradcheck", None)
        if records:
            from pytest_gradcheck.checks import CheckResult
            from pytest_gradcheck.plot import save_result_plots

            try:
                self.written += save_result_plots([CheckResult.from_dict(r) for r in records], self.directory)
            except OSError as error:  # a full disk or a read-only folder costs the charts, not the run
                self.errors.append(f"gradcheck: could not write a gradient-flow plot to {self.directory}: {error}")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.written:
            terminalreporter.write_line(f"gradcheck: wrote {len(self.written)} gradient-flow plot(s) to {self.directory}")
        for line in dict.fromkeys(self.errors):
            terminalreporter.write_line(line, red=True)
