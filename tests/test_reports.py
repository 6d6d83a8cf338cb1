"""The renderers, fed synthetic profiles: no model, no torch, no pytest run."""

from __future__ import annotations

import json
import math

import pytest
from helpers.profiles import make_layer, make_profile

from pytest_gradcheck.core.bounds import Bounds
from pytest_gradcheck.core.checks import check
from pytest_gradcheck.core.findings import CheckResult
from pytest_gradcheck.core.profile import GradientProfile
from pytest_gradcheck.report.format import finding_lines, junit_properties
from pytest_gradcheck.report.json_report import SCHEMA_VERSION, render_json
from pytest_gradcheck.report.markdown import render_markdown
from pytest_gradcheck.report.table import (
    BAR_COLUMN,
    DETAIL_HEADERS,
    bar_scale,
    grad_bar,
    layer_rows,
    render_failure,
    render_table,
    shown_rows,
    table_headers,
)


def result_for(profile: GradientProfile, nodeid: str = "test_model.py::test_it", name=None) -> CheckResult:
    bounds = Bounds()
    return CheckResult(nodeid, name, profile, bounds, check(profile, bounds))


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first 'simple' table in ``text``, split into cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = []
    for line in lines[start:]:
        if not line[:1].isdigit():
            break
        rows.append(line.split())
    return rows


@pytest.fixture
def deep_profile() -> GradientProfile:
    """150 layers, a GPT-2-sized table, with its extremes and problems in the middle."""
    layers = [make_layer(f"h.{i}.mlp", 1e-2 * (1.0 + 0.1 * math.sin(i))) for i in range(150)]
    layers[33] = make_layer("h.33.mlp", 7.0)  # largest mean |grad|
    layers[77] = make_layer("h.77.mlp", 3e-7)  # smallest non-zero mean |grad|
    layers[100] = make_layer("h.100.mlp", 0.0, zero_fraction=1.0)  # dead: a finding names it
    layers[120] = make_layer("h.120.mlp", float("nan"), grad_max_abs=float("nan"))  # non-finite
    return make_profile(*layers, model="DeepNet")


def test_bar_grows_one_step_per_equal_factor_of_mean_grad():
    scale = (1e-6, 1.0)
    bars = [grad_bar(value, scale) for value in (1e-6, 1e-4, 1e-2, 1.0)]

    assert [len(bar) for bar in bars] == [1, 5, 8, 12]
    assert set("".join(bars)) == {"#"}


def test_bars_are_relative_to_the_last_layer_on_one_axis_in_every_table():
    balanced = make_profile(*[make_layer(f"fc{i}", 0.1 * (1 + i / 4)) for i in range(4)], model="Healthy")
    other = make_profile(*[make_layer(f"fc{i}", 1e3 * (1 + i / 4)) for i in range(4)], model="Large")

    low, high = bar_scale(balanced)

    assert (low, high) == pytest.approx((0.175e-4, 0.175e2))
    # The same ratios draw the same bars, whatever the gradients' absolute size.
    assert table_rows(render_table(balanced, []))[0][5] == table_rows(render_table(other, []))[0][5]
    assert "vs last, log 1e-04..1e+02" in render_table(balanced, []).splitlines()[1]


def test_without_a_last_layer_the_bar_scale_is_the_profiles_own_at_least_three_decades():
    profile = make_profile(make_layer("norm", 0.1, is_norm=True), model="NormOnly")  # no layer to pick

    low, high = bar_scale(profile)

    assert high == pytest.approx(0.1)
    assert low == pytest.approx(1e-4)


def test_zero_missing_and_non_finite_gradients_draw_no_bar():
    scale = (1e-3, 1.0)

    assert grad_bar(0.0, scale) == ""
    assert grad_bar(float("nan"), scale) == ""
    assert grad_bar(float("inf"), scale) == ""
    assert grad_bar(0.5, None) == ""


def test_table_shows_the_bar_column_and_its_scale():
    profile = make_profile(1e-5, 1e-2, 1.0, model="Vanishing")

    text = render_table(profile, [])
    rows = table_rows(text)

    assert "vs last, log 1e-04..1e+02" in text.splitlines()[1]
    # 1e-5 of the last is clipped to the axis' low end; 1e-2 sits 2 of its 6 decades up, 1.0 at 4.
    assert [row[5] for row in rows] == ["#", "#####", "########"]


def test_150_layer_table_fits_40_rows_and_keeps_its_worst_layers(deep_profile):
    result = result_for(deep_profile)
    rules = {finding.rule for finding in result.findings}

    text = render_table(deep_profile, result.findings, max_rows=40)
    shown = [int(row[0]) for row in table_rows(text)]

    assert {"dead", "nonfinite"} <= rules
    assert len(shown) == 40
    assert shown == sorted(shown)
    assert {0, 149, 33, 77, 100, 120} <= set(shown)
    assert "110 of 150 layers left out (grad_report_max_rows = 40" in text
    # The table, its two header lines and the summary: the whole block stays short.
    assert len(text.splitlines()) <= 40 + 4 + 1 + len(result.findings)


def test_truncation_fills_its_budget_from_both_ends_of_the_ranking(deep_profile):
    shown = shown_rows(deep_profile, [], max_rows=10)
    means = sorted((stats.grad_mean_abs, index) for index, stats in enumerate(deep_profile.layers) if stats.finite)

    assert len(shown) == 10
    assert {means[0][1], means[1][1], means[-1][1], means[-2][1]} <= set(shown)


def test_findings_naming_more_layers_than_fit_still_respect_the_budget():
    layers = [make_layer(f"dead{i}", 0.0, zero_fraction=1.0) for i in range(60)] + [make_layer("head", 1.0)]
    profile = make_profile(*layers, model="MostlyDead")
    result = result_for(profile)

    shown = shown_rows(profile, result.findings, max_rows=10)

    assert len(shown) == 10
    assert {0, 60} <= set(shown)


@pytest.mark.parametrize("max_rows", [None, 0, 150, 500])
def test_no_limit_or_a_large_one_shows_every_layer(deep_profile, max_rows):
    text = render_table(deep_profile, [], max_rows=max_rows)

    assert len(table_rows(text)) == 150
    assert "left out" not in text


def test_findings_are_listed_under_the_table(deep_profile):
    result = result_for(deep_profile)

    text = render_table(deep_profile, result.findings, max_rows=40)
    tail = text.splitlines()[-len(result.findings) :]

    assert tail == [line for finding in result.findings for line in finding_lines(finding)]
    assert tail[0].startswith("  FAIL ")


def test_markdown_holds_every_layer_in_a_well_formed_table(deep_profile):
    result = result_for(deep_profile)

    text = render_markdown([result])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`h." in line]

    assert len(rows) == 150
    assert "mean \\|grad\\|" in text
    # Every layer row has the header's number of cell separators once escaped pipes are ignored.
    header = next(line for line in text.splitlines() if line.startswith("| #"))
    assert {row.replace("\\|", "").count("|") for row in rows} == {header.replace("\\|", "").count("|")}
    assert "<details open>" in text  # a failing model is unfolded in the job summary
    assert "FAIL dead:" in text


def test_markdown_overview_lists_every_probed_model_in_the_given_order():
    healthy = make_profile(0.1, 0.2, model="Healthy")
    vanishing = make_profile(1e-6, 1.0, model="Vanishing")
    results = [result_for(vanishing, "b.py::test_v"), result_for(healthy, "a.py::test_h", name="small")]

    text = render_markdown(results)
    overview = text[: text.index("<details")]

    assert overview.index("b.py::test_v") < overview.index("a.py::test_h [small]")
    assert "| vanishing" in overview and "| healthy" in overview
    assert text.count("<details>") == 1 and text.count("<details open>") == 1


def test_markdown_for_a_run_that_probed_nothing_says_so():
    assert "No test probed a model." in render_markdown([])


def test_json_document_carries_schema_version_and_every_result_in_full(deep_profile):
    small = make_profile(0.1, 0.3, model="Small", loss=0.5)
    results = [result_for(small, "a.py::test_small"), result_for(deep_profile, "a.py::test_deep")]

    document = json.loads(render_json(results))

    assert document["schema_version"] == SCHEMA_VERSION
    assert [entry["nodeid"] for entry in document["results"]] == ["a.py::test_small", "a.py::test_deep"]
    assert document["results"][0] == results[0].to_dict()
    assert CheckResult.from_dict(document["results"][0]) == results[0]
    deep = document["results"][1]
    assert len(deep["profile"]["layers"]) == 150
    assert deep["verdict"] == "nonfinite+dead"
    assert deep["bounds"] == Bounds().to_dict()


def test_json_is_strict_non_finite_numbers_become_strings(deep_profile):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    text = render_json([result_for(deep_profile)])
    document = json.loads(text, parse_constant=refuse)

    nan_layer = document["results"][0]["profile"]["layers"][120]
    assert nan_layer["grad_mean_abs"] == "NaN"
    assert float(nan_layer["grad_mean_abs"]) != float(nan_layer["grad_mean_abs"])


def test_junit_properties_name_the_ratio_and_the_verdict():
    vanishing = make_profile(1e-6, 1.0, model="Vanishing")
    single = make_profile(0.1, model="Single")

    assert junit_properties(result_for(vanishing)) == [("grad_ratio", "1e-06"), ("grad_verdict", "vanishing")]
    assert junit_properties(result_for(single)) == [("grad_ratio", "n/a"), ("grad_verdict", "healthy")]


def test_a_failure_message_states_each_failing_finding_once_and_keeps_the_notes():
    profile = make_profile(1e-4, 1.0, make_layer("spare", 0.0, received_grad=False, unused_parameters=["spare.w"]))
    findings = check(profile, Bounds())

    message = render_failure(profile, findings)

    assert message.count("vanishing gradients: first/last ratio") == 1
    assert "note unused: unused parameters: 1 trainable parameter(s) got no gradient (spare.w)" in message


def test_a_profile_without_detail_has_no_detail_columns():
    fast = [make_layer(f"fc{i}", 10.0**-i, detail=False) for i in range(3)]
    profile = make_profile(*fast)

    headers = table_headers(profile)
    rows = layer_rows(profile, [])

    assert not set(DETAIL_HEADERS) & set(headers)
    assert all(len(row) == len(headers) for row in rows)
    detailed = make_profile(*[make_layer(f"fc{i}", 10.0**-i) for i in range(3)])
    assert table_headers(detailed)[BAR_COLUMN + 1 : BAR_COLUMN + 5] == DETAIL_HEADERS
    assert "max |grad|" not in render_table(profile, [])
