"""Baselines in a pytest session: the fixture's check, files used, modules run in full, unused files."""

from __future__ import annotations

import contextlib
import os
import shlex
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gradcheck.core.baseline import baseline_dir, baseline_stem, parse_tolerance
from pytest_gradcheck.errors import BaselineFileError, GradientHealthError, SettingError
from pytest_gradcheck.plugin import transport
from pytest_gradcheck.plugin.options import Settings

if TYPE_CHECKING:
    from pytest_gradcheck.core.profile import GradientProfile


def baseline_settings(
    settings: Settings, marker: dict[str, Any], baseline: bool | None, tolerance: float | None
) -> tuple[bool, float]:
    """Whether the baseline check is on, and its tolerance: keyword, then marker, then ini."""
    if baseline is None:
        baseline = marker.get("baseline", settings.baseline)
    if tolerance is None:
        tolerance = marker.get("tolerance", settings.tolerance)
    return bool(baseline), parse_tolerance(tolerance)


def shown(config: pytest.Config, path: Path | str) -> str:
    """``path`` relative to the rootdir, as users see it in their tree."""
    try:
        return os.path.relpath(path, config.rootpath)
    except ValueError:  # another drive on Windows
        return str(path)


def check_baseline(
    request: pytest.FixtureRequest,
    settings: Settings,
    profile: GradientProfile,
    name: str | None,
    tolerance: float,
    seeded: bool = True,
) -> None:
    """Compare ``profile`` with the test's baseline file, or write it under --grad-baseline-update.

    ``seeded`` says whether the model was built under the probe's seed (from its class or a
    factory); a model built outside it may start from other weights in every run.
    """
    __tracebackhide__ = True
    from pytest_gradcheck.core import baseline as baseline_mod  # loaded only when a test uses a baseline

    config, node = request.config, request.node
    path = baseline_mod.baseline_path(node.path, node.nodeid, name)
    events = transport.baseline_events(node)
    if any(event["path"] == str(path) for event in events):
        raise SettingError(
            "name",
            f"two gradient_health calls in {node.nodeid} share the baseline file "
            f"{shown(config, path)}; give each call its own name=, e.g. gradient_health(model, name='encoder')",
        )
    # Recorded before anything can fail: a test that reached its baseline has used the file.
    event = {"path": str(path), "action": "failed"}
    events.append(event)
    if settings.update_baselines:
        action = "updated" if path.exists() else "created"
        baseline_mod.save_baseline(path, profile)
        event["action"] = action
        return
    if not path.exists():
        raise GradientHealthError(
            f"no gradient baseline for {profile.model} in {node.nodeid}: {shown(config, path)} does not exist. "
            f"Create it with: {_rerun(node.nodeid)} (then commit the file)",
            profile,
        )
    try:
        stored = baseline_mod.load_baseline(path)
    except BaselineFileError as error:
        raise BaselineFileError(shown(config, path), error.problem, error.hint) from None
    comparison = baseline_mod.compare_baseline(stored, profile, tolerance)
    if not comparison.passed:
        from pytest_gradcheck.report.baseline_text import render_baseline_failure

        text = render_baseline_failure(comparison, shown(config, path), _rerun(node.nodeid))
        if not seeded and comparison.moved:
            text += (
                f"\nnote: {profile.model} was built before the probe, so its initial weights come from whatever "
                "RNG state earlier code left, and may differ from run to run; pass the class or a zero-argument "
                f"factory instead, e.g. gradient_health({profile.model}), and the probe builds it under its seed"
            )
        raise GradientHealthError(text, profile)
    event["action"] = "compared"


def _rerun(nodeid: str) -> str:
    """The command that refreshes one test's baseline, quoted for a POSIX shell."""
    quoted = shlex.quote(nodeid)
    return f"pytest --grad-baseline-update {quoted if quoted != nodeid else repr(nodeid)}"


class BaselineSession:
    """Registered as a plugin: carries baseline use to the controller and finds unused files.

    A file is unused only when its module ran in full: every test the module defines
    was selected (no -k, -m, --deselect, --lf or node id left one out), it collected
    without error, and every test passed its call phase (a skipped, failed or erroring
    test may have stopped before it reached its baseline).
    """

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        # Collection side (the only process, or each xdist worker).
        self.baseline_dirs: dict[str, bool] = {}
        self.defined: dict[str, dict[str, set[str]]] = {}
        self.partial: set[str] = set()
        # Reporting side (the only process, or the xdist controller).
        self.counts: Counter[str] = Counter()
        self.used: set[str] = set()
        self.modules: dict[str, dict[str, Any]] = {}
        self.passed: dict[str, set[str]] = {}
        self.unused: list[Path] = []
        self.unclaimed: list[Path] = []

    # -- collection side --------------------------------------------------------

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Any:
        # Innermost wrapper: sees what a module defines before --lf or node-id
        # selection trims it, which is how a partial run is recognised.
        report = yield
        if isinstance(collector, (pytest.Session, pytest.Directory)) or not self._has_baselines(collector.path):
            return report
        defined = self.defined.setdefault(
            str(collector.path), {"items": set(), "collectors": set(), "collected": set()}
        )
        defined["collected"].add(collector.nodeid)
        if report.outcome != "passed":
            self.partial.add(str(collector.path))
        for child in report.result or ():
            defined["items" if isinstance(child, pytest.Item) else "collectors"].add(child.nodeid)
        return report

    def _has_baselines(self, module: Path) -> bool:
        key = str(module)
        if key not in self.baseline_dirs:
            self.baseline_dirs[key] = baseline_dir(module).is_dir()
        return self.baseline_dirs[key]

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        selected: dict[str, set[str]] = {}
        for item in session.items:
            selected.setdefault(str(item.path), set()).add(item.nodeid)
        facts: dict[str, dict[str, Any]] = {}
        for module, nodeids in selected.items():
            defined = self.defined.get(module)
            if defined is None:
                continue
            complete = (
                module not in self.partial
                and defined["items"] <= nodeids  # nothing deselected (-k, -m, --lf, node ids)
                and defined["collectors"] <= defined["collected"]  # no class left uncollected
            )
            facts[module] = {"path": module, "selected": len(nodeids), "complete": complete}
        for item in session.items:
            if str(item.path) in facts:
                transport.remember_module(item, facts[str(item.path)])

    # -- reporting side (the transport carries the events and facts under xdist) --------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = transport.read(report)
        if data is None:
            return
        for event in data.baseline_events:
            self.counts[event["action"]] += 1
            self.used.add(event["path"])
        module = data.module
        if module:
            seen = self.modules.setdefault(module["path"], dict(module))
            seen["complete"] = seen["complete"] and module["complete"]
            if report.passed:
                self.passed.setdefault(module["path"], set()).add(report.nodeid)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return  # a worker saw only its share of the tests; the controller decides
        for module, info in sorted(self.modules.items()):
            passed = self.passed.get(module, set())
            if not info["complete"] or len(passed) < info["selected"]:
                continue
            owners = {baseline_stem(nodeid, module_stem=Path(module).stem) for nodeid in passed}
            for path in sorted(baseline_dir(Path(module)).glob("*.json")):
                if str(path) in self.used:
                    continue
                # Unused only if a test that ran here owns it: a file of a test this environment did not
                # collect (a [cuda] case on a CPU machine, a test behind a skipif) is never touched.
                stem = path.name.removesuffix(".json")
                owned = stem in owners or any(stem.startswith(owner + ".") for owner in owners)
                (self.unused if owned else self.unclaimed).append(path)
        if self.settings.prune_baselines:
            for path in self.unused:
                path.unlink(missing_ok=True)
                for folder in (path.parent, path.parent.parent):
                    with contextlib.suppress(OSError):  # only empty folders go
                        folder.rmdir()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not (self.counts or self.unused or self.unclaimed):
            return
        from pytest_gradcheck.report.baseline_text import render_baseline_summary

        terminalreporter.write_sep("-", "gradient baselines")
        unused = [shown(self.config, path) for path in self.unused]
        unclaimed = [shown(self.config, path) for path in self.unclaimed]
        for line in render_baseline_summary(dict(self.counts), unused, self.settings.prune_baselines, unclaimed):
            terminalreporter.write_line(line)
