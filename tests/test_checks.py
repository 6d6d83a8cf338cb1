"""Tests of the checks and the plain-data profile (pure: profiles are built by hand, no torch)."""

from __future__ import annotations

import json
import math

import pytest
from helpers.profiles import make_layer, make_profile

from pytest_gradcheck.core.bounds import Bounds
from pytest_gradcheck.core.checks import check
from pytest_gradcheck.core.findings import CheckResult, Finding, failing, verdict
from pytest_gradcheck.core.profile import GradientProfile


def rules(findings: list[Finding]) -> list[str]:
    return [finding.rule for finding in findings]


# ---------------------------------------------------------------- first, last and ratio


def test_picks_skip_norms_bias_only_and_layers_without_gradient():
    net = make_profile(
        make_layer("shift", 9.0, has_matrix=False),
        make_layer("norm_in", 9.0, is_norm=True, kind="LayerNorm"),
        make_layer("fc1", 0.5),
        make_layer("fc2", 2.0),
        make_layer("norm_out", 9.0, is_norm=True, kind="LayerNorm"),
        make_layer("pooler", 0.0, received_grad=False, zero_fraction=1.0, unused_parameters=["pooler.weight"]),
    )

    assert (net.first.name, net.last.name) == ("fc1", "fc2")
    assert net.ratio == 0.25


def test_ratio_edge_cases():
    assert make_profile(make_layer("only")).ratio is None
    assert make_profile().ratio is None
    # A layer with no gradient on its weights is the dead rule's, a NaN one the nonfinite rule's.
    assert make_profile(make_layer("a", 1.0), make_layer("b", 0.0)).ratio is None
    assert make_profile(make_layer("a", 0.0), make_layer("b", 0.0)).ratio is None
    assert make_profile(make_layer("a", math.nan, finite=False), make_layer("b", 1.0)).ratio is None
    assert math.isnan(make_profile(make_layer("a", math.inf, finite=False), make_layer("b", 1.0)).ratio)


def test_layer_lookup_names_the_known_layers():
    net = make_profile(make_layer("fc1"), make_layer("fc2"))

    assert net.layer("fc2") is net.layers[1]
    with pytest.raises(KeyError, match="no layer named 'fc9' in the profile of Net; layers: fc1, fc2"):
        net.layer("fc9")


# ---------------------------------------------------------------- each rule


def test_healthy_profile_has_no_findings():
    findings = check(make_profile(0.5, 1.0), Bounds())

    assert findings == []
    assert verdict(findings) == "healthy"


def test_vanishing_below_min_ratio():
    findings = check(make_profile(1e-4, 1e-2), Bounds(min_ratio=0.02))

    assert rules(findings) == ["vanishing"]
    finding = findings[0]
    assert finding.failing
    assert finding.layers == ["fc1", "fc2"]
    assert finding.value == pytest.approx(0.01)
    assert finding.bound == 0.02
    assert "first/last ratio 0.01 < min_ratio 0.02" in finding.message
    assert "first layer fc1 mean |grad| 0.0001" in finding.message
    assert "last layer fc2 mean |grad| 0.01" in finding.message
    assert verdict(findings) == "vanishing"


def test_exploding_above_max_ratio():
    findings = check(make_profile(300.0, 2.0), Bounds(max_ratio=50))

    assert rules(findings) == ["exploding"]
    assert findings[0].value == 150.0
    assert "first/last ratio 150 > max_ratio 50" in findings[0].message
    assert verdict(findings) == "exploding"


@pytest.mark.parametrize(("ratio", "bounds"), [(0.02, Bounds(min_ratio=0.02)), (50.0, Bounds(max_ratio=50.0))])
def test_a_ratio_on_the_bound_passes(ratio, bounds):
    assert check(make_profile(ratio, 1.0), bounds) == []


def test_ratio_bounds_switched_off():
    tiny = make_profile(1e-9, 1.0)
    huge = make_profile(1e9, 1.0)

    assert check(tiny, Bounds(min_ratio=None)) == []
    assert check(huge, Bounds(max_ratio=None)) == []


def test_nonfinite_names_the_layers_and_skips_the_ratio():
    net = make_profile(
        make_layer("fc1", math.nan, finite=False), make_layer("fc2", 1.0), make_layer("fc3", math.inf, finite=False)
    )

    findings = check(net, Bounds())

    assert rules(findings) == ["nonfinite"]
    assert findings[0].layers == ["fc1", "fc3"]
    assert findings[0].failing
    assert "non-finite gradients (NaN or Inf) in 2 layer(s): fc1, fc3" in findings[0].message


def test_dead_layer_all_zero_gradients():
    net = make_profile(
        make_layer("fc1", 1.0), make_layer("fc2", 0.0, grad_max_abs=0.0, zero_fraction=1.0), make_layer("fc3", 1.0)
    )

    findings = check(net, Bounds())

    assert rules(findings) == ["dead"]
    assert findings[0].layers == ["fc2"]
    assert findings[0].failing
    assert "every gradient is exactly zero in 1 layer(s): fc2" in findings[0].message


def test_a_layer_without_gradient_is_unused_not_dead():
    pooler = make_layer(
        "pooler", 0.0, received_grad=False, zero_fraction=1.0, unused_parameters=["pooler.weight", "pooler.bias"]
    )
    net = make_profile(make_layer("fc1"), make_layer("fc2"), pooler)

    lenient = check(net, Bounds())
    strict = check(net, Bounds(fail_on_unused=True))

    assert rules(lenient) == ["unused"] and not lenient[0].failing
    assert lenient[0].layers == ["pooler"]
    assert "2 trainable parameter(s) got no gradient (pooler.weight, pooler.bias)" in lenient[0].message
    assert "set fail_on_unused to fail" in lenient[0].message
    assert verdict(lenient) == "healthy"
    assert rules(strict) == ["unused"] and strict[0].failing
    assert verdict(strict) == "unused"


def test_max_grad_is_off_by_default_and_catches_uniformly_huge_gradients():
    net = make_profile(
        make_layer("fc1", 1e6, grad_max_abs=5e6), make_layer("fc2", 1e6, grad_max_abs=9e6), make_layer("fc3", 1.0)
    )

    assert check(make_profile(*net.layers[:2]), Bounds()) == []  # the ratio is 1: no ratio can see this
    findings = check(net, Bounds(max_ratio=None, min_ratio=None, max_grad=1e3))

    assert rules(findings) == ["exploding"]
    assert findings[0].layers == ["fc1", "fc2"]
    assert findings[0].value == 9e6 and findings[0].bound == 1e3
    assert "2 layer(s) have |grad| above max_grad 1000; largest 9e+06 in fc2" in findings[0].message


def test_max_grad_leaves_nonfinite_layers_to_their_own_rule():
    net = make_profile(make_layer("fc1", math.inf, grad_max_abs=math.inf, finite=False), make_layer("fc2", 1.0))

    assert rules(check(net, Bounds(max_grad=10.0))) == ["nonfinite"]


def test_profile_check_takes_explicit_bounds():
    net = make_profile(1e-3, 1.0)

    assert rules(check(net)) == ["vanishing"]  # no bound given: the defaults apply
    assert check(net, min_ratio="off") == []
    assert rules(check(net, min_ratio=0.02)) == ["vanishing"]
    assert rules(check(net, min_ratio=1e-4, max_ratio=1e-2)) == []
    with pytest.raises(TypeError):
        check(net, min_ratoi=0.1)


# ---------------------------------------------------------------- verdicts


def test_verdict_joins_failing_rules_once_in_order():
    net = make_profile(
        make_layer("fc1", 1e6, grad_max_abs=1e7),
        make_layer("fc2", 0.0, grad_max_abs=0.0, zero_fraction=1.0),
        make_layer("fc3", 1.0),
    )

    findings = check(net, Bounds(max_grad=10.0))

    assert rules(findings) == ["exploding", "exploding", "dead"]
    assert verdict(findings) == "exploding+dead"
    assert failing(findings) == findings


def test_failing_filters_out_notes():
    notes = [Finding("unused", ["a"], "m", False), Finding("vanishing", ["a", "b"], "m", True)]

    assert failing(notes) == [notes[1]]
    assert verdict(notes) == "vanishing"
    assert verdict([]) == "healthy"


# ---------------------------------------------------------------- plain data round trips


def rich_profile() -> GradientProfile:
    return GradientProfile(
        model="TiedLM",
        layers=[
            make_layer("emb", 0.3, kind="Embedding", shared_with=["head"]),
            make_layer("norm", 0.2, kind="LayerNorm", is_norm=True, has_matrix=False),
            make_layer("head", 0.1, has_matrix=False),
            make_layer("pooler", 0.0, received_grad=False, executed=False, unused_parameters=["pooler.weight"]),
        ],
        loss=2.5,
        seed=7,
        device="cpu",
        dtype="bfloat16",
        input_shapes=["int64[8, 16]", "mask=bool[8, 16]"],
    )


def test_profile_round_trips_through_json():
    original = rich_profile()

    data = json.loads(json.dumps(original.to_dict()))
    restored = GradientProfile.from_dict(data)

    assert restored == original
    assert data["ratio"] is None and data["first"] == "emb" and data["last"] == "emb"


def test_from_dict_ignores_derived_and_unknown_keys():
    data = rich_profile().to_dict()
    data["ratio"] = 123.0
    data["layers"][0]["from_a_newer_version"] = 1

    assert GradientProfile.from_dict(data) == rich_profile()


def test_check_result_round_trips():
    pooler = make_layer("pooler", 0.0, received_grad=False, unused_parameters=["pooler.weight"])
    net = make_profile(make_layer("fc1", 1e-4), make_layer("fc2", 1.0), pooler)
    bounds = Bounds(min_ratio=0.05, max_grad=1e3, fail_on_unused=True)
    result = CheckResult("tests/test_x.py::test_net", "encoder", net, bounds, check(net, bounds))

    data = json.loads(json.dumps(result.to_dict()))
    restored = CheckResult.from_dict(data)

    assert data["verdict"] == "vanishing+unused"
    assert data["ratio"] == pytest.approx(1e-4)
    assert restored.profile == net
    assert restored.bounds == bounds
    assert restored.findings == result.findings
    assert restored.title == "tests/test_x.py::test_net [encoder]"
    assert restored.verdict == result.verdict
