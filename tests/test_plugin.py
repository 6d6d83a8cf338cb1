"""The gradient_health fixture, bounds layering and --grad-report, run the way a user runs pytest."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers.output import report_section

# Two layers whose first/last mean |grad| ratio is exactly ``ratio``: with W1 = I and
# W2 = ratio * I, dL/dW1 = W2^T dL/dy x^T = ratio * dL/dW2 entry by entry, whatever the loss.
MODELS = """
import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(8))
            self.fc2.weight.copy_(ratio * torch.eye(8))

    def forward(self, x):
        return self.fc2(self.fc1(x))
"""

FIXTURE_TESTS = """
import pytest
from pytest_gradcheck import GradientHealthError
from models import Scaled


def test_healthy(gradient_health):
    profile = gradient_health(Scaled(0.1))
    assert profile.ratio == pytest.approx(0.1, rel=1e-5)


def test_vanishing(gradient_health):
    gradient_health(Scaled(0.001))


def test_exploding_is_an_assertion_error(gradient_health):
    with pytest.raises(AssertionError) as info:
        gradient_health(Scaled(1000.0))
    assert isinstance(info.value, GradientHealthError)
    # The output is 1000 times the input, so the forward signal blows up with the ratio.
    assert [finding.rule for finding in info.value.findings] == ["exploding", "exploding_signal"]
    assert info.value.profile.ratio == pytest.approx(1000.0, rel=1e-5)


def test_two_models(gradient_health):
    gradient_health(Scaled(0.5), name="encoder")
    gradient_health(Scaled(2.0), name="decoder")


def test_without_the_fixture():
    pass
"""

LAYERED_TESTS = """
import pytest
from models import Scaled


def test_plain(gradient_health):
    gradient_health(Scaled(0.1))


@pytest.mark.gradient_health(min_ratio=0.2)
def test_marker(gradient_health):
    gradient_health(Scaled(0.1))


@pytest.mark.gradient_health(min_ratio=0.2)
def test_keyword(gradient_health):
    gradient_health(Scaled(0.1), min_ratio=0.05)


def test_high_ratio(gradient_health):
    gradient_health(Scaled(10.0))
"""

INI = """
[tool.pytest.ini_options]
grad_min_ratio = "0.5"
grad_max_ratio = "5"
"""


@pytest.fixture
def fixture_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(models=MODELS, test_fixture=FIXTURE_TESTS)
    return pytester


def test_fixture_passes_healthy_models_and_fails_unhealthy_ones(fixture_suite):
    result = fixture_suite.runpytest("--strict-markers")

    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_fixture.py::test_vanishing - *GradientHeal*"])


def test_failure_names_the_rule_with_numbers_shows_the_table_and_points_at_the_test(fixture_suite):
    result = fixture_suite.runpytest("-k", "test_vanishing")
    output = result.stdout.str()

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            ">       gradient_health(Scaled(0.001))",
            "E       *GradientHealthError: gradient health check failed for Scaled:",
            "E         vanishing: vanishing gradients: first/last ratio 0.001 < min_ratio 0.02 "
            "(first layer fc1 mean |grad| *, last layer fc2 mean |grad| *)",
            "E       Scaled: first/last ratio 0.001 (fc1 / fc2), verdict: vanishing",
            "E       #*layer*kind*params*mean |grad|*",
            "E       0*fc1*Linear*64*ratio: first",
            "E       1*fc2*Linear*64*ratio: last",
            "test_fixture.py:12: GradientHealthError",
        ]
    )
    # The ">" line right before the message is the test's own call: plugin frames are hidden.
    arrow = [line for line in output.splitlines() if line.startswith(">")]
    assert arrow == [">       gradient_health(Scaled(0.001))"]
    for internal in ("plugin.py", "health.py", "probing.py", "checks.py"):
        assert internal not in output


LAYERED_ORDER = ("test_plain", "test_marker", "test_keyword", "test_high_ratio")


@pytest.mark.parametrize(
    ("ini", "args", "expected"),
    [
        # (min_ratio, max_ratio) the fixture applied in each test, in LAYERED_ORDER
        (False, [], [(0.02, 50.0), (0.2, 50.0), (0.05, 50.0), (0.02, 50.0)]),
        (True, [], [(0.5, 5.0), (0.2, 5.0), (0.05, 5.0), (0.5, 5.0)]),
        (
            True,
            ["--grad-min-ratio", "0.05", "--grad-max-ratio=off"],
            [(0.05, None), (0.2, None), (0.05, None), (0.05, None)],
        ),
    ],
    ids=["defaults", "ini-over-defaults", "cli-over-ini"],
)
def test_bounds_layer_ini_cli_marker_keyword(pytester: pytest.Pytester, ini, args, expected):
    pytester.makepyfile(models=MODELS, test_layered=LAYERED_TESTS)
    if ini:
        pytester.makepyprojecttoml(INI)

    result = pytester.runpytest("--strict-markers", *args)

    applied = {}
    failed = set()
    for report in result.reprec.getreports("pytest_runtest_logreport"):
        if report.when == "call":
            test = report.nodeid.split("::")[1]
            bounds = report.gradcheck["results"][0]["bounds"]
            applied[test] = (bounds["min_ratio"], bounds["max_ratio"])
            if report.failed:
                failed.add(test)
    assert applied == dict(zip(LAYERED_ORDER, expected))
    # Scaled(0.1) fails exactly when min_ratio > 0.1; Scaled(10) when max_ratio < 10.
    should_fail = {
        test
        for test, (low, high) in applied.items()
        if (test != "test_high_ratio" and low > 0.1) or (test == "test_high_ratio" and high is not None and high < 10)
    }
    assert failed == should_fail
    assert result.ret == (1 if should_fail else 0)


def test_failure_message_shows_the_bound_that_applied(pytester: pytest.Pytester):
    pytester.makepyfile(models=MODELS, test_layered=LAYERED_TESTS)
    pytester.makepyprojecttoml(INI)

    result = pytester.runpytest("-k", "test_plain or test_high_ratio")

    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "E         vanishing: vanishing gradients: first/last ratio 0.1 < min_ratio 0.5 *",
            "E         exploding: exploding gradients: first/last ratio 10 > max_ratio 5 *",
        ]
    )


def test_grad_report_prints_one_table_per_probed_model(fixture_suite):
    result = fixture_suite.runpytest("--grad-report")

    result.assert_outcomes(passed=4, failed=1)
    report = report_section(result.stdout.str())
    headings = [
        "test_fixture.py::test_healthy",
        "Scaled: first/last ratio 0.1 (fc1 / fc2), verdict: healthy",
        "test_fixture.py::test_vanishing",
        "Scaled: first/last ratio 0.001 (fc1 / fc2), verdict: vanishing",
        "test_fixture.py::test_exploding_is_an_assertion_error",
        # The test catches the failure (pytest.raises) and passes: the report says it expected it.
        "Scaled: first/last ratio 1e+03 (fc1 / fc2), verdict: exploding+exploding_signal "
        "(expected: the test expects this failure)",
        "test_fixture.py::test_two_models [encoder]",
        "Scaled: first/last ratio 0.5 (fc1 / fc2), verdict: healthy",
        "test_fixture.py::test_two_models [decoder]",
        "Scaled: first/last ratio 2 (fc1 / fc2), verdict: healthy",
    ]
    lines = report.splitlines()
    positions = [lines.index(heading) for heading in headings]
    assert positions == sorted(positions)
    assert len(re.findall(r"^Scaled: first/last ratio", report, flags=re.MULTILINE)) == 5
    assert len(re.findall(r"^#\s+layer\s+kind", report, flags=re.MULTILINE)) == 5
    assert "test_without_the_fixture" not in report


def test_nothing_extra_is_printed_without_grad_report(fixture_suite):
    quiet = fixture_suite.runpytest("-k", "healthy or two_models or without")

    quiet.assert_outcomes(passed=3)
    output = quiet.stdout.str()
    assert "gradient report" not in output
    assert "first/last ratio" not in output
    assert "mean |grad|" not in output
    assert not [line for line in output.splitlines() if line.startswith("gradcheck")]  # no header line


@pytest.mark.slow
def test_importing_the_plugin_does_not_import_torch():
    code = "import pytest_gradcheck.plugin, sys; assert 'torch' not in sys.modules, 'torch was imported'"

    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert completed.returncode == 0, completed.stderr


@pytest.mark.slow
def test_a_project_that_does_not_use_the_fixture_never_imports_torch(pytester: pytest.Pytester):
    pytester.makeconftest(
        """
        import sys

        def pytest_sessionfinish(session):
            terminal = session.config.pluginmanager.get_plugin("terminalreporter")
            active = session.config.pluginmanager.has_plugin("gradcheck")
            terminal.write_line(f"gradcheck active: {active}, torch imported: {'torch' in sys.modules}")
        """
    )
    pytester.makepyfile("def test_plain():\n    assert True\n")

    result = pytester.runpytest_subprocess("--grad-report", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["gradcheck active: True, torch imported: False"])


def test_a_bad_bound_stops_the_run_with_a_usage_error(pytester):
    pytester.makepyfile("def test_nothing(): pass")
    pytester.makeini("[pytest]\ngrad_max_ratio = lots\n")

    result = pytester.runpytest()

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini option grad_max_ratio: *max_ratio must be a number or 'off', got 'lots'*"])


def test_positional_marker_arguments_are_an_error(pytester):
    pytester.makepyfile(
        """
        import pytest
        import torch

        @pytest.mark.gradient_health(0.1)
        def test_model(gradient_health):
            gradient_health(torch.nn.Linear(4, 2))
        """
    )

    result = pytester.runpytest()

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*takes keyword arguments only*min_ratio=0.01*got positional (0.1,)*"])
