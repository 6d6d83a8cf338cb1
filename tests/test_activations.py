"""The instrumented forward pass: which activations it catches, where they sit, what it measures."""

import json
import math

import pytest
import torch
from helpers.models import Forms, MaskedResidual, UnrolledRNNCell
from torch import nn

from pytest_gradcheck import probe
from pytest_gradcheck.core.profile import ActivationProfile, GradientProfile
from pytest_gradcheck.probing.runner import ModelRun


def measure(model, inputs=None, seed=0) -> ActivationProfile:
    """The instrumented pass alone, set up as a probe's."""
    with ModelRun(model, inputs, seed=seed) as run:
        return run.activation_profile()


@pytest.mark.parametrize(
    "form, relu_call",
    [
        ("functional", "F.relu"),
        ("torch", "torch.relu"),
        ("method", "Tensor.relu"),
        ("inplace", "F.relu"),
        ("module", "nn.ReLU 'relu_module'"),
    ],
)
def test_every_calling_form_is_caught_with_its_place(form, relu_call):
    sites = measure(Forms(form), torch.randn(8, 4)).sites
    relu = next(site for site in sites if site.function == "relu")
    sigmoid = next(site for site in sites if site.function == "sigmoid")
    assert (relu.call, relu.after, relu.calls) == (relu_call, "pre_relu", 1)
    assert relu.dead_share == 0.5  # measured on the input, even when the call overwrites it
    assert sigmoid.after == "pre_sigmoid"
    assert sigmoid.saturated_share == 0.5
    expected = (2 * 0.25 + 2 * torch.sigmoid(torch.tensor(6.0)).item() * torch.sigmoid(torch.tensor(-6.0)).item()) / 4
    assert sigmoid.mean_derivative == pytest.approx(expected, rel=1e-5)
    assert sigmoid.derivative_bound == 0.25
    assert len(sites) == 2  # nn.ReLU's own F.relu is not counted a second time


def test_smooth_rectifiers_are_caught_without_a_dead_share():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 1))
    sites = measure(model, torch.randn(8, 4)).sites
    assert [(site.function, site.after) for site in sites] == [("gelu", "0"), ("silu", "2")]
    assert all(site.dead_share is None and site.output_std > 0 for site in sites)


def test_a_loop_pools_into_one_site_and_counts_depth():
    data = measure(UnrolledRNNCell(), torch.randn(4, 8))
    (site,) = data.sites
    assert (site.function, site.call, site.after, site.calls) == ("tanh", "torch.rnn_tanh_cell", "cell", 7)
    assert 0 < site.mean_derivative <= 1
    assert data.repeated == {"cell": 7}
    assert data.shortest_chain == data.longest_chain == 9  # enc, 7 cell steps, out


def test_residual_connections_shorten_the_shortest_path():
    data = measure(MaskedResidual(), (torch.randn(4, 8), torch.ones(4, 8)))
    assert (data.shortest_chain, data.longest_chain) == (1, 5)


def test_transformer_has_normalisation_and_residuals():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    data = measure(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(2, 5, 16))
    assert len(data.normalisation) == 4
    assert data.shortest_chain < data.longest_chain


def test_init_scale_against_the_references():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 1))
    nn.init.normal_(model[0].weight, std=0.05)
    scales = measure(model, torch.randn(8, 64)).init_scales
    first, last = scales
    assert (first.layer, first.fan_in, first.fan_out, first.activation) == ("0", 64, 32, "tanh")
    assert first.gain == pytest.approx(5 / 3)
    assert first.kaiming_std == pytest.approx(5 / 3 / 8)
    assert first.xavier_std == pytest.approx(5 / 3 * math.sqrt(2 / 96))
    assert first.std == pytest.approx(0.05, rel=0.1)
    # The nearer reference on a log scale: Kaiming (0.208) for a small std, Xavier (0.241) for a large one.
    assert first.reference_std == first.kaiming_std
    assert first.factor == pytest.approx(first.std / first.kaiming_std)
    assert (last.activation, last.gain) == ("linear", 1.0)
    nn.init.normal_(model[0].weight, std=0.5)
    (large, _) = measure(model, torch.randn(8, 64)).init_scales
    assert large.reference_std == large.xavier_std


def test_measure_leaves_the_model_and_rng_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    measure(model)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0


def test_profile_with_activations_round_trips_through_json():
    torch.manual_seed(0)
    model = Forms("functional")
    profile = probe(model, torch.randn(8, 4))
    profile.activations = measure(model, torch.randn(8, 4))
    again = GradientProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again == profile
    assert isinstance(again.activations, ActivationProfile)
    assert again.activations.sites[0].where == "after pre_relu"


def test_an_older_profile_dict_without_activations_still_loads():
    torch.manual_seed(0)
    data = probe(Forms("functional"), torch.randn(8, 4)).to_dict()
    del data["activations"]
    assert GradientProfile.from_dict(data).activations is None


def test_rule_thresholds_compare_as_deepdiagnosis_does():
    # Forms has exactly half its ReLU units dead and half its sigmoid inputs saturated.
    from pytest_gradcheck import Bounds
    from pytest_gradcheck.core.checks import check

    torch.manual_seed(0)
    model = Forms("functional")
    profile = probe(model, torch.randn(8, 4))
    profile.activations = measure(model, torch.randn(8, 4))

    def rules(**bounds):
        found = check(profile, Bounds(**bounds))
        return sorted(f.rule for f in found if f.failing and f.rule in ("dead_relu", "saturation"))

    assert rules(dead_relu=0.5, saturation=0.5) == ["dead_relu"]  # dead from the threshold up, saturated above it
    assert rules(dead_relu=0.51, saturation=0.49) == ["saturation"]
