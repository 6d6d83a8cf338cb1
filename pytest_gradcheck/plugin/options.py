"""The plugin's settings: command-line options, ini keys and the marker, read and checked once at startup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_gradcheck.core import bounds as bounds_mod
from pytest_gradcheck.core.baseline import DEFAULT_TOLERANCE, parse_tolerance
from pytest_gradcheck.core.bounds import BOUND_OPTIONS
from pytest_gradcheck.errors import SettingError

MARKER = "gradient_health"
MARKER_HELP = (
    f"{MARKER}(min_ratio=None, max_ratio=None, max_grad=None, fail_on_unused=False, dead_relu=None, "
    "saturation=None, baseline=None, tolerance=None): "
    "bounds and baseline settings for the gradient_health fixture in this test (pytest-gradcheck)"
)
DEFAULT_MAX_ROWS = 40
# The marker's keywords that are baseline settings rather than bounds.
BASELINE_KEYWORDS = ("baseline", "tolerance")


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
        help="write a gradient-flow chart (PNG) per probed model to DIR, named from the test's node id; "
        "needs matplotlib",
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
    parser.addini("grad_baseline", "compare every gradient_health call with its baseline file (true/false)", default="")
    parser.addini(
        "grad_baseline_tolerance",
        f"factor a layer's mean |grad| may move from its baseline, either way (default {DEFAULT_TOLERANCE:g})",
        type="string",
        default="",
    )
    parser.addini(
        "grad_report_max_rows",
        f"most layer rows per table in the terminal report (default {DEFAULT_MAX_ROWS}; 0 shows all)",
        type="string",
        default="",
    )


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_gradcheck.plugin import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


@dataclass(frozen=True)
class Settings:
    """Everything the run asks of the plugin, read from the command line and ini once."""

    ini_bounds: dict[str, str]
    cli_bounds: dict[str, str]
    baseline: bool
    tolerance: float
    max_rows: int
    report: bool
    report_files: tuple[tuple[Path, str], ...]
    plot_dir: Path | None
    update_baselines: bool
    prune_baselines: bool

    @property
    def detail(self) -> bool:
        """The report table and the charts show more than mean |grad|; other runs probe with one L1 norm."""
        return bool(self.report or self.report_files or self.plot_dir)


SETTINGS_KEY = pytest.StashKey[Settings]()


def read_settings(config: pytest.Config) -> Settings:
    """The run's settings; a bad value stops the run at once with a usage error that names the setting.

    A typo in pyproject.toml or on the command line then costs one line, instead of
    failing every test that uses the fixture.
    """
    ini_bounds, cli_bounds = _bound_layers(config)
    for describe, layer in ((_ini_key, ini_bounds), (_flag, cli_bounds)):
        for name, value in layer.items():
            _checked(describe(name), bounds_mod.parse_bound, name, value)
    _checked("the bounds", bounds_mod.resolve, ini_bounds, cli_bounds)  # each fine alone, contradictory together
    invocation = config.invocation_params.dir
    plot = config.getoption("grad_plot")
    return Settings(
        ini_bounds=ini_bounds,
        cli_bounds=cli_bounds,
        baseline=_checked(
            "ini option grad_baseline", bounds_mod.parse_switch, "grad_baseline", _ini(config, "grad_baseline")
        ),
        tolerance=_checked(
            "ini option grad_baseline_tolerance",
            parse_tolerance,
            _ini(config, "grad_baseline_tolerance") or DEFAULT_TOLERANCE,
        ),
        max_rows=_max_rows(_ini(config, "grad_report_max_rows")),
        report=bool(config.getoption("grad_report")),
        report_files=tuple(
            (invocation / path, kind) for kind in ("json", "md") if (path := config.getoption(f"grad_report_{kind}"))
        ),
        plot_dir=invocation / plot if plot else None,
        update_baselines=bool(config.getoption("grad_baseline_update")),
        prune_baselines=bool(config.getoption("grad_baseline_prune")),
    )


def _checked(where: str, parse: Any, *args: Any) -> Any:
    try:
        return parse(*args)
    except SettingError as error:
        raise pytest.UsageError(f"gradcheck: {where}: {error}") from None


def _ini(config: pytest.Config, name: str) -> str:
    value = config.getini(name)
    return value.strip() if isinstance(value, str) else str(value)


def _ini_key(name: str) -> str:
    return f"ini option grad_{name}"


def _flag(name: str) -> str:
    return next(flag for bound, flag, _ in BOUND_OPTIONS if bound == name)


def _bound_layers(config: pytest.Config) -> tuple[dict[str, str], dict[str, str]]:
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


def _max_rows(raw: str) -> int:
    """grad_report_max_rows: a whole number, 0 meaning every layer."""
    if raw == "":
        return DEFAULT_MAX_ROWS
    if not raw.isdigit():
        raise pytest.UsageError(
            f"gradcheck: grad_report_max_rows must be a whole number of rows (0 shows every layer), got {raw!r}"
        )
    return int(raw)


def marker_settings(node: pytest.Item) -> tuple[dict[str, Any], dict[str, Any]]:
    """(bounds, baseline settings) from the closest ``gradient_health`` marker of ``node``."""
    marker = node.get_closest_marker(MARKER)
    if marker is None:
        return {}, {}
    if marker.args:
        raise TypeError(
            f"@pytest.mark.{MARKER} takes keyword arguments only, e.g. "
            f"@pytest.mark.{MARKER}(min_ratio=0.01); got positional {marker.args!r}"
        )
    bounds = {key: value for key, value in marker.kwargs.items() if key not in BASELINE_KEYWORDS}
    baseline = {key: value for key, value in marker.kwargs.items() if key in BASELINE_KEYWORDS}
    return bounds, baseline


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
    settings = config.stash[SETTINGS_KEY]
    return f"gradcheck: {bounds_mod.resolve(settings.ini_bounds, settings.cli_bounds).describe()}"
