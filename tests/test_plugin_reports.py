"""Report files, pytest-xdist, JUnit properties, the header and the plugin's hooks, run as a user runs pytest."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from helpers.output import report_section

MODELS = """
import torch
from torch import nn


def mlp(activation, depth=4, width=16):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), activation()]
    return nn.Sequential(*layers)
"""

# Two modules, tests not in alphabetical order, a failing probe and a test with two
# probes: enough for xdist to spread them over workers and to scramble arrival order.
TEST_A = """
import pytest
from torch import nn
from pytest_gradcheck import GradientHealthError
from models import mlp


def test_zz_healthy(gradient_health):
    gradient_health(mlp(nn.ReLU))


def test_aa_vanishing(gradient_health):
    with pytest.raises(GradientHealthError):
        gradient_health(mlp(nn.Sigmoid, depth=6))


def test_two_probes(gradient_health):
    gradient_health(mlp(nn.ReLU), name="relu")
    gradient_health(mlp(nn.Tanh), name="tanh")


def test_probes_nothing():
    pass
"""

TEST_B = """
from torch import nn
from models import mlp


def test_wide(gradient_health):
    gradient_health(mlp(nn.ReLU, width=32))


def test_deep(gradient_health):
    gradient_health(mlp(nn.ReLU, depth=8), min_ratio=0.001)
"""

COLLECTION_ORDER = [
    ("test_a.py::test_zz_healthy", None),
    ("test_a.py::test_aa_vanishing", None),
    ("test_a.py::test_two_probes", "relu"),
    ("test_a.py::test_two_probes", "tanh"),
    ("test_b.py::test_wide", None),
    ("test_b.py::test_deep", None),
]


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(models=MODELS, test_a=TEST_A, test_b=TEST_B)
    pytester.syspathinsert()
    return pytester


def junit_properties(path) -> dict[str, list[tuple[str, str]]]:
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cases[case.get("name")] = [(p.get("name"), p.get("value")) for p in case.iter("property")]
    return cases


def test_json_and_markdown_files_hold_every_probe_in_collection_order(suite):
    result = suite.runpytest("--grad-report-json", "out/r.json", "--grad-report-md", "out/r.md")

    result.assert_outcomes(passed=6)
    document = json.loads((suite.path / "out" / "r.json").read_text())
    markdown = (suite.path / "out" / "r.md").read_text()
    assert document["schema_version"] == 1
    assert [(entry["nodeid"], entry["name"]) for entry in document["results"]] == COLLECTION_ORDER
    vanishing = document["results"][1]
    assert vanishing["verdict"] == "vanishing"
    assert vanishing["findings"][0]["rule"] == "vanishing"
    # Its test passed by catching the failure: an expected failure, as for an xfail test.
    assert vanishing["expected_failure"] is True
    assert [entry["expected_failure"] for entry in document["results"]] == [False, True, False, False, False, False]
    assert "| vanishing (expected) |" in markdown
    assert vanishing["bounds"]["min_ratio"] is not None
    assert [layer["name"] for layer in vanishing["profile"]["layers"]] == ["0", "2", "4", "6", "8", "10"]
    assert markdown.count("<summary>") == 6
    assert "test_a.py::test_two_probes [tanh]" in markdown
    # Written through a temporary file, which must not be left behind.
    assert sorted(p.name for p in (suite.path / "out").iterdir()) == ["r.json", "r.md"]
    result.stdout.fnmatch_lines(["gradcheck: wrote the JSON gradient report to *r.json"])


@pytest.mark.slow
def test_xdist_run_reports_exactly_what_a_serial_run_reports(suite):
    common = ["--grad-report", "--grad-report-json", "r.json", "--grad-report-md", "r.md", "--junitxml", "j.xml"]
    serial = suite.runpytest_subprocess("-n", "0", *common)
    files_serial = [(suite.path / name).read_text() for name in ("r.json", "r.md")]
    parallel = suite.runpytest_subprocess("-n", "2", *common)
    files_parallel = [(suite.path / name).read_text() for name in ("r.json", "r.md")]

    serial.assert_outcomes(passed=6)
    parallel.assert_outcomes(passed=6)
    parallel.stdout.fnmatch_lines(["created: 2/2 workers"])
    assert files_parallel == files_serial
    section = report_section(parallel.stdout.str())
    assert section == report_section(serial.stdout.str())
    for nodeid, name in COLLECTION_ORDER:
        title = f"{nodeid} [{name}]" if name else nodeid
        assert section.splitlines().count(title) == 1
    # The properties ride on the workers' reports into the controller's JUnit XML.
    properties = junit_properties(suite.path / "j.xml")
    assert properties["test_aa_vanishing"][1] == ("grad_verdict", "vanishing")
    assert properties["test_probes_nothing"] == []


def test_without_xdist_installed_the_report_files_still_come(suite):
    result = suite.runpytest("-p", "no:xdist", "--grad-report", "--grad-report-json", "r.json")

    result.assert_outcomes(passed=6)
    assert "gradient report" in result.stdout.str()
    document = json.loads((suite.path / "r.json").read_text())
    assert [(entry["nodeid"], entry["name"]) for entry in document["results"]] == COLLECTION_ORDER


def test_junit_xml_carries_ratio_and_verdict_of_each_probe(suite):
    result = suite.runpytest("--junitxml", "j.xml")

    result.assert_outcomes(passed=6)
    properties = junit_properties(suite.path / "j.xml")
    healthy = dict(properties["test_zz_healthy"])
    assert healthy["grad_verdict"] == "healthy"
    assert 0.1 < float(healthy["grad_ratio"]) < 10
    vanishing = dict(properties["test_aa_vanishing"])
    assert vanishing["grad_verdict"] == "vanishing"
    assert float(vanishing["grad_ratio"]) < 0.01
    assert [name for name, _ in properties["test_two_probes"]] == ["grad_ratio", "grad_verdict"] * 2


def test_terminal_table_is_cut_to_grad_report_max_rows_but_files_are_not(suite):
    result = suite.runpytest(
        "test_b.py::test_deep", "--grad-report", "-o", "grad_report_max_rows=3", "--grad-report-json", "r.json"
    )

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*5 of 8 layers left out (grad_report_max_rows = 3*"])
    document = json.loads((suite.path / "r.json").read_text())
    assert len(document["results"][0]["profile"]["layers"]) == 8


def test_a_bad_grad_report_max_rows_is_a_usage_error(suite):
    result = suite.runpytest("-o", "grad_report_max_rows=many")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*grad_report_max_rows must be a whole number*'many'*"])


@pytest.mark.parametrize(
    "args, header",
    [
        ([], None),
        (["--grad-report"], "gradcheck: min_ratio=*, max_ratio=*, max_grad=off, fail_on_unused=False*"),
        (["--grad-max-grad", "100"], "gradcheck: *max_grad=100.0*"),
        (["-o", "grad_min_ratio=0.001"], "gradcheck: min_ratio=0.001, *"),
    ],
)
def test_header_names_the_bounds_only_when_the_plugin_is_in_use(pytester, args, header):
    pytester.makepyfile("def test_nothing(): pass")

    result = pytester.runpytest(*args)

    if header is None:
        assert "gradcheck:" not in result.stdout.str()
    else:
        result.stdout.fnmatch_lines([header])
        assert result.stdout.str().count("gradcheck: ") == 1


def test_conftest_supplies_inputs_for_its_own_model_types(pytester):
    pytester.makeconftest(
        """
        import torch
        from models import MaskedNet

        def pytest_gradcheck_make_inputs(model):
            if isinstance(model, MaskedNet):
                return lambda: (torch.randn(4, 16), torch.ones(4, 16))
            return None
        """
    )
    pytester.makepyfile(
        models="""
        import torch
        from torch import nn

        class MaskedNet(nn.Module):
            # Two inputs: the built-in inference would pass only one.
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

            def forward(self, x, mask):
                return self.fc2(torch.relu(self.fc1(x * mask)))
        """,
        test_inputs="""
        import torch
        from torch import nn
        from models import MaskedNet

        def test_masked(gradient_health):
            profile = gradient_health(MaskedNet())
            assert profile.input_shapes == ["float32[4, 16]", "float32[4, 16]"]

        def test_other_models_keep_the_built_in_inference(gradient_health):
            profile = gradient_health(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
            assert profile.input_shapes == ["float32[8, 8]"]
        """,
    )
    pytester.syspathinsert()

    result = pytester.runpytest()

    result.assert_outcomes(passed=2)


def test_conftest_observes_every_profile_failing_ones_included(suite):
    suite.makeconftest(
        """
        def pytest_gradcheck_profile(item, profile):
            with open("observed.txt", "a") as log:
                log.write(f"{item.nodeid} {profile.model} {len(profile.layers)}\\n")
        """
    )

    result = suite.runpytest("test_a.py")

    result.assert_outcomes(passed=4)
    observed = (suite.path / "observed.txt").read_text().splitlines()
    assert observed == [
        "test_a.py::test_zz_healthy Sequential 4",
        "test_a.py::test_aa_vanishing Sequential 6",
        "test_a.py::test_two_probes Sequential 4",
        "test_a.py::test_two_probes Sequential 4",
    ]


def test_a_run_without_probes_still_writes_its_files_and_a_bad_path_is_reported(pytester):
    pytester.makepyfile("def test_nothing(): pass")
    pytester.path.joinpath("blocker").write_text("a file where a folder should be")

    result = pytester.runpytest("--grad-report-json", "r.json", "--grad-report-md", "blocker/r.md")

    result.assert_outcomes(passed=1)
    assert json.loads((pytester.path / "r.json").read_text())["results"] == []
    result.stdout.fnmatch_lines(["gradcheck: could not write --grad-report-md *blocker*r.md: *"])


@pytest.mark.parametrize(
    ("args", "detailed"),
    [([], False), (["--grad-report"], True), (["--grad-report-json=r.json"], True), (["--grad-max-grad=1e9"], True)],
    ids=["plain", "report", "json", "max-grad"],
)
def test_the_detail_statistics_are_measured_only_when_something_shows_or_checks_them(suite, args, detailed):
    suite.makeconftest(
        """
        def pytest_gradcheck_profile(item, profile):
            with open("detail.txt", "a") as log:
                log.write(f"{profile.detailed} {profile.layers[0].grad_max_abs is not None}\\n")
        """
    )

    result = suite.runpytest("test_a.py::test_zz_healthy", *args)

    result.assert_outcomes(passed=1)
    assert (suite.path / "detail.txt").read_text().split() == [str(detailed)] * 2
    if "--grad-report" in args:
        assert "max |grad|" in report_section(result.stdout.str())


def test_a_failure_the_test_catches_reads_expected_in_the_terminal_report(suite):
    result = suite.runpytest("--grad-report", "-k", "aa_vanishing or zz_healthy")

    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "Sequential: first/last ratio * verdict: vanishing (expected: the test expects this failure)",
            "  XFAIL vanishing: vanishing gradients: *",
        ]
    )
    assert "FAIL vanishing" not in result.stdout.str().replace("XFAIL vanishing", "")


def test_a_failure_without_a_report_shows_the_mean_column_only(pytester):
    pytester.makepyfile(models=MODELS)
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        from torch import nn
        from models import mlp

        def test_vanishing(gradient_health):
            gradient_health(mlp(nn.Sigmoid, depth=6))
        """
    )

    plain = pytester.runpytest()
    reported = pytester.runpytest("--grad-report")

    plain.assert_outcomes(failed=1)
    reported.assert_outcomes(failed=1)
    plain.stdout.fnmatch_lines(["*vanishing gradients: first/last ratio*", "*mean |grad|*"])
    assert "max |grad|" not in plain.stdout.str()
    assert "max |grad|" in reported.stdout.str()
