"""Diagnosis: each network's first cause, the opt-in activation rules, and what users see."""

import json

import pytest
import torch
from helpers import EXAMPLES
from helpers.models import NegativeBiasNet, PlainReLU, ResidualReLU, SaturatedTanh, UnrolledTanhRNN, fresh
from seed_networks import ReLUNet, SigmoidNet, SmallInitNet
from torch import nn

from pytest_gradcheck import Bounds, assess
from pytest_gradcheck.core.bounds import resolve
from pytest_gradcheck.core.checks import check
from pytest_gradcheck.core.diagnosis import diagnose
from pytest_gradcheck.core.findings import CheckResult, failing


def causes_of(model, rule="vanishing", **bounds):
    torch.manual_seed(0)
    profile, findings = assess(model, bounds=Bounds(**bounds))
    (finding,) = [f for f in findings if f.rule == rule]
    assert finding.failing and finding.causes, finding.message
    return profile, finding.causes


def test_sigmoid_net_first_cause_is_saturating_sigmoids():
    _, causes = causes_of(fresh(SigmoidNet))
    first = causes[0]
    assert first.cause == "saturation"
    evidence = first.evidence
    assert (evidence["function"], evidence["calls"], evidence["derivative_bound"]) == ("sigmoid", 3, 0.25)
    assert evidence["where"] == ["after fc1", "after fc2", "after fc3"]
    assert evidence["chain_factor"] <= 0.25**3
    assert "sigmoid" in first.summary and "ReLU" in first.fix


def test_small_init_net_first_cause_is_initialisation_near_12x():
    _, causes = causes_of(fresh(SmallInitNet))
    first = causes[0]
    assert first.cause == "initialisation"
    evidence = first.evidence
    # std 0.01 against 1/sqrt(64) = 0.125: fan-in 64, no activation (gain 1).
    assert evidence["factor"] == pytest.approx(12.5, rel=0.05)
    assert evidence["reference_std"] == pytest.approx(0.125)
    assert (evidence["gain"], evidence["fan_in"], evidence["direction"]) == (1.0, 64, "below")
    assert evidence["layers"] == ["fc1", "fc2", "fc3", "fc4"]
    assert "12.5x below" in first.summary


class SmallInitWithSideHead(SmallInitNet):
    """The seed's small-init chain, plus a side head that runs but is not in the loss."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(64, 64)
        nn.init.normal_(self.side.weight, std=1e-4)

    def forward(self, x):
        self.side(x)  # computed and dropped, like a pooler outside the loss
        return super().forward(x)


def test_initialisation_cause_names_only_layers_between_the_first_and_the_last():
    _, causes = causes_of(fresh(SmallInitWithSideHead))
    evidence = causes[0].evidence
    assert causes[0].cause == "initialisation"
    assert evidence["layers"] == ["fc1", "fc2", "fc3", "fc4"]
    assert evidence["factor"] == pytest.approx(12.5, rel=0.05)  # not dragged towards side's 1000x
    assert "side" not in causes[0].summary


def test_plain_deep_relu_mlp_names_depth():
    _, causes = causes_of(fresh(PlainReLU))
    first = causes[0]
    assert first.cause == "depth"
    assert first.evidence["shortest_chain"] == first.evidence["longest_chain"] == 10
    assert first.evidence["normalisation_layers"] == 0
    assert "no residual connection, no normalisation" in first.summary
    assert [c.cause for c in causes] == ["depth"]  # default init alone is not flagged


def test_healthy_relu_net_gets_no_cause():
    torch.manual_seed(0)
    profile, findings = assess(fresh(ReLUNet), bounds=Bounds(), diagnose=True)
    assert not failing(findings)
    assert profile.activations is not None
    assert diagnose(profile, "vanishing") == [] and diagnose(profile, "exploding") == []


def test_residual_connections_clear_depth_even_when_forced():
    torch.manual_seed(0)
    profile, _ = assess(fresh(ResidualReLU), bounds=Bounds(), diagnose=True)
    assert profile.activations.shortest_chain == 1
    assert diagnose(profile, "vanishing") == []


def test_unrolled_tanh_rnn_names_the_recurrence():
    _, causes = causes_of(fresh(UnrolledTanhRNN))
    first = causes[0]
    assert first.cause == "recurrence"
    assert (first.evidence["layer"], first.evidence["steps"]) == ("rec", 50)
    assert "nn.GRU" in first.fix


def test_tanh_rnn_with_large_recurrent_weights_explodes_from_its_init():
    model = fresh(UnrolledTanhRNN, steps=30)
    nn.init.normal_(model.rec.weight, std=1.0)
    _, causes = causes_of(model, rule="exploding")
    first = causes[0]
    assert first.cause == "initialisation"
    assert first.evidence["direction"] == "above"
    assert first.evidence["layers"] == ["rec"]
    assert first.evidence["gain"] == pytest.approx(5 / 3)
    assert "clip_grad_norm_" in next(c.fix for c in causes if c.cause == "recurrence")


def test_relus_killed_by_a_negative_bias_name_dead_relus():
    # Every ReLU after fc2 is dead, so fc1 and fc2 get no gradient at all: the dead rule fails, with its cause.
    _, causes = causes_of(fresh(NegativeBiasNet), rule="dead")
    first = causes[0]
    assert first.cause == "dead_relu"
    assert first.evidence["where"] == ["after fc2"]
    assert first.evidence["dead_share"] == 1.0
    assert first.evidence["input_mean"] < -0.5
    assert "bias of fc2" in first.fix


def test_healthy_probe_skips_the_activation_pass():
    torch.manual_seed(0)
    profile, _ = assess(fresh(ReLUNet), bounds=Bounds())
    assert profile.activations is None


def test_dead_relu_rule_fails_only_above_its_threshold():
    # 48 of 64 units dead after fc2 and the rest kept alive: 75%, over the 70% default.
    model = fresh(NegativeBiasNet, bias=-10.0, dead_units=48)
    with torch.no_grad():
        model.fc2.bias[48:] = 5.0
    profile, findings = assess(model, bounds=Bounds(dead_relu=True))
    (finding,) = [f for f in findings if f.rule == "dead_relu"]
    assert finding.failing and finding.layers == ["fc2"]
    assert (finding.value, finding.bound) == (0.75, 0.7)
    assert "75% after fc2 (F.relu)" in finding.message
    assert not [f for f in check(profile, Bounds(dead_relu=0.8)) if f.rule == "dead_relu"]
    assert not [f for f in check(profile, Bounds()) if f.rule == "dead_relu"]


def test_saturation_rule_reads_inputs_at_5():
    torch.manual_seed(0)
    _, findings = assess(SaturatedTanh(), bounds=Bounds(min_ratio=None, saturation=True))
    (finding,) = [f for f in findings if f.rule == "saturation"]
    assert finding.failing and finding.bound == 0.5 and finding.value > 0.5
    assert "after fc1 (torch.tanh)" in finding.message


def test_rules_on_a_profile_without_activations_say_so():
    torch.manual_seed(0)
    profile, _ = assess(fresh(ReLUNet), bounds=Bounds(), diagnose=False)
    notes = check(profile, Bounds(dead_relu=0.7, saturation=0.5))
    assert [(f.rule, f.failing) for f in notes] == [("dead_relu", False), ("saturation", False)]
    assert "no activation statistics" in notes[0].message


@pytest.mark.parametrize(
    "raw, expected",
    [("on", 0.7), (True, 0.7), ("default", 0.7), ("0.9", 0.9), ("60%", 0.6), (1, 1.0), ("off", None), (False, None)],
)
def test_dead_relu_bound_values(raw, expected):
    assert resolve({"dead_relu": raw}).dead_relu == expected


@pytest.mark.parametrize("raw", ["1.5", "0", "-0.2", "many", "150%"])
def test_share_bounds_reject_what_is_not_a_share(raw):
    with pytest.raises(ValueError, match="saturation must be a share between 0 and 1"):
        resolve({"saturation": raw})


def test_saturation_defaults_to_half_and_the_rules_default_off():
    assert resolve({"saturation": "on"}).saturation == 0.5
    assert (Bounds().dead_relu, Bounds().saturation) == (None, None)


SEED_TESTS = """
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from seed_networks import ReLUNet, SigmoidNet, SmallInitNet

class HalfDead(ReLUNet):
    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.fc2.bias[:48] = -10.0
            self.fc2.bias[48:] = 5.0

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

def test_sigmoid(gradient_health):
    gradient_health(SigmoidNet())

def test_small_init(gradient_health):
    gradient_health(SmallInitNet())

# min_ratio is off so that only the activation rules decide.
def test_half_dead_passes_by_default(gradient_health):
    gradient_health(HalfDead(), min_ratio=None)

@pytest.mark.gradient_health(dead_relu=True)
def test_half_dead_marker(gradient_health):
    gradient_health(HalfDead(), min_ratio=None)

def test_half_dead_keyword(gradient_health):
    gradient_health(HalfDead(), min_ratio=None, dead_relu="60%")
"""


def test_failure_messages_explain_the_cause_in_one_line(pytester):
    pytester.syspathinsert(EXAMPLES)
    pytester.makepyfile(test_seeds=SEED_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=4)
    result.stdout.fnmatch_lines(
        [
            "*cause: saturating activations: 3 sigmoid call(s) between fc1 and fc4 (after fc1, fc2, fc3) "
            "each pass at most 0.25*",
            "*fix: use ReLU or GELU between hidden layers*",
            "*cause: initialisation: the weights of fc1, fc2, fc3, fc4 are about 12.5x below "
            "the Kaiming/Xavier reference*",
            "*dead_relu: dead ReLUs: 1 activation site(s) have at least dead_relu 70%"
            "*75% after fc2 (nn.ReLU 'activation')*",
            "*dead_relu: dead ReLUs: 1 activation site(s) have at least dead_relu 60%*",
        ]
    )


def test_ini_and_command_line_switch_the_rules_on(pytester):
    pytester.syspathinsert(EXAMPLES)
    pytester.makepyfile(test_seeds=SEED_TESTS)
    pytester.makeini("[pytest]\ngrad_dead_relu = on\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "default")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*dead_relu 70%*"])
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "default", "--grad-dead-relu", "0.8")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "default", "--grad-dead-relu", "lots")
    assert result.ret != 0
    assert "dead_relu must be a share between 0 and 1" in result.stdout.str() + result.stderr.str()


def test_causes_survive_the_xdist_transport():
    # Workers send CheckResult.to_dict() to the controller, which rebuilds it with from_dict.
    torch.manual_seed(0)
    bounds = Bounds()
    profile, findings = assess(fresh(SmallInitNet), bounds=bounds)
    record = json.loads(json.dumps(CheckResult("test_x.py::t", None, profile, bounds, findings).to_dict()))
    again = CheckResult.from_dict(record)
    assert again.findings[0].causes == findings[0].causes
    assert again.profile.activations == profile.activations


def test_causes_appear_in_the_session_report(pytester):
    pytester.syspathinsert(EXAMPLES)
    pytester.makepyfile(test_seeds=SEED_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--grad-report", "-k", "small_init")
    result.assert_outcomes(failed=1)
    report = result.stdout.str().split("gradient report")[-1]
    assert "    cause: initialisation: the weights of fc1, fc2, fc3, fc4 are about 12.5x below" in report
