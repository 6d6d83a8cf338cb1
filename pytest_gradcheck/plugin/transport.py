"""What the plugin attaches to each test report, so that pytest-xdist carries it to the controller.

One attribute holds it all, as plain data: the test's results, its baseline file events,
and the facts about its module that tell the controller which baseline files went unused.
This module is the only place that knows its keys.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_gradcheck.core.findings import CheckResult

ATTRIBUTE = "gradcheck"
_RESULTS_KEY = pytest.StashKey[list["CheckResult"]]()
_BASELINE_EVENTS_KEY = pytest.StashKey[list[dict[str, str]]]()
_MODULE_KEY = pytest.StashKey[dict[str, Any]]()


@dataclass
class ReportData:
    """What one test report carried, decoded."""

    results: list[CheckResult] = field(default_factory=list)
    baseline_events: list[dict[str, str]] = field(default_factory=list)
    module: dict[str, Any] | None = None


def remember_result(item: pytest.Item, result: CheckResult) -> None:
    """Keep one probed model's result for the report of the phase that is running."""
    item.stash.setdefault(_RESULTS_KEY, []).append(result)


def baseline_events(item: pytest.Item) -> list[dict[str, str]]:
    """The baseline file events of ``item``'s running phase, to append to."""
    return item.stash.setdefault(_BASELINE_EVENTS_KEY, [])


def remember_module(item: pytest.Item, facts: dict[str, Any]) -> None:
    """Facts about ``item``'s module, sent with its call-phase report."""
    item.stash[_MODULE_KEY] = facts


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    payload: dict[str, Any] = {}
    results = item.stash.get(_RESULTS_KEY, None)
    if results:
        payload["results"] = [result.to_dict() for result in results]
        results.clear()
    events = item.stash.get(_BASELINE_EVENTS_KEY, None)
    if events:
        payload["baseline_events"] = list(events)
        events.clear()
    module = item.stash.get(_MODULE_KEY, None)
    if module is not None and report.when == "call":
        payload["module"] = module
    if payload:
        # Plain dicts ride on the test's own report, so a crashed worker loses only its own tests.
        setattr(report, ATTRIBUTE, payload)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report: Any) -> Any:
    data = yield
    if data is not None and getattr(report, ATTRIBUTE, None):
        data[ATTRIBUTE] = getattr(report, ATTRIBUTE)
    return data


@pytest.hookimpl(wrapper=True)
def pytest_report_from_serializable(config: pytest.Config, data: dict[str, Any]) -> Any:
    report = yield
    if report is not None and ATTRIBUTE in data:
        setattr(report, ATTRIBUTE, data[ATTRIBUTE])
    return report


# Decoded once per report however many readers ask; kept off the report, whose
# attributes pytest-xdist sends from the workers as they are.
_decoded: weakref.WeakKeyDictionary[Any, ReportData] = weakref.WeakKeyDictionary()


def read(report: Any) -> ReportData | None:
    """What ``report`` carries, decoded; None when it carries nothing."""
    payload = getattr(report, ATTRIBUTE, None)
    if not payload:
        return None
    decoded = _decoded.get(report)
    if decoded is None:
        from pytest_gradcheck.core.findings import CheckResult

        decoded = ReportData(
            results=[CheckResult.from_dict(result) for result in payload.get("results", ())],
            baseline_events=list(payload.get("baseline_events", ())),
            module=payload.get("module"),
        )
        _decoded[report] = decoded
    return decoded
