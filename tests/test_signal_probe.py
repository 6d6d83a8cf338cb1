"""What the probe measures for the signal rules, on small real models; the rules through the plugin; their causes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.output import report_section
from signal_networks import ResidualMLP, SequenceClassifier
from torch import nn

from pytest_gradcheck import assess, check, probe
from pytest_gradcheck.core.fairness import is_scale_invariant
from pytest_gradcheck.core.signal import signal_curve, steps_back_to

MIN_TIME_RATIO = 2.0**-24


def rules(findings) -> list[str]:
    return [finding.rule for finding in findings]


def plain_net(depth: int, width: int, activation: type[nn.Module], init: str) -> nn.Sequential:
    """``depth`` Linear(width, width) + activation blocks, then a Linear head to 10 classes; biases zero."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        if init == "xavier":
            nn.init.xavier_normal_(linear.weight)
        elif init == "kaiming":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        else:  # tiny: 0.3 of the std that keeps a linear layer's scale
            nn.init.normal_(linear.weight, std=0.3 / math.sqrt(width))
        nn.init.zeros_(linear.bias)
        layers += [linear, activation()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


# ---------------------------------------------------------------- the forward signal


def test_input_std_is_the_std_of_each_layers_first_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    inputs = 3.0 * torch.randn(16, 8)

    profile = probe(model, inputs)

    with torch.no_grad():
        hidden = torch.relu(model[0](inputs))
    assert profile.layer("0").input_std == pytest.approx(inputs.std(unbiased=False).item(), rel=1e-5)
    assert profile.layer("2").input_std == pytest.approx(hidden.std(unbiased=False).item(), rel=1e-5)
    assert [layer.role for layer in profile.layers] == ["layer", "layer"]


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_a_deep_plain_net_with_tiny_init_has_a_falling_signal(activation):
    torch.manual_seed(0)

    profile = probe(plain_net(20, 32, activation, "tiny"), torch.randn(16, 32))

    curve = signal_curve(profile)
    values = [value for _, value in curve]
    assert len(curve) == 21  # the 20 hidden layers and the head
    assert values[0] == 1.0
    assert all(later < earlier for earlier, later in itertools.pairwise(values)), values
    assert values[-1] < 1e-8
    (finding,) = [finding for finding in check(profile) if finding.rule == "vanishing_signal"]
    assert finding.failing
    assert finding.layers[-1] == "40"  # the head's input is where it is judged
    assert finding.value == pytest.approx(values[-1])


# ---------------------------------------------------------------- scale invariance and normalisation


def test_a_conv_followed_by_batch_norm_is_scale_invariant_and_a_plain_linear_is_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 5))
    model.train()
    inputs = torch.randn(4, 3, 8, 8)

    profile = probe(model, inputs)

    conv, norm, head = profile.layer("0"), profile.layer("1"), profile.layer("4")
    assert conv.scale_invariance < 1e-3  # rounding only: BN removes the weight's scale exactly
    assert conv.normalised
    assert is_scale_invariant(conv)
    with torch.no_grad():
        assert conv.output_std == pytest.approx(model[0](inputs).std(unbiased=False).item(), rel=1e-4)
    assert norm.scale_invariance is None  # a norm layer is not a weight layer
    assert 0.1 < head.scale_invariance < 10.0  # an ordinary weight: about its chance level
    assert not head.normalised
    assert head.output_std is None
    assert not is_scale_invariant(head)


def test_a_plain_mlps_weights_read_about_their_chance_level():
    torch.manual_seed(0)

    profile = probe(nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5)), torch.randn(16, 20))

    for layer in profile.layers:
        assert 0.1 < layer.scale_invariance < 10.0, layer
        assert not layer.normalised


def test_a_conv_reaches_batch_norm_through_a_relu():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(512, 5)
    )
    inputs = torch.randn(4, 3, 8, 8)

    profile = probe(model, inputs)

    conv = profile.layer("0")
    assert conv.normalised is True
    assert conv.scale_invariance < 1e-3  # ReLU is positively homogeneous: still exactly invariant
    with torch.no_grad():
        assert conv.output_std == pytest.approx(torch.relu(model[0](inputs)).std(unbiased=False).item(), rel=1e-4)

    unnormalised = probe(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 5)), inputs)
    assert unnormalised.layer("0").normalised is False


# ---------------------------------------------------------------- gates


class LayerScale(nn.Module):
    def __init__(self, dim: int, value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), value))

    def forward(self, x):
        return x * self.gamma


class ScaledResidual(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.scale = LayerScale(16, value)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x + self.scale(torch.relu(self.fc(x))))


@pytest.mark.parametrize(("value", "gate"), [(1e-5, 1e-5), (-1e-4, 1e-4), (1e-3, 1e-3), (1e-2, None), (1.0, None)])
def test_a_layer_scale_gain_is_read_as_a_gate_up_to_1e_minus_3(value, gate):
    torch.manual_seed(0)

    profile = probe(ScaledResidual(value), torch.randn(8, 16))

    found = profile.layer("scale").gate
    if gate is None:
        assert found is None
    else:
        assert found == pytest.approx(gate, rel=1e-6)
    assert profile.layer("fc").gate is None
    assert profile.layer("head").gate is None


class ZeroGammaBlock(nn.Module):
    """A residual conv block whose BN gamma starts at zero (Goyal et al. 2017)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        nn.init.zeros_(self.bn.weight)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head((x + self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_a_zero_batch_norm_gamma_is_a_zero_gate():
    torch.manual_seed(0)

    profile = probe(ZeroGammaBlock(), torch.randn(4, 4, 6, 6))

    assert profile.layer("bn").gate == 0.0
    assert profile.layer("conv").dead  # behind the zero gate
    assert profile.layer("head").gate is None
    findings = check(profile)
    assert rules(findings) == ["zero_init"]
    assert not findings[0].failing
    assert findings[0].layers == ["conv"]


# ---------------------------------------------------------------- the output and the loss


CLASSES = 10


def small_logits_classifier() -> nn.Linear:
    model = nn.Linear(32, CLASSES)
    nn.init.normal_(model.weight, std=1e-4)
    nn.init.zeros_(model.bias)
    return model


class ReturnsItsLoss(nn.Module):
    def __init__(self, labels: torch.Tensor):
        super().__init__()
        self.fc = small_logits_classifier()
        self.labels = labels

    def forward(self, x):
        logits = self.fc(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, self.labels)}


@pytest.mark.parametrize(
    ("how", "kind", "share"),
    [
        ("cross_entropy", "loss_fn", 1.0),
        ("default", "random", 0.0),
        ("mse", "loss_fn", 0.0),
        # sigmoid(z) - y: one negative entry per row like p - y, but the rows do not sum to zero.
        ("binary_cross_entropy", "loss_fn", 0.0),
        ("model", "model", 1.0),
    ],
)
def test_loss_kind_softmax_share_and_expected_loss(how, kind, share):
    torch.manual_seed(0)
    inputs, labels = torch.randn(64, 32), torch.randint(0, CLASSES, (64,))
    model = ReturnsItsLoss(labels) if how == "model" else small_logits_classifier()
    loss_fn = {
        "cross_entropy": lambda output: F.cross_entropy(output, labels),
        "mse": lambda output: output.pow(2).mean(),
        "binary_cross_entropy": lambda output: F.binary_cross_entropy_with_logits(
            output, F.one_hot(labels, CLASSES).float()
        ),
    }.get(how)

    profile = probe(model, inputs, loss_fn=loss_fn)

    assert profile.loss_kind == kind
    assert profile.output_softmax_share == pytest.approx(share, abs=0.02)
    assert profile.under_softmax_loss is (share == 1.0)
    assert profile.output_classes == CLASSES
    # Near-zero logits: the cross-entropy against a random label is the chance level; under the
    # default random direction, which is no softmax's, it is not measured.
    if kind == "random":
        assert profile.expected_loss is None
    else:
        assert profile.expected_loss == pytest.approx(math.log(CLASSES), rel=1e-4)
    assert profile.output_std < 1e-2
    assert profile.output_layer == ("fc" if how == "model" else "")


def test_large_logits_under_cross_entropy_fail_the_loss_at_init():
    torch.manual_seed(0)
    model = nn.Linear(32, CLASSES)
    nn.init.normal_(model.weight, std=10.0)
    inputs, labels = torch.randn(64, 32), torch.randint(0, CLASSES, (64,))

    profile = probe(model, inputs, loss_fn=lambda output: F.cross_entropy(output, labels))

    with torch.no_grad():
        logits = model(inputs)
    expected = (torch.logsumexp(logits, dim=-1) - logits.mean(dim=-1)).mean().item()
    assert profile.expected_loss == pytest.approx(expected, rel=1e-5)
    assert profile.expected_loss / math.log(CLASSES) > 10
    assert "loss_at_init" in rules(check(profile))
    # Under the default random-direction loss the logits are not a softmax's: no such rule.
    assert "loss_at_init" not in rules(check(probe(model, inputs)))


# ---------------------------------------------------------------- through time


class Recurrent(nn.Module):
    def __init__(self, cell: str, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(nn, cell)(3, 16, batch_first=batch_first)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        states = self.rnn(x)[0]
        return self.head(states[:, -1] if self.batch_first else states[-1])


STEPS, BATCH = 7, 5


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "time-first"])
@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
def test_a_fused_recurrent_layer_gets_one_gradient_per_time_step(cell, batch_first):
    torch.manual_seed(0)
    model = Recurrent(cell, batch_first)
    inputs = torch.randn(BATCH, STEPS, 3) if batch_first else torch.randn(STEPS, BATCH, 3)

    def loss_fn(output):
        return output.pow(2).sum()

    profile = probe(model, inputs, loss_fn=loss_fn)

    (steps,) = profile.time
    assert (steps.layer, steps.kind) == ("rnn", cell)
    assert len(steps.steps) == STEPS
    # Each step: the mean |gradient| reaching that step of the input sequence.
    sequence = inputs.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(model(sequence)), sequence)
    expected = grad.abs().mean(dim=(0, 2) if batch_first else (1, 2))
    assert steps.steps == pytest.approx(expected.tolist(), rel=1e-4)
    assert steps.ratio < 1.0  # less reaches the earliest step than the latest


class CellLoop(nn.Module):
    """An nn.RNNCell unrolled by hand over the first dimension of its input, from a zero or a learned state."""

    def __init__(self, learned_start: bool = False):
        super().__init__()
        self.cell = nn.RNNCell(8, 16)
        self.head = nn.Linear(16, 2)
        self.start = nn.Parameter(torch.zeros(16)) if learned_start else None

    def forward(self, x):
        state = torch.zeros(x.shape[1], 16) if self.start is None else self.start.expand(x.shape[1], 16)
        for step in x:
            state = self.cell(step, state)
        return self.head(state)


@pytest.mark.parametrize("learned_start", [False, True], ids=["zero-start", "learned-start"])
def test_a_cell_called_in_a_loop_is_followed_through_time(learned_start):
    torch.manual_seed(0)

    profile = probe(CellLoop(learned_start), torch.randn(7, 4, 8))

    (steps,) = profile.time
    assert (steps.layer, steps.kind) == ("cell", "RNNCell")
    assert len(steps.steps) >= 4
    assert all(math.isfinite(value) and value > 0 for value in steps.steps)
    assert steps.ratio < 1.0


def test_a_cell_whose_every_state_carries_a_gradient_gets_one_step_per_call_from_four_calls():
    torch.manual_seed(0)

    four = probe(CellLoop(learned_start=True), torch.randn(4, 4, 8))
    three = probe(CellLoop(learned_start=True), torch.randn(3, 4, 8))

    assert [(steps.layer, len(steps.steps)) for steps in four.time] == [("cell", 4)]
    assert three.time == []


@pytest.mark.xfail(
    strict=True,
    reason="a cell loop from a constant zero state: the first call's input and state carry no gradient, so "
    "its profile has one step fewer than the loop's time steps, and a 4-step loop gets none",
)
@pytest.mark.parametrize("length", [4, 7])
def test_a_cell_loop_from_a_zero_state_gets_one_gradient_per_time_step(length):
    torch.manual_seed(0)

    profile = probe(CellLoop(), torch.randn(length, 4, 8))

    assert [len(steps.steps) for steps in profile.time] == [length]


def test_a_tanh_rnn_over_200_steps_vanishes_through_time_and_a_gru_over_20_does_not():
    torch.manual_seed(0)
    rnn = probe(SequenceClassifier("RNN"), torch.randn(8, 200, 16))
    torch.manual_seed(0)
    gru = probe(SequenceClassifier("GRU"), torch.randn(8, 20, 16))

    (rnn_steps,) = rnn.time
    assert len(rnn_steps.steps) == 200
    assert rnn_steps.ratio < MIN_TIME_RATIO
    finding = next(finding for finding in check(rnn) if finding.rule == "vanishing_in_time")
    assert finding.failing
    assert finding.layers == ["rnn"]
    assert f"it crosses the bound {steps_back_to(rnn_steps, MIN_TIME_RATIO, 'vanishing')} steps back" in (
        finding.message
    )

    (gru_steps,) = gru.time
    assert len(gru_steps.steps) == 20
    assert MIN_TIME_RATIO < gru_steps.ratio < 1.0
    assert not [finding for finding in check(gru) if finding.rule.endswith("_in_time")]


# ---------------------------------------------------------------- the causes


def test_xavier_init_in_a_relu_net_is_named_with_its_factor():
    torch.manual_seed(0)

    assessment = assess(plain_net(36, 64, nn.ReLU, "xavier"), torch.randn(32, 64))

    assert assessment.verdict == "vanishing_signal"
    (finding,) = assessment.failing
    cause = finding.causes[0]
    assert cause.cause == "initialisation"
    assert "This is Xavier's scale (gain 1)" in cause.summary
    # fan_in = fan_out: Xavier's std is 1/sqrt(2) of what a ReLU needs (Kaiming's).
    factor = cause.evidence["per_layer_factor"]
    assert factor == pytest.approx(1 / math.sqrt(2), rel=0.05)
    assert f"about {factor:.3g}x the scale that keeps the signal for the relu after them" in cause.summary
    assert "kaiming_normal_" in cause.fix

    torch.manual_seed(0)
    assert assess(plain_net(36, 64, nn.ReLU, "kaiming"), torch.randn(32, 64)).verdict == "healthy"


def test_residual_branches_without_normalisation_are_named_with_the_depth():
    torch.manual_seed(0)

    assessment = assess(ResidualMLP(blocks=10, normalise=False))

    assert assessment.verdict == "exploding_signal"
    (finding,) = assessment.failing
    cause = finding.causes[0]
    assert cause.cause == "residual"
    assert cause.summary.startswith("residual branches summed without normalisation")
    # The stem, two layers in each of the 10 blocks, and the head.
    assert cause.evidence["longest_chain"] == 22
    assert "over a longest path of 22 weight layers" in cause.summary

    torch.manual_seed(0)
    assert assess(ResidualMLP(blocks=10, normalise=True)).verdict == "healthy"


@pytest.fixture(scope="module")
def long_tanh_rnn():
    torch.manual_seed(0)
    return assess(SequenceClassifier("RNN"), torch.randn(8, 200, 16))


def test_a_long_recurrence_is_named_with_the_step_it_crosses_the_bound(long_tanh_rnn):
    assert long_tanh_rnn.verdict == "vanishing_in_time"
    (finding,) = long_tanh_rnn.failing
    cause = finding.causes[0]
    crossed = steps_back_to(long_tanh_rnn.profile.time[0], MIN_TIME_RATIO, "vanishing")

    assert cause.cause == "recurrence"
    assert cause.summary.startswith("recurrence: rnn (RNN) runs 200 steps")
    assert 0 < crossed < 200
    assert cause.evidence["steps_back_to_bound"] == crossed
    assert f"it crosses the bound {crossed} steps back" in cause.summary
    assert f"backpropagate through at most {crossed} steps (truncated BPTT)" in cause.fix


def test_a_long_recurrences_cause_states_the_per_step_factor_the_gradient_still_shows(long_tanh_rnn):
    # The earliest steps' gradient underflows to exactly 0 in float32: the rate is read before that.
    steps = long_tanh_rnn.profile.time[0]
    assert steps.ratio == 0.0
    (finding,) = long_tanh_rnn.failing
    cause = finding.causes[0]

    factor = cause.evidence["per_step_factor"]
    assert 0.3 < factor < 0.9
    assert factor == pytest.approx(steps.per_step)
    assert f"{factor:.3g}x per step" in cause.summary
    assert " 0x per step" not in cause.summary


# ---------------------------------------------------------------- through the plugin


MODELS = """
import torch
from torch import nn


class Shrinking(nn.Module):
    # fc1 = I, fc2 = scale * I, fc3 = I: fc3's input has exactly `scale` times the std of fc1's,
    # and every weight gradient is the same matrix, so the first/last ratio is 1.
    def __init__(self, scale):
        super().__init__()
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 8, bias=False)
        self.fc3 = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(8))
            self.fc2.weight.copy_(scale * torch.eye(8))
            self.fc3.weight.copy_(torch.eye(8))

    def forward(self, x):
        return self.fc3(self.fc2(self.fc1(x)))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(3, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])
"""

SIGNAL_TESTS = """
import pytest
import torch
from models import Recurrent, Shrinking


def test_default(gradient_health):
    gradient_health(Shrinking(1e-4))


@pytest.mark.gradient_health(min_signal=1e-5)
def test_lenient_marker(gradient_health):
    gradient_health(Shrinking(1e-4))


@pytest.mark.gradient_health(min_signal=1e-3)
def test_strict_marker(gradient_health):
    gradient_health(Shrinking(1e-4))


def test_recurrent(gradient_health):
    gradient_health(Recurrent(), torch.randn(4, 6, 3))
"""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # min_signal each test ran under, and whether it failed: Shrinking(1e-4) fails when 1e-4 < min_signal.
        ([], {"test_default": 1e-5, "test_lenient_marker": 1e-5, "test_strict_marker": 1e-3}),
        (
            ["--grad-min-signal", "1e-3"],
            {"test_default": 1e-3, "test_lenient_marker": 1e-5, "test_strict_marker": 1e-3},
        ),
    ],
    ids=["defaults", "command-line"],
)
def test_min_signal_from_the_command_line_and_the_marker_moves_the_verdict(pytester, args, expected):
    pytester.makepyfile(models=MODELS, test_signal=SIGNAL_TESTS)

    result = pytester.runpytest("--strict-markers", "-k", "not recurrent", *args)

    applied, failed = {}, set()
    for report in result.reprec.getreports("pytest_runtest_logreport"):
        if report.when == "call":
            test = report.nodeid.split("::")[1]
            applied[test] = report.gradcheck["results"][0]["bounds"]["min_signal"]
            if report.failed:
                failed.add(test)
    assert applied == expected
    assert failed == {test for test, bound in expected.items() if bound > 1e-4}
    result.stdout.fnmatch_lines(
        [
            "E         vanishing_signal: vanishing signal: the forward signal collapses: the input of fc3 has "
            "0.0001 of the std of fc1's input (< min_signal 0.001)",
        ]
    )


def test_grad_report_shows_the_signal_column_and_the_time_line(pytester):
    pytester.makepyfile(models=MODELS, test_signal=SIGNAL_TESTS)

    result = pytester.runpytest("--grad-report", "-k", "default or recurrent")

    result.assert_outcomes(passed=2)
    report = report_section(result.stdout.str())
    lines = report.splitlines()
    headers = [line for line in lines if line.startswith("#") and "layer" in line]
    assert len(headers) == 2
    assert all("signal" in header.split() for header in headers)
    fc3 = next(line for line in lines if line.split()[1:2] == ["fc3"])
    assert "0.0001" in fc3.split()
    # The weak signal is said, not failed.
    assert any(line.startswith("  note vanishing_signal: weak signal: the input of fc3 has 0.0001") for line in lines)
    result.stdout.fnmatch_lines(
        ["  time: rnn (RNN, 6 steps): the gradient at the earliest step is * of the latest step's, *x per step back"]
    )
