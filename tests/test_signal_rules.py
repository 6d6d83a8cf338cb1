"""The forward-signal, loss-at-init and through-time rules, and the ratio's fairness exemptions (pure: no torch).

Every profile is built by hand. The layers' mean |grad| are all 1.0 unless a test says
otherwise, so the first/last ratio is 1 and only the rule under test can speak.
"""

from __future__ import annotations

import math

import pytest
from helpers.profiles import make_layer, make_profile

from pytest_gradcheck.core.bounds import BOUND_NAMES, BOUND_OPTIONS, Bounds, parse_bound, resolve
from pytest_gradcheck.core.checks import check
from pytest_gradcheck.core.fairness import (
    SCALE_INVARIANT,
    SCALE_INVARIANT_FED,
    backward_ratio,
    is_scale_invariant,
    smallest_gate,
    stack_copy,
)
from pytest_gradcheck.core.findings import Finding, verdict
from pytest_gradcheck.core.profile import GradientProfile, LayerStats, TimeProfile
from pytest_gradcheck.core.signal import WEAK_SIGNAL_FACTOR, signal_curve, steps_back_to
from pytest_gradcheck.errors import SettingError
from pytest_gradcheck.report.format import time_lines
from pytest_gradcheck.report.table import SIGNAL_HEADER, render_table

MIN_SIGNAL = Bounds().min_signal
MAX_SIGNAL = Bounds().max_signal
MIN_TIME = Bounds().min_time_ratio
MAX_TIME = Bounds().max_time_ratio
NEW_BOUNDS = ("min_signal", "max_signal", "max_initial_loss", "min_time_ratio", "max_time_ratio")


def signal_layer(name: str, input_std: float | None, mean: float = 1.0, **fields) -> LayerStats:
    """A weight layer (role "layer") whose input has std ``input_std``."""
    return make_layer(name, mean, role="layer", input_std=input_std, **fields)


def signal_profile(*stds: float, names: list[str] | None = None, **fields) -> GradientProfile:
    """Weight layers fc1, fc2, ... whose inputs have the given stds; the first one's is the reference."""
    names = names or [f"fc{index + 1}" for index in range(len(stds))]
    return make_profile(*(signal_layer(name, std) for name, std in zip(names, stds, strict=True)), **fields)


def of_rule(findings: list[Finding], rule: str) -> list[Finding]:
    return [finding for finding in findings if finding.rule == rule]


def only(findings: list[Finding], rule: str) -> Finding:
    found = of_rule(findings, rule)
    assert len(found) == 1, [finding.message for finding in findings]
    return found[0]


def below(value: float) -> float:
    return math.nextafter(value, 0.0)


def above(value: float) -> float:
    return math.nextafter(value, math.inf)


# ---------------------------------------------------------------- the signal curve


def test_the_curve_is_relative_to_the_first_weight_layers_input_and_skips_norms_tables_and_zero_inputs():
    profile = make_profile(
        make_layer("emb", 1.0, role="lookup", input_std=50.0),
        signal_layer("fc1", 4.0),
        signal_layer("norm", 1e-9, is_norm=True, kind="LayerNorm", has_matrix=False),
        signal_layer("gated", 0.0),  # behind an exactly-zero gate: no spread at all
        make_layer("model", 1.0, role="container", input_std=1e-9),
        signal_layer("fc2", 1.0),
        make_layer("legacy", 1.0, input_std=1e-9),  # role None: a file from before roles were measured
    )

    assert signal_curve(profile) == [("fc1", 1.0), ("fc2", 0.25)]


def test_no_curve_without_a_finite_reference():
    assert signal_curve(signal_profile(math.inf, 1.0)) == []
    assert signal_curve(make_profile(make_layer("fc1"), make_layer("fc2"))) == []
    assert not of_rule(check(signal_profile(math.inf, 1e-9)), "vanishing_signal")


# ---------------------------------------------------------------- vanishing signal


@pytest.mark.parametrize(
    ("head_input", "expected"),
    [
        (below(MIN_SIGNAL), "failing"),
        (MIN_SIGNAL, "note"),  # strict: at the bound it is a weak signal, not a collapse
        (below(MIN_SIGNAL * WEAK_SIGNAL_FACTOR), "note"),
        (MIN_SIGNAL * WEAK_SIGNAL_FACTOR, None),  # strict again: at 100x the bound nothing is said
        (0.5, None),
    ],
    ids=["just-below", "at-bound", "just-inside-weak-band", "at-weak-band-edge", "healthy"],
)
def test_vanishing_signal_boundaries(head_input, expected):
    findings = check(signal_profile(1.0, 0.5, head_input))

    found = of_rule(findings, "vanishing_signal")
    if expected is None:
        assert found == []
        return
    (finding,) = found
    assert finding.failing == (expected == "failing")
    assert finding.value == head_input
    assert finding.bound == MIN_SIGNAL
    assert verdict(findings) == ("vanishing_signal" if expected == "failing" else "healthy")


def test_the_weak_signal_note_names_the_head_and_does_not_fail():
    finding = only(check(signal_profile(1.0, 0.5, 2e-4)), "vanishing_signal")

    assert not finding.failing
    assert finding.layers == ["fc3"]
    assert finding.message.startswith("weak signal: the input of fc3 has 0.0002 of the std of fc1's input")
    assert "min_signal 1e-05 but within 100x of it" in finding.message
    assert finding.message.endswith("not failing")


def test_vanishing_signal_message_names_where_it_fell_below_and_the_numbers():
    finding = only(check(signal_profile(1.0, 0.5, 1e-6, 1e-7)), "vanishing_signal")

    assert finding.failing
    assert finding.layers == ["fc3", "fc4"]
    assert finding.message == (
        "vanishing signal: the forward signal collapses: the input of fc4 has 1e-07 of the std of fc1's input "
        "(< min_signal 1e-05); it fell below the bound at fc3's input (1e-06)"
    )
    assert (finding.value, finding.bound) == (1e-7, MIN_SIGNAL)


def test_a_head_alone_below_the_bound_is_named_without_a_crossing_point():
    finding = only(check(signal_profile(1.0, 0.5, 1e-7)), "vanishing_signal")

    assert finding.layers == ["fc3"]
    assert "the input of fc3 has 1e-07 of the std of fc1's input" in finding.message
    assert "fell below" not in finding.message


def test_the_signal_is_judged_where_it_reaches_the_output_layer():
    # A branch that runs after the head (an auxiliary projection) may read a tiny input by design.
    branch_after_head = signal_profile(1.0, 0.5, 1e-9, names=["fc1", "head", "aux"], output_layer="head")
    assert not of_rule(check(branch_after_head), "vanishing_signal")

    # Without a known output layer, the last weight layer's input is the one judged.
    unknown_head = signal_profile(1.0, 0.5, 1e-9, names=["fc1", "head", "aux"])
    assert only(check(unknown_head), "vanishing_signal").layers == ["aux"]

    # And a collapsed head input fails even when a layer after it reads a healthy one.
    collapsed_head = signal_profile(1.0, 1e-9, 1.0, names=["fc1", "head", "aux"], output_layer="head")
    finding = only(check(collapsed_head), "vanishing_signal")
    assert finding.failing
    assert finding.layers == ["head"]


def test_min_signal_keyword_moves_the_verdict():
    profile = signal_profile(1.0, 0.5, 5e-3)

    assert not of_rule(check(profile), "vanishing_signal")  # 5e-3 is 500x the default bound
    assert only(check(profile, min_signal=1e-4), "vanishing_signal").failing is False  # within 100x: a note
    tightened = only(check(profile, min_signal=1e-2), "vanishing_signal")
    assert tightened.failing
    assert "(< min_signal 0.01)" in tightened.message


@pytest.mark.parametrize("off", ["off", None, "none"])
def test_min_signal_off_silences_both_the_failure_and_the_note(off):
    assert of_rule(check(signal_profile(1.0, 1e-12)), "vanishing_signal")
    assert of_rule(check(signal_profile(1.0, 5e-5)), "vanishing_signal")

    assert not of_rule(check(signal_profile(1.0, 1e-12), min_signal=off), "vanishing_signal")
    assert not of_rule(check(signal_profile(1.0, 5e-5), min_signal=off), "vanishing_signal")


# ---------------------------------------------------------------- exploding signal


@pytest.mark.parametrize(
    ("value", "fails"), [(MAX_SIGNAL, False), (above(MAX_SIGNAL), True), (below(MAX_SIGNAL), False)]
)
def test_exploding_signal_is_strictly_above_max_signal(value, fails):
    found = of_rule(check(signal_profile(1.0, value, 1.0)), "exploding_signal")

    assert bool(found) == fails
    if fails:
        assert found[0].failing
        assert found[0].layers == ["fc2"]
        assert (found[0].value, found[0].bound) == (value, MAX_SIGNAL)


def test_exploding_signal_names_the_first_layer_above_and_the_highest():
    finding = only(check(signal_profile(1.0, 2.0, 20.0, 1000.0, 50.0)), "exploding_signal")

    assert finding.failing
    assert finding.layers == ["fc3", "fc4", "fc5"]
    assert finding.message == (
        "exploding signal: the forward signal blows up: the input of fc3 has 20 times the std of fc1's input "
        "(> max_signal 10), the first above the bound; highest 1e+03 at the input of fc4"
    )
    assert finding.value == 1000.0


def test_the_output_counts_for_exploding_signal_but_is_not_a_layer():
    # The output's std over the first layer's input's: 60 / 2 = 30.
    finding = only(check(signal_profile(2.0, 2.0, output_std=60.0)), "exploding_signal")

    assert finding.failing
    assert finding.layers == []
    assert "the output has 30 times the std of fc1's input (> max_signal 10)" in finding.message
    assert finding.value == 30.0

    assert not of_rule(check(signal_profile(2.0, 2.0, output_std=20.0)), "exploding_signal")


def test_max_signal_off_and_raised_keep_a_growing_signal_passing():
    profile = signal_profile(1.0, 40.0, output_std=400.0)

    assert only(check(profile), "exploding_signal").failing
    assert not of_rule(check(profile, max_signal="off"), "exploding_signal")
    assert not of_rule(check(profile, max_signal=400.0), "exploding_signal")
    assert of_rule(check(profile, max_signal=399.0), "exploding_signal")


# ---------------------------------------------------------------- loss at init


def classifier(expected_loss: float | None, *, classes: int = 10, share: float = 1.0, **fields) -> GradientProfile:
    return make_profile(
        0.5,
        1.0,
        output_classes=classes,
        output_softmax_share=share,
        expected_loss=expected_loss,
        output_std=fields.pop("output_std", 12.5),
        loss_kind="loss_fn",
        **fields,
    )


def test_loss_at_init_fails_strictly_above_max_initial_loss_times_chance():
    expected = 7.0
    factor = expected / math.log(10)

    assert not of_rule(check(classifier(expected), max_initial_loss=factor), "loss_at_init")
    finding = only(check(classifier(expected), max_initial_loss=below(factor)), "loss_at_init")
    assert finding.failing
    assert finding.value == factor


def test_loss_at_init_message_states_the_loss_the_chance_level_and_the_logits_std():
    finding = only(check(classifier(30.0)), "loss_at_init")

    assert finding.failing
    assert finding.layers == []
    assert finding.message == (
        "loss at init: the cross-entropy of the initial logits against a random label is 30, 13 times the "
        "chance level ln(10) = 2.3 (> max_initial_loss 10): the logits are far too large at init "
        "(their std is 12.5), so the softmax is saturated"
    )
    assert finding.value == pytest.approx(30.0 / math.log(10))
    assert finding.bound == 10.0


def test_loss_at_init_only_judges_a_softmax_cross_entropy():
    assert of_rule(check(classifier(30.0, share=0.5)), "loss_at_init")  # the share counts from 0.5 up
    assert not of_rule(check(classifier(30.0, share=0.49)), "loss_at_init")  # a regression or random loss
    assert not of_rule(check(classifier(30.0, share=None)), "loss_at_init")
    assert not of_rule(check(classifier(30.0, classes=1)), "loss_at_init")
    assert not of_rule(check(classifier(None)), "loss_at_init")
    assert not of_rule(check(classifier(20.0)), "loss_at_init")  # 8.7x chance: within the default 10x
    assert not of_rule(check(classifier(1e6), max_initial_loss="off"), "loss_at_init")


# ---------------------------------------------------------------- through time


def timed(*profiles: TimeProfile) -> GradientProfile:
    return make_profile(0.5, 1.0, time=list(profiles))


@pytest.mark.parametrize(
    ("earliest", "rule"),
    [
        (MIN_TIME, None),
        (below(MIN_TIME), "vanishing_in_time"),
        (MAX_TIME, None),
        (above(MAX_TIME), "exploding_in_time"),
        (1.0, None),
    ],
    ids=["at-min", "below-min", "at-max", "above-max", "flat"],
)
def test_time_bounds_are_strict(earliest, rule):
    steps = TimeProfile("rnn", "RNN", [earliest, 1.0])
    found = [finding for finding in check(timed(steps)) if finding.rule.endswith("_in_time")]

    assert [finding.rule for finding in found] == ([rule] if rule else [])
    if rule:
        assert found[0].failing
        assert found[0].layers == ["rnn"]
        assert found[0].value == earliest


def test_vanishing_in_time_says_how_many_steps_back_it_crosses_the_bound():
    # Latest first, going back: 1, 1, 0.5, 1e-9 (crosses 2**-24 three steps back), 1e-12.
    steps = TimeProfile("encoder.rnn", "LSTM", [1e-12, 1e-9, 0.5, 1.0, 1.0])
    finding = only(check(timed(steps)), "vanishing_in_time")

    assert steps_back_to(steps, MIN_TIME, "vanishing") == 3
    assert finding.message == (
        "vanishing in time: the gradient reaching the earliest of the 5 steps of encoder.rnn (LSTM) is 1e-12 "
        "times the latest step's (< min_time_ratio 5.96e-08); it crosses the bound 3 steps back, 0.001x per step"
    )


def test_exploding_in_time_states_the_step_count_and_rate():
    # Latest first, going back: 1, 1e3, 1e10 (crosses 2**24 two steps back), 1e20, 1e30.
    steps = TimeProfile("cell", "RNNCell", [1e30, 1e20, 1e10, 1e3, 1.0])
    finding = only(check(timed(steps)), "exploding_in_time")

    assert steps_back_to(steps, MAX_TIME, "exploding") == 2
    assert "the earliest of the 5 steps of cell (RNNCell) is 1e+30 times the latest step's" in finding.message
    assert "(> max_time_ratio 1.68e+07); it crosses the bound 2 steps back, 3.16e+07x per step" in finding.message


def test_a_gradient_that_underflowed_to_zero_still_vanishes_in_time():
    steps = TimeProfile("rnn", "RNN", [0.0, 0.0, 1e-9, 1.0])
    finding = only(check(timed(steps)), "vanishing_in_time")

    assert finding.value == 0.0
    assert "of rnn (RNN) is exactly 0 times (it underflows) the latest step's" in finding.message
    # The rate is read over the steps the gradient still reaches, not from the zero.
    assert finding.message.endswith("it crosses the bound 1 steps back, 1e-09x per step")


def test_each_recurrent_layer_is_judged_on_its_own():
    findings = check(
        timed(
            TimeProfile("gru", "GRU", [0.1, 1.0]),
            TimeProfile("rnn", "RNN", [1e-10, 1.0]),
            TimeProfile("cell", "RNNCell", [1e10, 1.0]),
        )
    )

    assert [(finding.rule, finding.layers) for finding in findings] == [
        ("vanishing_in_time", ["rnn"]),
        ("exploding_in_time", ["cell"]),
    ]


@pytest.mark.parametrize(
    "steps",
    [[1e-10], [1e-10, 0.0], [math.nan, 1e-10, 1.0], [1e-10, math.inf, 1.0], []],
    ids=["one-step", "latest-zero", "nan", "inf", "empty"],
)
def test_no_time_finding_without_a_ratio(steps):
    profile = TimeProfile("rnn", "RNN", steps)

    assert profile.ratio is None
    assert profile.per_step is None
    assert check(timed(profile)) == []


def test_time_profile_ratio_and_per_step():
    steps = TimeProfile("rnn", "RNN", [1 / 8, 1 / 4, 1 / 2, 1.0])

    assert steps.ratio == 1 / 8
    assert steps.per_step == pytest.approx(1 / 2)
    assert steps.reached == 3


@pytest.mark.parametrize(
    ("steps", "per_step", "reached"),
    [([0.0, 1 / 4, 1 / 2, 1.0], 1 / 2, 2), ([0.0, 0.0, 1 / 8, 1.0], 1 / 8, 1), ([0.0, 1.0], 0.0, 0)],
)
def test_per_step_is_read_over_the_steps_the_gradient_still_reaches(steps, per_step, reached):
    profile = TimeProfile("rnn", "RNN", steps)

    assert profile.ratio == 0.0
    assert profile.per_step == pytest.approx(per_step)
    assert profile.reached == reached


def test_time_bounds_off_and_moved():
    vanishing = timed(TimeProfile("rnn", "RNN", [1e-10, 1.0]))
    exploding = timed(TimeProfile("rnn", "RNN", [1e10, 1.0]))

    assert check(vanishing, min_time_ratio="off") == []
    assert check(exploding, max_time_ratio="off") == []
    assert check(vanishing, min_time_ratio=1e-10) == []
    assert of_rule(check(vanishing, min_time_ratio=1.1e-10), "vanishing_in_time")
    assert of_rule(check(timed(TimeProfile("rnn", "RNN", [0.05, 1.0])), min_time_ratio=0.1), "vanishing_in_time")


# ---------------------------------------------------------------- the new bounds


@pytest.mark.parametrize(("low", "high"), [("min_signal", "max_signal"), ("min_time_ratio", "max_time_ratio")])
def test_bounds_reject_a_minimum_above_its_maximum(low, high):
    with pytest.raises(SettingError, match=rf"{low}=3\.0 is above {high}=2\.0; no model could pass") as error:
        resolve({low: 3.0, high: 2.0})
    assert error.value.setting == low

    assert resolve({low: 2.0, high: 2.0}) == Bounds(**{low: 2.0, high: 2.0})  # equal is allowed
    assert getattr(resolve({low: 3.0, high: "off"}), low) == 3.0  # one side off: nothing to contradict
    with pytest.raises(SettingError, match=f"{low}=.* is above {high}="):
        check(make_profile(0.5, 1.0), **{low: 3.0, high: 2.0})


def test_a_minimum_above_the_default_maximum_is_rejected_too():
    with pytest.raises(SettingError, match=r"min_signal=20\.0 is above max_signal=10\.0"):
        resolve({"min_signal": 20})
    with pytest.raises(SettingError, match=r"min_time_ratio=.* is above max_time_ratio="):
        resolve({"min_time_ratio": 2.0**25})


@pytest.mark.parametrize("name", NEW_BOUNDS)
def test_the_new_bounds_parse_like_the_others(name):
    assert name in BOUND_NAMES
    assert (name, f"--grad-{name.replace('_', '-')}") in [(bound, flag) for bound, flag, _ in BOUND_OPTIONS]
    assert parse_bound(name, "off") is None
    assert parse_bound(name, " 1e-3 ") == 1e-3
    assert parse_bound(name, 2) == 2.0
    with pytest.raises(SettingError, match=f"{name} must be a non-negative number or 'off'"):
        parse_bound(name, "-1")
    with pytest.raises(SettingError, match=f"{name} must be a number or 'off', got 'lots'"):
        parse_bound(name, "lots")
    assert getattr(resolve({name: "off"}), name) is None


# ---------------------------------------------------------------- fairness: repeated blocks


def blocks_profile(count: int = 4, per_block: tuple[str, ...] = ("fc1", "fc2"), **last_block) -> GradientProfile:
    """A stem, ``count`` blocks blocks.<i>.<layer> (gradients 1e-3 each) and a head (gradient 1.0)."""
    layers = [make_layer("stem", 1e-3)]
    for index in range(count):
        for part in per_block:
            fields = last_block if index == count - 1 and part == "fc1" else {}
            layers.append(make_layer(f"blocks.{index}.{part}", 1e-3 * (index + 1), **fields))
    layers.append(make_layer("head", 1.0))
    return make_profile(*layers, names=[layer.name for layer in layers])


def test_stack_copy_finds_the_same_layer_in_the_last_block():
    profile = blocks_profile(4)

    copy = stack_copy(profile, profile.layer("blocks.0.fc1"))

    assert copy is not None
    assert copy.copy.name == "blocks.3.fc1"
    assert copy.blocks == 4
    assert copy.ratio == pytest.approx(1e-3 / 4e-3)
    assert stack_copy(profile, profile.layer("blocks.1.fc2")).copy.name == "blocks.3.fc2"


def test_stack_copy_of_a_layer_outside_any_stack_or_in_the_last_block_is_none():
    profile = blocks_profile(4)

    assert stack_copy(profile, profile.layer("stem")) is None
    assert stack_copy(profile, profile.layer("head")) is None
    assert stack_copy(profile, profile.layer("blocks.3.fc1")) is None


def test_two_blocks_are_a_stack_but_one_is_not():
    two = blocks_profile(2)
    assert stack_copy(two, two.layer("blocks.0.fc1")).copy.name == "blocks.1.fc1"

    one = blocks_profile(1)
    assert stack_copy(one, one.layer("blocks.0.fc1")) is None


def test_a_sequential_of_single_layers_is_not_a_stack_of_blocks():
    mlp = make_profile(1e-3, 1e-3, 1e-3, 1.0, names=["net.0", "net.2", "net.4", "net.6"])
    assert stack_copy(mlp, mlp.layer("net.0")) is None

    # Blocks of one weight layer each (Sequential(Sequential(Linear, ReLU), ...)) are not either.
    nested = blocks_profile(4, per_block=("0",))
    assert stack_copy(nested, nested.layer("blocks.0.0")) is None

    # A block's norm has no weight matrix: it does not make the block a stack member.
    with_norm = blocks_profile(4, per_block=("fc", "norm"))
    for layer in with_norm.layers:
        if layer.name.endswith(".norm"):
            layer.has_matrix = False
    assert stack_copy(with_norm, with_norm.layer("blocks.0.fc")) is None


@pytest.mark.parametrize("different", [{"kind": "Conv2d"}, {"numel": 999}], ids=["kind", "numel"])
def test_a_copy_must_have_the_same_kind_and_size(different):
    profile = blocks_profile(4, **different)
    copy = stack_copy(profile, profile.layer("blocks.0.fc1"))
    assert copy.copy.name == "blocks.2.fc1"  # the last block's fc1 differs: the one before is the last copy
    assert copy.blocks == 3

    two = blocks_profile(2, **different)
    assert stack_copy(two, two.layer("blocks.0.fc1")) is None


@pytest.mark.parametrize("unpickable", [{"gate": 1e-4}, {"is_norm": True}, {"received_grad": False}])
def test_no_copy_when_the_last_one_cannot_be_compared(unpickable):
    profile = blocks_profile(4, **unpickable)

    assert stack_copy(profile, profile.layer("blocks.0.fc1")) is None


# ---------------------------------------------------------------- fairness: gates, scale invariance, inputs


def test_smallest_gate_ignores_exact_zeros_and_groups_equal_holders():
    assert smallest_gate(make_profile(1.0, 1.0)) is None
    assert smallest_gate(make_profile(make_layer("bn", gate=0.0), make_layer("fc"))) is None

    profile = make_profile(
        make_layer("zero", gate=0.0),
        make_layer("ls1", gate=1e-5),
        make_layer("ls2", gate=1e-4),
        make_layer("ls3", gate=1e-5 * (1 + 1e-8)),
        make_layer("fc"),
    )
    value, holders = smallest_gate(profile)
    assert value == 1e-5
    assert holders == ["ls1", "ls3"]


@pytest.mark.parametrize(
    ("cosine", "normalised", "invariant"),
    [
        (None, True, False),
        (below(1e-3), False, True),  # only exact invariance reads below 1e-3 of the chance level
        (1e-3, False, False),
        (1e-3, True, True),  # feeding a norm, up to half the chance level counts
        (below(0.5), True, True),
        (0.5, True, False),
        (0.05, None, False),
        (0.8, True, False),
    ],
)
def test_scale_invariance_thresholds(cosine, normalised, invariant):
    assert (SCALE_INVARIANT, SCALE_INVARIANT_FED) == (1e-3, 0.5)
    layer = make_layer("conv", scale_invariance=cosine, normalised=normalised)

    assert is_scale_invariant(layer) is invariant


def test_backward_ratio_takes_the_forward_signal_out_of_the_ratio():
    profile = make_profile(signal_layer("fc1", 2.0, 1e-3), signal_layer("fc2", 50.0, 1.0))

    assert profile.ratio == 1e-3
    assert backward_ratio(profile) == pytest.approx(1e-3 * 50.0 / 2.0)


@pytest.mark.parametrize(
    ("first_std", "last_std"), [(None, 1.0), (1.0, None), (0.0, 1.0), (1.0, 0.0), (math.nan, 1.0), (1.0, math.nan)]
)
def test_backward_ratio_needs_both_inputs(first_std, last_std):
    profile = make_profile(signal_layer("fc1", first_std, 1e-3), signal_layer("fc2", last_std, 1.0))

    assert backward_ratio(profile) is None


def test_backward_ratio_without_a_finite_ratio_is_none():
    assert backward_ratio(make_profile(signal_layer("fc1", 1.0))) is None
    infinite = make_profile(signal_layer("fc1", 1.0, math.inf, finite=False), signal_layer("fc2", 1.0))
    assert backward_ratio(infinite) is None


# ---------------------------------------------------------------- fairness: what check() makes of each


def ratio_finding(findings: list[Finding]) -> Finding:
    found = [finding for finding in findings if finding.rule in ("vanishing", "exploding")]
    assert len(found) == 1, [finding.message for finding in findings]
    return found[0]


def test_a_ratio_explained_by_the_forward_signal_does_not_fail():
    explained = make_profile(signal_layer("fc1", 1.0, 1e-3), signal_layer("fc2", 100.0, 1.0))
    finding = ratio_finding(check(explained))
    assert not finding.failing
    assert "fc2's input has 100 times the std of fc1's" in finding.message
    assert "the backward signal itself changes by 0.1, not below min_ratio" in finding.message
    assert finding.message.endswith("; not failing")

    unmeasured = make_profile(make_layer("fc1", 1e-3), make_layer("fc2", 1.0))
    assert ratio_finding(check(unmeasured)).failing
    # The forward signal explains only part of it: 1e-3 x 2 is still below min_ratio.
    partly = make_profile(signal_layer("fc1", 1.0, 1e-3), signal_layer("fc2", 2.0, 1.0))
    assert ratio_finding(check(partly)).failing


@pytest.mark.parametrize(("last_input", "fails"), [(2.0**6, False), (below(2.0**6), True)])
def test_the_backward_ratio_is_held_to_min_ratio_inclusively(last_input, fails):
    # ratio 2**-10 and a last input 2**6 times the first's: the backward signal changes by 2**-4 = min_ratio.
    profile = make_profile(signal_layer("fc1", 1.0, 2.0**-10), signal_layer("fc2", last_input, 1.0))

    assert ratio_finding(check(profile, min_ratio=2.0**-4, max_signal="off")).failing is fails


def test_a_vanishing_ratio_whose_forward_signal_overshoots_is_left_to_the_signal_rule():
    # The backward signal grows 100x (above max_ratio), so it did not vanish; the input's 1e5 growth fails instead.
    findings = check(make_profile(signal_layer("fc1", 1.0, 1e-3), signal_layer("fc2", 1e5, 1.0)))

    assert not ratio_finding(findings).failing
    assert only(findings, "exploding_signal").failing


def test_an_exploding_ratio_of_a_scale_invariant_first_layer_does_not_fail():
    invariant = make_profile(make_layer("conv", 100.0, scale_invariance=1e-4), make_layer("fc", 1.0))
    finding = ratio_finding(check(invariant))
    assert finding.rule == "exploding"
    assert not finding.failing
    assert "conv's weights are scale-invariant" in finding.message
    assert "not failing" in finding.message

    ordinary = make_profile(make_layer("conv", 100.0, scale_invariance=0.8), make_layer("fc", 1.0))
    assert ratio_finding(check(ordinary)).failing
    # Only a large gradient corrects itself; a vanishing one is still vanishing.
    vanishing = make_profile(make_layer("conv", 1e-3, scale_invariance=1e-4), make_layer("fc", 1.0))
    assert ratio_finding(check(vanishing)).failing


def test_a_ratio_the_stack_keeps_does_not_fail_but_a_plain_chain_does():
    stacked = blocks_profile(4)  # stem 1e-3 ... head 1.0: ratio 1e-3, blocks.0.fc1/blocks.3.fc1 = 0.25
    first = stacked.first
    assert first.name == "stem"

    # The stem is not in the stack; make the stack's first layer the first pick.
    stacked.layers.pop(0)
    finding = ratio_finding(check(stacked))
    assert stacked.first.name == "blocks.0.fc1"
    assert not finding.failing
    assert "blocks.0.fc1 and its copy in the last of 4 repeated blocks, blocks.3.fc1, read 0.25" in finding.message
    assert "not failing" in finding.message

    chain = make_profile(*[layer.grad_mean_abs for layer in stacked.layers])  # the same numbers, fc1...fc9
    assert ratio_finding(check(chain)).failing
    # A copy ratio out of bounds explains nothing.
    assert ratio_finding(check(stacked, min_ratio=0.5)).failing


def test_a_ratio_within_the_gates_reach_does_not_fail():
    def gated(first: float, gate: float | None) -> GradientProfile:
        return make_profile(
            make_layer("fc1", first),
            make_layer("ls", 1.0, has_matrix=False, kind="LayerScale", numel=64, gate=gate),
            make_layer("fc2", 1.0),
        )

    # min_ratio 0.5 and a gate of 2**-10: ratios down to 2**-11 are the gate's.
    at_reach = ratio_finding(check(gated(2.0**-11, 2.0**-10), min_ratio=0.5))
    assert not at_reach.failing
    assert "holds gains at the constant 0.00098 at init (ls: LayerScale" in at_reach.message
    assert "not failing" in at_reach.message

    assert ratio_finding(check(gated(below(2.0**-11), 2.0**-10), min_ratio=0.5)).failing
    assert ratio_finding(check(gated(2.0**-11, None), min_ratio=0.5)).failing
    # A gate explains a small gradient, never a large one.
    assert ratio_finding(check(gated(1e6, 2.0**-10))).failing


# ---------------------------------------------------------------- reports


def test_the_table_has_a_signal_column_and_a_line_per_recurrent_layer():
    profile = signal_profile(1.0, 0.5, 1e-7, time=[TimeProfile("rnn", "GRU", [0.25, 0.5, 1.0])])
    text = render_table(profile, check(profile))

    header = text.splitlines()[1]
    assert SIGNAL_HEADER in header.split()
    row = next(line for line in text.splitlines() if line.split()[:2] == ["2", "fc3"])
    assert "1e-07" in row.split()
    assert time_lines(profile) == [
        "  time: rnn (GRU, 3 steps): the gradient at the earliest step is 0.25 of the latest step's, 0.5x per step back"
    ]
    assert time_lines(profile)[0] in text.splitlines()

    plain = make_profile(1.0, 1.0)
    assert SIGNAL_HEADER not in render_table(plain, []).splitlines()[1].split()
    assert time_lines(plain) == []
