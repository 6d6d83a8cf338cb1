"""Baselines through pytest, as a user runs it: create, compare, fail, update, unused files, xdist."""

from __future__ import annotations

import json

import pytest

MODEL_MODULE = """
import os

import pytest
import torch
from torch import nn

INIT_STD = {init_std}


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    for layer in model[::2]:
        nn.init.normal_(layer.weight, std=INIT_STD)
    return model


def batch():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def test_net(gradient_health):
    gradient_health(make_model(), batch(), baseline=True)
"""

SUBSET_MODULE = """
import os

import pytest
import torch
from torch import nn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_a(gradient_health):
    assert os.environ.get("FAIL_A") != "1", "asked to fail"
    gradient_health(make_model(), torch.ones(2, 8), baseline=True)


@pytest.mark.skipif(os.environ.get("SKIP_B") == "1", reason="asked to skip")
def test_b(gradient_health):
    gradient_health(make_model(), torch.ones(2, 8), baseline=True, name="encoder")
    gradient_health(make_model(), torch.ones(2, 8), baseline=True, name="decoder")


@pytest.mark.parametrize("size", [2, 3])
def test_c(gradient_health, size):
    gradient_health(make_model(), torch.ones(size, 8), baseline=True)


def test_without_baseline():
    assert True
"""

SUBSET_FILES = ["test_a.json", "test_b.decoder.json", "test_b.encoder.json", "test_c[2].json", "test_c[3].json"]


def baseline_file(pytester: pytest.Pytester, module: str, test: str) -> object:
    return pytester.path / "__gradcheck__" / module / test


# A baseline of test_a's that no call makes any more: test_a once probed a model it called "retired".
STALE = "test_a.retired.json"


def stale_lines(result: pytest.RunResult) -> list[str]:
    """The session-end lines about unused or unclaimed baseline files."""
    return [line for line in result.outlines if "baseline file(s)" in line or STALE in line]


def write_stale(pytester: pytest.Pytester, module: str, name: str = STALE) -> object:
    """A baseline no call of the module uses any more, copied from a real one."""
    folder = pytester.path / "__gradcheck__" / module
    stale = folder / name
    stale.write_text(next(folder.glob("*.json")).read_text())
    return stale


def test_create_pass_drift_fail_update_pass_cycle(pytester: pytest.Pytester):
    pytester.makepyfile(test_model=MODEL_MODULE.format(init_std=0.1))
    path = baseline_file(pytester, "test_model", "test_net.json")

    missing = pytester.runpytest()
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(
        [
            "*no gradient baseline for Sequential in test_model.py::test_net: "
            "__gradcheck__/test_model/test_net.json does not exist. "
            "Create it with: pytest --grad-baseline-update 'test_model.py::test_net' (then commit the file)",
            "*0 created, 0 updated, 0 compared, 1 failed",
        ]
    )
    assert not path.exists()

    created = pytester.runpytest("--grad-baseline-update")
    created.assert_outcomes(passed=1)
    created.stdout.fnmatch_lines(["*- gradient baselines -*", "1 created, 0 updated, 0 compared, 0 failed"])
    first_text = path.read_text()
    assert json.loads(first_text)["schema_version"] == 1

    same = pytester.runpytest()
    same.assert_outcomes(passed=1)
    same.stdout.fnmatch_lines(["0 created, 0 updated, 1 compared, 0 failed"])

    pytester.makepyfile(test_model=MODEL_MODULE.format(init_std=0.3))  # init scale 3x: gradients move 3x to 9x
    drifted = pytester.runpytest()
    drifted.assert_outcomes(failed=1)
    drifted.stdout.fnmatch_lines(
        [
            ">       gradient_health(make_model(), batch(), baseline=True)",
            "E       pytest_gradcheck.errors.GradientHealthError: gradient baseline check failed for Sequential "
            "against __gradcheck__/test_model/test_net.json:",
            "E         mean |grad| moved beyond 2x in 3 layer(s): 0 *x, 2 *x, 4 *x",
            "E       Sequential: mean |grad| per layer against the baseline (tolerance 2x either way)",
            "E       layer*kind*baseline*now*factor",
            "E       0 *Linear*e-02* *e-01* *x*<< out of tolerance",
            "E       first/last ratio *",
            "E       If the change is intended, refresh the baseline: "
            "pytest --grad-baseline-update 'test_model.py::test_net'",
            "test_model.py:*: GradientHealthError",
            "0 created, 0 updated, 0 compared, 1 failed",
        ]
    )
    assert path.read_text() == first_text, "a failed comparison must not touch the file"

    updated = pytester.runpytest("--grad-baseline-update")
    updated.assert_outcomes(passed=1)
    updated.stdout.fnmatch_lines(["0 created, 1 updated, 0 compared, 0 failed"])
    assert path.read_text() != first_text

    pytester.runpytest().assert_outcomes(passed=1)


def test_marker_and_ini_switch_baselines_on_and_set_the_tolerance(pytester: pytest.Pytester, monkeypatch):
    pytester.makeini("[pytest]\ngrad_baseline = true\ngrad_baseline_tolerance = 1.5\n")
    pytester.makepyfile(
        test_model=MODEL_MODULE.format(init_std="float(os.environ.get('INIT_STD', '0.1'))")
        + """

@pytest.mark.gradient_health(tolerance=1000, min_ratio=0.001)
def test_tolerant(gradient_health):
    gradient_health(make_model(), batch())


@pytest.mark.gradient_health(baseline=False)
def test_marker_opts_out(gradient_health):
    gradient_health(make_model(), batch())


def test_keyword_tolerance(gradient_health):
    gradient_health(make_model(), batch(), tolerance=1000)
"""
    )
    pytester.runpytest("--grad-baseline-update").assert_outcomes(passed=4)
    names = sorted(path.name for path in (pytester.path / "__gradcheck__" / "test_model").iterdir())
    assert names == ["test_keyword_tolerance.json", "test_net.json", "test_tolerant.json"]

    monkeypatch.setenv("INIT_STD", "0.3")
    result = pytester.runpytest()
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*(tolerance 1.5x either way)*", "FAILED test_model.py::test_net - *"])


def test_bounds_still_apply_in_update_mode_and_block_the_write(pytester: pytest.Pytester):
    pytester.makepyfile(test_model=MODEL_MODULE.format(init_std=0.001))  # gradients vanish
    result = pytester.runpytest("--grad-baseline-update")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*vanishing gradients: first/last ratio*"])
    assert not (pytester.path / "__gradcheck__").exists()


def test_misuse_fails_with_a_message_that_says_what_to_do(pytester: pytest.Pytester):
    pytester.makepyfile(
        test_model=MODEL_MODULE.format(init_std=0.1)
        + """

def test_twice(gradient_health):
    gradient_health(make_model(), batch(), baseline=True)
    gradient_health(make_model(), batch(), baseline=True)


@pytest.mark.gradient_health(baseline=True, tolerance=0.1)
def test_percent_tolerance(gradient_health):
    gradient_health(make_model(), batch())
"""
    )
    result = pytester.runpytest("--grad-baseline-update", "-k", "twice or percent")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "*two gradient_health calls in test_model.py::test_twice share the baseline file "
            "__gradcheck__/test_model/test_twice.json; give each call its own name=*",
            "*baseline tolerance is a factor of at least 1 (2.0 allows half to double), got 0.1; "
            "for a 10% tolerance use 1.1",
        ]
    )
    assert not baseline_file(pytester, "test_model", "test_percent_tolerance.json").exists()


def test_corrupt_or_newer_files_fail_naming_them_and_are_only_rewritten_on_update(pytester: pytest.Pytester):
    bad = {
        "test_corrupt": ('{"schema_version": 1, "layers": [', "is corrupt: not valid JSON*--grad-baseline-update"),
        "test_newer": (
            '{"schema_version": 7}',
            "has schema_version 7, newer than this pytest-gradcheck reads (1); upgrade*",
        ),
    }
    for module, (content, _) in bad.items():
        pytester.makepyfile(**{module: MODEL_MODULE.format(init_std=0.1)})
        path = baseline_file(pytester, module, "test_net.json")
        path.parent.mkdir(parents=True)
        path.write_text(content)

    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    for module, (content, problem) in bad.items():
        result.stdout.fnmatch_lines(
            [f"E   *BaselineFileError: gradient baseline __gradcheck__/{module}/test_net.json {problem}"]
        )
        assert baseline_file(pytester, module, "test_net.json").read_text() == content

    pytester.runpytest("--grad-baseline-update").assert_outcomes(passed=2)
    for module in bad:
        assert json.loads(baseline_file(pytester, module, "test_net.json").read_text())["schema_version"] == 1


def test_unused_files_are_listed_and_pruned_only_after_the_whole_module_ran(pytester: pytest.Pytester, monkeypatch):
    pytester.makepyfile(test_subset=SUBSET_MODULE)
    pytester.runpytest("--grad-baseline-update").assert_outcomes(passed=5)
    folder = pytester.path / "__gradcheck__" / "test_subset"
    assert sorted(path.name for path in folder.iterdir()) == SUBSET_FILES
    write_stale(pytester, "test_subset")

    full = pytester.runpytest()
    full.assert_outcomes(passed=5)
    full.stdout.fnmatch_lines(
        [
            "0 created, 0 updated, 5 compared, 0 failed",
            "1 baseline file(s) unused (delete them with --grad-baseline-prune):",
            f"  __gradcheck__/test_subset/{STALE}",
        ]
    )

    monkeypatch.setenv("SKIP_B", "1")
    skipped = pytester.runpytest()
    monkeypatch.delenv("SKIP_B")
    skipped.assert_outcomes(passed=4, skipped=1)
    monkeypatch.setenv("FAIL_A", "1")
    pytester.runpytest().assert_outcomes(passed=4, failed=1)
    monkeypatch.delenv("FAIL_A")
    subsets = {
        "skip": skipped,
        "--lf": pytester.runpytest("--lf"),  # --lf trims the module at collection, deselecting nothing
        "-k": pytester.runpytest("-k", "test_a or test_c", "--grad-baseline-prune"),
        "--deselect": pytester.runpytest("--deselect", "test_subset.py::test_without_baseline"),
        "node id": pytester.runpytest("test_subset.py::test_c[2]"),
    }
    for label, result in subsets.items():
        assert result.ret == 0, label
        assert stale_lines(result) == [], f"{label} run reported unused files"
    assert (folder / STALE).exists()

    # A file no collected test owns may belong to a test of another machine: listed, never deleted.
    write_stale(pytester, "test_subset", "test_deleted.json")
    pruned = pytester.runpytest("--grad-baseline-prune")
    pruned.assert_outcomes(passed=5)
    pruned.stdout.fnmatch_lines(
        [
            "1 baseline file(s) deleted (--grad-baseline-prune):",
            f"  __gradcheck__/test_subset/{STALE}",
            "1 baseline file(s) belong to no test collected in this run, and are kept*",
            "  __gradcheck__/test_subset/test_deleted.json",
        ]
    )
    assert sorted(path.name for path in folder.iterdir()) == sorted([*SUBSET_FILES, "test_deleted.json"])


def test_failing_or_uncollectable_modules_report_no_unused_files(pytester: pytest.Pytester):
    pytester.makepyfile(test_subset=SUBSET_MODULE)
    pytester.runpytest("--grad-baseline-update").assert_outcomes(passed=5)
    write_stale(pytester, "test_subset")
    failing = SUBSET_MODULE + "\n\ndef test_fails_before_its_baseline():\n    assert False\n"
    pytester.makepyfile(test_subset=failing)
    result = pytester.runpytest()
    result.assert_outcomes(passed=5, failed=1)
    assert not stale_lines(result)

    pytester.makepyfile(test_subset=SUBSET_MODULE + "\nraise ImportError('broken')\n")
    broken = pytester.runpytest("--continue-on-collection-errors")
    broken.assert_outcomes(errors=1)
    assert not stale_lines(broken)


@pytest.mark.slow
def test_xdist_workers_write_their_own_files_and_the_controller_finds_unused_ones(pytester: pytest.Pytester):
    pytest.importorskip("xdist")
    partial = SUBSET_MODULE + "\n\ndef test_deselected_by_k():\n    assert True\n"
    pytester.makepyfile(test_full=SUBSET_MODULE, test_partial=partial)
    for module in ("test_full", "test_partial"):
        folder = pytester.path / "__gradcheck__" / module
        folder.mkdir(parents=True)
        (folder / STALE).write_text('{"schema_version": 1}')

    result = pytester.runpytest_subprocess("-n", "2", "--grad-baseline-update", "-k", "not deselected_by_k")
    result.assert_outcomes(passed=10)
    result.stdout.fnmatch_lines(
        [
            "10 created, 0 updated, 0 compared, 0 failed",
            "1 baseline file(s) unused (delete them with --grad-baseline-prune):",
            f"  __gradcheck__/test_full/{STALE}",
        ]
    )
    assert stale_lines(result) == [
        "1 baseline file(s) unused (delete them with --grad-baseline-prune):",
        f"  __gradcheck__/test_full/{STALE}",
    ], "test_partial had a test deselected on the workers, so it must not be judged"
    for module in ("test_full", "test_partial"):
        names = sorted(path.name for path in (pytester.path / "__gradcheck__" / module).iterdir())
        assert names == sorted([*SUBSET_FILES, STALE]), module
