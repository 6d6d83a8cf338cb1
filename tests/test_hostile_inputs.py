"""Hostile models and inputs: each gets a clear ProbeError or a correct profile, and is left untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.models import SharedAcrossTimeSteps, UsesWeightTwice, default_loss
from helpers.state import probe_error, probe_untouched
from torch import nn

from pytest_gradcheck import Bounds, probe
from pytest_gradcheck.core.checks import check


def reference_grads(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain autograd on a copy, with the probe's default loss."""
    twin = copy.deepcopy(model).train()
    default_loss(twin(inputs)).backward()
    return {name: param.grad for name, param in twin.named_parameters()}


def assert_layer_matches(profile, layer_name: str, grads: dict[str, torch.Tensor]) -> None:
    """The layer's statistics are those of the accumulated autograd gradients."""
    weight, bias = grads[f"{layer_name}.weight"], grads[f"{layer_name}.bias"]
    layer = profile.layer(layer_name)
    assert layer.grad_mean_abs == pytest.approx(weight.abs().mean().item(), rel=1e-5)
    assert layer.grad_norm == pytest.approx(math.hypot(weight.norm().item(), bias.norm().item()), rel=1e-5)
    assert layer.grad_max_abs == pytest.approx(max(weight.abs().max(), bias.abs().max()).item(), rel=1e-6)


class FailsHalfway(nn.Module):
    """Runs its first layer, then raises: hooks are already in place when it fails."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        self.bn(self.fc(x))
        raise RuntimeError("index 7 is out of bounds for dimension 0 with size 4")


def test_forward_that_raises_names_the_model_and_the_error():
    model = FailsHalfway().eval()
    message = probe_error(model)
    assert "FailsHalfway.forward failed on the probe inputs (float32[8, 4])" in message
    assert "RuntimeError: index 7 is out of bounds" in message
    assert "inputs=" in message  # says what to do next


class Returns(nn.Module):
    def __init__(self, make_output):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.make_output = make_output

    def forward(self, x):
        return self.make_output(self.fc(x))


@pytest.mark.parametrize(
    "make_output, described",
    [
        (lambda hidden: "logits", "a str"),
        (lambda hidden: None, "a NoneType"),
        (lambda hidden: hidden.argmax(-1), "an int64 tensor of shape [8]"),
        (lambda hidden: {"ids": hidden.argmax(-1), "note": "x"}, "a dict"),
    ],
    ids=["str", "None", "int-tensor", "dict-without-floats"],
)
def test_output_without_a_float_tensor_asks_for_a_loss_fn(make_output, described):
    message = probe_error(Returns(make_output))
    assert f"Returns returned {described}, which holds no floating-point tensor" in message
    assert "loss_fn=" in message


def test_loss_fn_returning_a_vector_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    message = probe_error(model, loss_fn=lambda output: output.sum(0))
    assert "loss_fn must return a scalar" in message and "Sequential" in message
    assert "float32 tensor of shape [3]" in message


def test_output_detached_from_the_parameters_is_refused():
    model = Returns(lambda hidden: hidden.detach())
    message = probe_error(model)
    assert "the loss of Returns does not depend on any trainable parameter" in message


@pytest.mark.parametrize(
    "loss_fn, expected_loss",
    [(lambda out: out.sum() * float("nan"), math.nan), (lambda out: out.abs().sum() * float("inf"), math.inf)],
    ids=["nan", "inf"],
)
def test_non_finite_loss_gives_a_profile_that_fails_the_nonfinite_rule(loss_fn, expected_loss):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    profile = probe_untouched(model, loss_fn=loss_fn)

    assert [layer.name for layer in profile.layers] == ["0", "2"]
    assert not any(layer.finite for layer in profile.layers)
    assert (math.isnan(profile.loss) and math.isnan(expected_loss)) or profile.loss == expected_loss
    findings = check(profile, Bounds(min_ratio=0.01, max_ratio=100.0))
    assert [finding.rule for finding in findings] == ["nonfinite"]
    assert findings[0].layers == ["0", "2"] and findings[0].failing


def test_inputs_on_another_device_name_the_device():
    # CPU-only CI has no second real device; the meta device stands in for one, and the
    # error is the same kind of device mismatch torch reports for cuda vs cpu.
    model = nn.Sequential(nn.Linear(4, 2))
    message = probe_error(model, torch.randn(8, 4, device="meta"))
    assert "Sequential.forward failed on the probe inputs (float32[8, 4]@meta)" in message
    assert "device" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_for_a_cpu_model_name_the_device():
    message = probe_error(nn.Sequential(nn.Linear(4, 2)), torch.randn(8, 4, device="cuda"))
    assert "float32[8, 4]@cuda:0" in message


def test_inputs_of_the_wrong_dtype_name_both_dtypes():
    message = probe_error(nn.Sequential(nn.Linear(4, 2)), torch.randn(8, 4, dtype=torch.float64))
    assert "(float64[8, 4])" in message
    assert "Double" in message and "Float" in message  # torch's own words, passed through


def test_model_on_the_meta_device_asks_to_materialize_it():
    model = nn.Sequential(nn.Linear(4, 2, device="meta"))
    message = probe_error(model)
    assert "Sequential has 2 trainable parameter(s) on the meta device" in message
    assert "to_empty" in message


@pytest.mark.parametrize(
    "model",
    [nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).requires_grad_(False)],
    ids=["no-parameters", "all-frozen"],
)
def test_model_without_trainable_parameters_is_refused(model):
    message = probe_error(model)
    assert f"{type(model).__name__} has no trainable parameters" in message


def test_parameter_reached_twice_reports_the_summed_gradient():
    torch.manual_seed(0)
    model, x = UsesWeightTwice(), torch.randn(8, 4)
    profile = probe_untouched(model, x, detail=True)
    grads = reference_grads(model, x)

    assert [layer.name for layer in profile.layers] == ["fc", "head"]
    assert_layer_matches(profile, "fc", grads)
    assert_layer_matches(profile, "head", grads)
    assert sum(layer.numel for layer in profile.layers) == 4 * 4 + 4 + 4 + 1


def test_module_run_at_every_time_step_is_one_layer_with_the_accumulated_gradient():
    torch.manual_seed(0)
    model, x = SharedAcrossTimeSteps(), torch.randn(8, 4)
    profile = probe_untouched(model, x, detail=True)
    grads = reference_grads(model, x)

    assert [layer.name for layer in profile.layers] == ["encode", "cell", "head"]
    assert profile.layer("cell").numel == 8 * 8 + 8  # counted once, not once per step
    for name in ("encode", "cell", "head"):
        assert_layer_matches(profile, name, grads)
    assert (profile.first.name, profile.last.name) == ("encode", "head")


def test_frozen_first_layer_still_shapes_the_default_inputs():
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].requires_grad_(False)  # a frozen backbone: it still takes the input
    profile = probe_untouched(model)
    assert profile.input_shapes == ["float32[8, 6]"]
    assert [layer.name for layer in profile.layers] == ["2"]


class FixedGradient(torch.autograd.Function):
    """A straight-through trick: backward hands autograd a tensor the user keeps."""

    surrogate = -torch.ones(4, 4)

    @staticmethod
    def forward(ctx, weight):
        return weight * 1.0

    @staticmethod
    def backward(ctx, grad_output):
        return FixedGradient.surrogate


class StraightThrough(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x @ FixedGradient.apply(self.fc.weight) + self.fc.bias


def test_gradients_that_user_code_holds_are_not_written_to():
    # autograd.grad may return a tensor someone else holds: what a gradient hook kept,
    # or what a custom Function's backward returned. The probe must only read them.
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)), torch.randn(8, 4)
    expected = reference_grads(model, x)["0.weight"]
    kept = []
    model[0].weight.register_hook(lambda grad: kept.append(grad) or grad)
    probe(model, x)
    assert torch.allclose(kept[0], expected), "the probe wrote to a gradient a hook kept"

    surrogate = FixedGradient.surrogate.clone()
    profile = probe_untouched(StraightThrough())
    assert torch.equal(FixedGradient.surrogate, surrogate)
    assert profile.layer("fc").grad_mean_abs == pytest.approx(1.0)


# ------------------------------------------------- gradients the probe may not overwrite


class CatOfTwoWeights(nn.Module):
    """Uses its two weights through one torch.cat, whose gradient a hook keeps."""

    def __init__(self, captured: list):
        super().__init__()
        self.big = nn.Parameter(torch.randn(160, 128))  # large enough to be reduced on its own
        self.small = nn.Parameter(torch.randn(4, 128))
        self.captured = captured

    def forward(self, x):
        weight = torch.cat([self.big, self.small])
        weight.register_hook(lambda grad: self.captured.append(grad))
        return x @ weight.t()


class PassThrough(torch.autograd.Function):
    """Hands back an alias of the incoming gradient (not a view), as some custom Functions do."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad.detach()


class AliasedGradient(nn.Module):
    def __init__(self, captured: list):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(200, 128))
        self.captured = captured

    def forward(self, x):
        weight = PassThrough.apply(self.weight)
        weight.register_hook(lambda grad: self.captured.append(grad))
        return x @ weight.t()


@pytest.mark.parametrize("make", [CatOfTwoWeights, AliasedGradient], ids=["slice-of-a-kept-grad", "alias"])
@pytest.mark.parametrize("detail", [False, True], ids=["fast", "detail"])
def test_gradients_that_share_memory_with_a_users_tensor_are_only_read(make, detail):
    torch.manual_seed(0)
    captured: list[torch.Tensor] = []
    model, x = make(captured), torch.randn(8, 128)
    twin = copy.deepcopy(model)
    twin.captured = reference = []
    default_loss(twin(x)).backward()

    profile = probe_untouched(model, x, detail=detail)

    # The gradient the hook kept is exactly what plain autograd gives: the probe took
    # |g| of the parameter's gradient, which shares its memory, without writing to it.
    assert torch.equal(captured[0], reference[0])
    params = list(twin.parameters())
    expected = sum(p.grad.abs().sum().item() for p in params) / sum(p.numel() for p in params)
    assert profile.layers[0].grad_mean_abs == pytest.approx(expected, rel=1e-4)
