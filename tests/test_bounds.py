"""Tests of bound parsing and layering (pure: no torch)."""

from __future__ import annotations

import math

import pytest

from pytest_gradcheck import SettingError
from pytest_gradcheck.core.bounds import (
    DEFAULT_MAX_RATIO,
    DEFAULT_MIN_RATIO,
    Bounds,
    parse_bound,
    resolve,
)


def test_no_layers_give_the_measured_defaults():
    bounds = resolve()

    assert bounds == Bounds()
    assert (bounds.min_ratio, bounds.max_ratio) == (DEFAULT_MIN_RATIO, DEFAULT_MAX_RATIO)
    assert bounds.max_grad is None  # absolute scale depends on the loss, so it is off by default
    assert bounds.fail_on_unused is False


@pytest.mark.parametrize(("raw", "expected"), [("0.1", 0.1), (" 1e-3 ", 0.001), ("7", 7.0), (0.25, 0.25), (3, 3.0)])
def test_numbers_parse(raw, expected):
    assert parse_bound("min_ratio", raw) == expected


@pytest.mark.parametrize("raw", ["off", "OFF", " None ", "no", "false", "", None])
def test_off_words_switch_a_bound_off(raw):
    assert parse_bound("max_ratio", raw) is None
    assert resolve({"max_ratio": raw}).max_ratio is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("tiny", "must be a number or 'off', got 'tiny'"),
        ("-0.5", "must be a non-negative number or 'off', got '-0.5'"),
        ("nan", "must be a non-negative number or 'off', got 'nan'"),
        (-1, "must be a non-negative number or 'off', got -1"),
        (math.nan, "must be a non-negative number or 'off', got nan"),
        ([0.1], "must be a non-negative number or 'off', got [0.1]"),
    ],
)
def test_bad_values_give_a_clear_error(raw, problem):
    with pytest.raises(SettingError, match="^min_ratio " + problem.replace("[", r"\[").replace("]", r"\]")):
        resolve({"min_ratio": raw})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("Yes", True),
        ("1", True),
        ("on", True),
        (True, True),
        ("false", False),
        ("0", False),
        ("off", False),
        (False, False),
    ],
)
def test_fail_on_unused_parses_booleans(raw, expected):
    assert resolve({"fail_on_unused": raw}).fail_on_unused is expected


def test_fail_on_unused_rejects_other_words():
    with pytest.raises(ValueError, match="fail_on_unused must be true or false, got 'maybe'"):
        resolve({"fail_on_unused": "maybe"})


def test_unknown_bound_names_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown bound 'min_ratiio'; known bounds: min_ratio, max_ratio, max_grad"):
        resolve({"min_ratiio": 0.1})


LAYER_NAMES = ["ini", "cli", "marker", "kwargs"]


@pytest.mark.parametrize("top", range(len(LAYER_NAMES)), ids=LAYER_NAMES)
def test_each_layer_overrides_the_ones_before(top):
    # Layer i sets min_ratio to 0.01 * (i + 1); only layers up to ``top`` are given.
    layers = [{"min_ratio": 0.01 * (index + 1)} for index in range(top + 1)]

    assert resolve(*layers).min_ratio == pytest.approx(0.01 * (top + 1))


def test_an_absent_key_keeps_the_value_below_and_none_switches_off():
    ini = {"min_ratio": "0.1", "max_ratio": "10", "max_grad": "100"}
    cli = {"max_ratio": "20"}
    marker = {"max_grad": None}
    kwargs = {}

    bounds = resolve(ini, cli, marker, kwargs)

    assert bounds == Bounds(min_ratio=0.1, max_ratio=20.0, max_grad=None, fail_on_unused=False)


def test_later_strings_override_earlier_numbers_and_back():
    assert resolve({"max_ratio": 5}, {"max_ratio": "off"}).max_ratio is None
    assert resolve({"max_ratio": "off"}, {"max_ratio": 5}).max_ratio == 5.0


def test_min_above_max_is_an_error_with_both_numbers():
    with pytest.raises(ValueError, match=r"min_ratio=0.5 is above max_ratio=0.1.*Lower min_ratio or raise max_ratio"):
        resolve({"min_ratio": "0.5"}, {"max_ratio": "0.1"})


def test_min_above_max_is_fine_when_one_is_off():
    assert resolve({"min_ratio": 100}, {"max_ratio": "off"}).min_ratio == 100.0


def test_describe_names_every_bound():
    text = Bounds(min_ratio=0.1, max_ratio=None, max_grad=3.0).describe()

    assert "min_ratio=0.1" in text
    assert "max_ratio=off" in text
    assert "max_grad=3.0" in text
    assert "fail_on_unused=False" in text


def test_to_dict_round_trips():
    bounds = resolve({"min_ratio": "0.03", "max_grad": "7", "fail_on_unused": "yes"})

    assert Bounds(**bounds.to_dict()) == bounds
