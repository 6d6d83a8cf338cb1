"""Tests of the probe engine: order, sharing, inputs, loss, statistics, isolation and errors."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
from unittest import mock

import pytest
import torch
from helpers.models import (
    Branches,
    Classifier,
    Detached,
    Everything,
    Raises,
    Recurrent,
    RegisteredBackwards,
    TiedEmbeddingHead,
    TiedLM,
    TwoInputs,
    WideTiedLM,
    WithPooler,
    default_loss,
    mlp,
)
from helpers.state import assert_untouched, snapshot
from seed_networks import ReLUNet, SigmoidNet, SmallInitNet
from torch import nn

from pytest_gradcheck import GradientProfile, LayerStats, ProbeError, check, probe

# ---------------------------------------------------------------- order and sharing


def test_layers_follow_execution_order_not_registration_order():
    model = RegisteredBackwards()
    assert [name for name, _ in model.named_children()] == ["third", "second", "first"]

    profile = probe(model, torch.randn(4, 8))

    assert [layer.name for layer in profile.layers] == ["first", "second", "third"]
    assert (profile.first.name, profile.last.name) == ("first", "third")


def test_tied_weights_count_once_under_the_first_executor():
    torch.manual_seed(0)
    model = TiedLM()

    profile = probe(model, torch.randint(0, 50, (4, 6)))

    emb, head = profile.layer("emb"), profile.layer("head")
    assert emb.shared_with == ["head"]
    assert emb.numel == 50 * 8
    assert head.numel == 50  # only its own bias; the tied matrix is counted under emb
    assert sum(layer.numel for layer in profile.layers) == sum(p.numel() for p in model.parameters())
    # Without its matrix the head is bias-only, so it cannot be the last pick.
    assert not head.has_matrix
    assert profile.last.name == "mid"


def test_unwrap_strips_data_parallel():
    torch.manual_seed(0)
    model = mlp(8, 8, 4)

    inputs = torch.randn(2, 8)

    wrapped = probe(nn.DataParallel(model), inputs)

    assert [layer.name for layer in wrapped.layers] == ["0", "2"]
    assert wrapped == probe(model, inputs)


# ---------------------------------------------------------------- input forms


def test_dict_inputs_are_keyword_arguments():
    model = TwoInputs()

    profile = probe(model, {"x": torch.randn(2, 3), "y": torch.randn(2, 5), "scale": 2.0})

    assert profile.input_shapes == ["x=float32[2, 3]", "y=float32[2, 5]", "scale=float"]
    assert [layer.name for layer in profile.layers] == ["left", "right"]


@pytest.mark.parametrize("container", [tuple, list])
def test_tuple_and_list_inputs_are_positional(container):
    profile = probe(TwoInputs(), container([torch.randn(2, 3), torch.randn(2, 5)]))

    assert profile.input_shapes == ["float32[2, 3]", "float32[2, 5]"]


def test_callable_inputs_are_called_under_the_probe_seed():
    model = TwoInputs()
    calls = []

    def make_inputs():
        calls.append(1)
        return {"x": torch.randn(2, 3), "y": torch.randn(2, 5)}

    first = probe(model, make_inputs, seed=3)
    again = probe(model, make_inputs, seed=3)
    other = probe(model, make_inputs, seed=4)

    assert len(calls) == 3
    assert first == again  # the random inputs repeat exactly under the same seed
    assert first.layers != other.layers


def test_inputs_of_an_unsupported_type_are_rejected():
    with pytest.raises(ProbeError, match=r"inputs must be a tensor.*got int"):
        probe(mlp(4, 4), 3)


# ---------------------------------------------------------------- inferred inputs


@pytest.mark.parametrize(
    ("first", "shape", "features"),
    [
        (nn.Linear(12, 4), "float32[8, 12]", 4),
        (nn.Conv1d(3, 2, 3), "float32[8, 3, 32]", 2 * 30),
        (nn.Conv2d(3, 2, 3), "float32[8, 3, 32, 32]", 2 * 30 * 30),
        (nn.Conv3d(1, 1, 3), "float32[8, 1, 32, 32, 32]", 30 * 30 * 30),
        (nn.Embedding(100, 4), "int64[8, 16]", 16 * 4),
    ],
    ids=["Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding"],
)
def test_inputs_are_inferred_from_the_first_module(first, shape, features):
    model = nn.Sequential(first, nn.Flatten(1), nn.Linear(features, 2))

    profile = probe(model)

    assert profile.input_shapes == [shape]
    assert [layer.name for layer in profile.layers] == ["0", "2"]
    assert all(layer.received_grad for layer in profile.layers)


def test_inference_follows_the_model_dtype():
    profile = probe(nn.Linear(6, 2).double())

    assert profile.input_shapes == ["float64[8, 6]"]
    assert profile.dtype == "float64"


def test_inference_error_names_the_module_that_stopped_it():
    model = nn.ModuleDict({"attention": nn.MultiheadAttention(4, 2)})
    with pytest.raises(ValueError, match=r"ModuleDict.*MultiheadAttention 'attention'.*inputs=") as info:
        probe(model)
    assert isinstance(info.value, ProbeError)


def test_inputs_are_inferred_for_a_recurrent_first_module():
    profile = probe(Recurrent())
    assert profile.input_shapes == ["float32[16, 8, 4]"]  # (steps, batch, features): batch_first is False
    assert [layer.name for layer in profile.layers] == ["rnn", "out"]


# ---------------------------------------------------------------- statistics


def hand_statistics(model: nn.Module, inputs: torch.Tensor) -> dict[str, dict[str, float]]:
    """The profile numbers of every Linear, computed the plain way with .backward()."""
    model = copy.deepcopy(model).train()
    default_loss(model(inputs)).backward()
    numbers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight, bias = module.weight, module.bias
            numbers[name] = {
                "grad_mean_abs": weight.grad.abs().mean().item(),
                "grad_max_abs": max(weight.grad.abs().max().item(), bias.grad.abs().max().item()),
                "grad_norm": math.hypot(weight.grad.norm().item(), bias.grad.norm().item()),
                "weight_norm": math.hypot(weight.norm().item(), bias.norm().item()),
                "zero_fraction": (
                    ((weight.grad == 0).sum() + (bias.grad == 0).sum()) / (weight.numel() + bias.numel())
                ).item(),
            }
    return numbers


def test_numbers_match_a_hand_computation():
    torch.manual_seed(0)
    model = mlp(16, 32, 32, 4)
    inputs = torch.randn(2, 16)  # a small batch leaves whole ReLU columns at zero

    profile = probe(model, inputs, detail=True)
    expected = hand_statistics(model, inputs)

    assert [layer.name for layer in profile.layers] == list(expected)
    for layer in profile.layers:
        for field, value in expected[layer.name].items():
            assert getattr(layer, field) == pytest.approx(value, rel=1e-5, abs=1e-12), (layer.name, field)
    assert any(layer.zero_fraction > 0 for layer in profile.layers)
    assert profile.detailed
    assert profile.loss == pytest.approx(default_loss(model(inputs)).item(), rel=1e-6)
    assert profile.ratio == pytest.approx(expected["0"]["grad_mean_abs"] / expected["4"]["grad_mean_abs"], rel=1e-5)


def test_without_detail_the_probe_measures_mean_finiteness_and_all_zero_only():
    torch.manual_seed(0)
    model = mlp(16, 32, 32, 4)
    inputs = torch.randn(2, 16)

    fast, full = probe(model, inputs), probe(model, inputs, detail=True)

    assert not fast.detailed and full.detailed
    for quick, detailed in zip(fast.layers, full.layers):
        assert quick.grad_mean_abs == pytest.approx(detailed.grad_mean_abs, rel=1e-6)
        assert (quick.finite, quick.all_zero, quick.name) == (detailed.finite, detailed.all_zero, detailed.name)
        assert (quick.grad_max_abs, quick.grad_norm, quick.weight_norm, quick.zero_fraction) == (None,) * 4
    assert fast.ratio == pytest.approx(full.ratio, rel=1e-6)


def test_max_grad_needs_a_detailed_profile():
    profile = probe(mlp(4, 4, 2), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"max_grad needs each layer's largest \|grad\|.*detail=True"):
        check(profile, max_grad=1.0)
    assert check(probe(mlp(4, 4, 2), torch.randn(3, 4), detail=True), max_grad=1e9) == []


def test_bias_only_layers_use_their_one_dimensional_parameters():
    norm = nn.LayerNorm(4)
    inputs = torch.randn(3, 4)
    profile = probe(nn.Sequential(nn.Linear(4, 4), norm, nn.Linear(4, 4)), inputs)

    stats = profile.layer("1")
    assert not stats.has_matrix and stats.is_norm
    assert stats.grad_mean_abs > 0
    assert stats.numel == 8


def test_embedding_mean_counts_only_the_rows_the_batch_used():
    torch.manual_seed(0)
    vocab, width = 100_000, 16
    model = nn.Sequential(nn.Embedding(vocab, width), nn.Linear(width, width))
    ids = torch.randint(0, vocab, (8, 16))

    profile = probe(model, ids, detail=True)

    reference = copy.deepcopy(model)
    default_loss(reference(ids)).backward()
    grad = reference[0].weight.grad
    rows = ids.unique().numel()
    emb = profile.layer("0")
    assert emb.grad_mean_abs == pytest.approx(grad.abs().sum().item() / (rows * width), rel=1e-5)
    # Averaged over the whole table the same gradient would look ~800x smaller.
    assert emb.grad_mean_abs > 100 * grad.abs().mean().item()
    assert emb.zero_fraction == pytest.approx(0.0)


def test_dead_layer_has_only_zero_gradients():
    model = mlp(4, 4, 4, 4)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.fill_(-1.0)  # the ReLU after it is off for every input

    # Nothing flows back through the switched-off ReLU, into either layer before it.
    for detail in (False, True):
        profile = probe(model, torch.randn(3, 4), detail=detail)
        for name in ("0", "2"):
            assert profile.layer(name).all_zero and profile.layer(name).dead
        assert not profile.layer("4").dead  # its bias still learns
        dead = [finding for finding in check(profile) if finding.rule == "dead"]
        assert dead[0].layers == ["0", "2"] and dead[0].failing
    assert profile.layer("0").zero_fraction == 1.0
    assert profile.layer("4").grad_max_abs > 0


def test_nonfinite_gradients_are_flagged():
    model = mlp(4, 4, 4)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")

    profile = probe(model, torch.randn(2, 4))

    # relu(NaN) is NaN, so the NaN reaches the next layer's weight gradient; a layer without
    # a finite gradient is the nonfinite rule's, and no ratio is formed with it.
    assert not profile.layer("2").finite
    assert profile.ratio is None
    assert [f.layers for f in check(profile) if f.rule == "nonfinite"] == [["2"]]


# ---------------------------------------------------------------- first and last picks


def test_picks_skip_norms_bias_only_and_layers_without_gradient():
    profile = probe(WithPooler(), torch.randn(3, 4), loss_fn=lambda out: out["hidden"].pow(2).sum())

    assert (profile.first.name, profile.last.name) == ("fc1", "fc2")
    pooler = profile.layer("pooler")
    assert pooler.executed and not pooler.received_grad
    assert pooler.unused_parameters == ["pooler.weight", "pooler.bias"]
    assert profile.layer("shift").received_grad and not profile.layer("shift").has_matrix
    assert profile.layer("norm_in").is_norm and profile.layer("norm_out").is_norm
    unused = [finding for finding in check(profile) if finding.rule == "unused"]
    assert len(unused) == 1 and unused[0].layers == ["pooler"] and not unused[0].failing
    assert [f.rule for f in check(profile, fail_on_unused=True) if f.failing] == ["unused"]


def test_a_single_pickable_layer_gives_no_ratio():
    profile = probe(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), torch.randn(2, 4))

    assert profile.first is profile.last
    assert profile.ratio is None


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("kind", ["tuple", "dict", "dataclass"])
def test_default_loss_projects_every_floating_tensor_of_the_output(kind):
    torch.manual_seed(0)
    model, inputs = Branches(kind), torch.randn(5, 4)

    profile = probe(model, inputs, seed=3)

    # One N(0, 1) direction per output tensor, drawn in turn under the probe's seed.
    generator = torch.Generator().manual_seed(3)
    a, b = model.a(inputs), model.b(inputs)
    directions = [torch.randn(a.shape, generator=generator), torch.randn(b.shape, generator=generator)]
    expected = (a * directions[0]).sum() + (b * directions[1]).sum()
    assert profile.loss_kind == "random"
    assert profile.loss == pytest.approx(expected.item(), rel=1e-5)
    assert all(layer.received_grad for layer in profile.layers)


def test_the_sum_of_a_normalised_output_is_a_constant_but_its_random_projection_is_not():
    # The batch sum of a batch-normalised output does not depend on anything before it, so
    # with the sum as the loss the head would get no gradient; a random direction does.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    inputs = torch.randn(16, 8)

    by_sum = probe(model, inputs, loss_fn=lambda output: output.sum())
    by_default = probe(model, inputs)

    assert by_sum.layer("0").grad_mean_abs < 1e-6 * by_default.layer("0").grad_mean_abs
    assert 0.1 < by_default.ratio < 10


@pytest.mark.parametrize(
    ("kind", "loss_of"),
    [
        ("dict-loss", lambda a, b: b.pow(2).mean()),
        ("dataclass-loss", lambda a, b: (a * b).mean()),
    ],
)
def test_a_loss_entry_is_used_when_present(kind, loss_of):
    torch.manual_seed(0)
    model, inputs = Branches(kind), torch.randn(5, 4)

    profile = probe(model, inputs)

    assert profile.loss == pytest.approx(loss_of(model.a(inputs), model.b(inputs)).item(), rel=1e-5)
    if kind == "dict-loss":
        assert not profile.layer("a").received_grad  # "a" is in the output but not in the loss


def test_loss_fn_overrides_the_default():
    torch.manual_seed(0)
    model, inputs = Branches("dict"), torch.randn(5, 4)

    profile = probe(model, inputs, loss_fn=lambda out: out["b"].pow(2).sum())

    assert profile.loss == pytest.approx(model.b(inputs).pow(2).sum().item(), rel=1e-5)
    assert not profile.layer("a").received_grad


def test_loss_fn_must_return_a_scalar():
    with pytest.raises(ProbeError, match=r"loss_fn must return a scalar.*Branches.*shape \[5, 3\]"):
        probe(Branches("dict"), torch.randn(5, 4), loss_fn=lambda out: out["a"])


def test_output_without_a_floating_tensor_is_a_clear_error():
    with pytest.raises(ProbeError, match=r"Branches returned an int64 tensor.*no floating-point tensor.*loss_fn="):
        probe(Branches("integers"), torch.randn(5, 4))


# ---------------------------------------------------------------- no side effects


def prepared_model() -> Everything:
    torch.manual_seed(0)
    model = Everything()
    model(torch.randn(4, 6))  # running stats move away from their initial values
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 7.0)  # as if mid-training
    model.eval()
    model.drop.train()  # mixed modes must come back as they were
    model.fc2.register_forward_hook(lambda module, args, output: None)
    model.register_forward_pre_hook(lambda module, args: None)
    return model


def test_probe_leaves_the_model_and_rng_untouched():
    model = prepared_model()
    inputs = torch.randn(4, 6)
    before = snapshot(model)
    batches = model.bn.num_batches_tracked.item()

    profile = probe(model, inputs)

    assert_untouched(model, before)
    assert model.bn.num_batches_tracked.item() == batches
    assert "frozen" not in [layer.name for layer in profile.layers]
    assert model.fc1.weight.grad.eq(7.0).all()


def test_probe_leaves_everything_untouched_when_it_raises():
    model = prepared_model()
    fitting = torch.randn(4, 6)
    before = snapshot(model)

    def failing_loss(output):
        raise RuntimeError("the loss broke after the forward pass updated BatchNorm")

    with pytest.raises(RuntimeError, match="the loss broke"):
        probe(model, fitting, loss_fn=failing_loss)
    assert_untouched(model, before)

    with pytest.raises(ProbeError, match=r"Everything\.forward failed.*RuntimeError: late failure"):
        probe(model, (fitting, True))
    assert_untouched(model, before)


def test_probe_runs_layers_in_training_mode_and_random_regularisation_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 4)).eval()
    inputs = torch.randn(8, 32)
    profile = probe(model, inputs, detail=True)

    # Batch statistics (training mode), no dropout mask (eval mode): what a plain pass gives.
    reference = copy.deepcopy(model).train()
    reference[3].eval()
    default_loss(reference(inputs)).backward()
    assert profile.layer("0").grad_mean_abs == pytest.approx(reference[0].weight.grad.abs().mean().item(), rel=1e-5)
    assert profile.layer("0").zero_fraction < 0.05  # dropout would zero about half of them
    assert not model.training


# ---------------------------------------------------------------- determinism


def test_same_model_and_seed_give_identical_profiles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))

    first = probe(model, seed=5)
    torch.rand(10)  # the caller's RNG state must not matter
    second = probe(model, seed=5)
    third = probe(model, seed=6)

    assert isinstance(first, GradientProfile)
    assert first == second
    assert first.layers != third.layers


# ---------------------------------------------------------------- host syncs


@pytest.mark.parametrize("detail", [False, True], ids=["fast", "detail"])
@pytest.mark.parametrize("case", ["deep-mlp", "wide-tied"])
def test_one_host_sync_per_probe(case, detail):
    torch.manual_seed(0)
    if case == "deep-mlp":
        model, inputs, layers = mlp(*[16] * 51), None, 50
    else:
        model, inputs, layers = WideTiedLM(), torch.randint(0, 1000, (2, 8)), 3
    counts: dict[str, int] = {}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(self, *args, **kwargs)

        return wrapper

    names = ["item", "tolist", "cpu", "numpy", "__float__", "__bool__"]
    with mock.patch.multiple(torch.Tensor, **{name: counting(name) for name in names}):
        profile = probe(model, inputs, detail=detail)

    assert len(profile.layers) == layers
    assert sum(counts.values()) <= 1, counts
    assert profile.detailed is detail


# ---------------------------------------------------------------- bad input


def test_not_a_module_is_rejected():
    with pytest.raises(ProbeError, match=r"needs a torch\.nn\.Module, got function"):
        probe(lambda x: x)


@pytest.mark.parametrize("model", [nn.ReLU(), nn.Linear(3, 3).requires_grad_(False)], ids=["no-params", "frozen"])
def test_model_without_trainable_parameters_is_rejected(model):
    with pytest.raises(ProbeError, match=f"{type(model).__name__} has no trainable parameters"):
        probe(model, torch.randn(2, 3))


def test_inputs_that_do_not_fit_name_the_model_and_the_shapes():
    with pytest.raises(ProbeError) as info:
        probe(Classifier(), (torch.randn(4, 7),), loss_fn=None)
    message = str(info.value)
    assert "Classifier.forward failed" in message
    assert "float32[4, 7]" in message
    assert "inputs=" in message

    with pytest.raises(ProbeError, match=r"Classifier.*float32\[4, 7\], mask=bool\[4, 1\].*mat1 and mat2"):
        probe(Classifier(), {"x": torch.randn(4, 7), "mask": torch.ones(4, 1, dtype=torch.bool)})


def test_loss_without_trainable_inputs_is_a_clear_error():
    with pytest.raises(ProbeError, match="loss of Detached does not depend on any trainable parameter"):
        probe(Detached(), torch.randn(2, 3))


# ---------------------------------------------------------------- the seed notebook


@pytest.mark.parametrize("weights_seed", [0, 1, 2])
def test_seed_networks_reproduce_the_notebook(weights_seed):
    ratios = {}
    for network in (SigmoidNet, SmallInitNet, ReLUNet):
        torch.manual_seed(weights_seed)
        ratios[network.__name__] = probe(network()).ratio

    assert ratios["SigmoidNet"] < 0.02, ratios
    assert ratios["SmallInitNet"] < 0.02, ratios
    assert 0.2 < ratios["ReLUNet"] < 5.0, ratios


def test_public_probe_stays_callable_once_the_engine_module_is_imported():
    import pytest_gradcheck
    import pytest_gradcheck.probing

    profile = pytest_gradcheck.probe(nn.Linear(3, 2), torch.randn(2, 3), seed=1)

    assert isinstance(profile, GradientProfile)
    assert profile.model == "Linear"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_matches_cpu_and_leaves_both_rngs_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
    inputs = torch.randn(4, 16)
    on_cpu = probe(model, inputs)
    gpu_model, gpu_inputs = copy.deepcopy(model).cuda(), inputs.cuda()
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()

    on_gpu = probe(gpu_model, gpu_inputs, loss_fn=lambda out: out.sum())

    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert on_gpu.device.startswith("cuda")
    assert on_gpu == probe(gpu_model, gpu_inputs)  # deterministic on the device too
    # Dropout masks differ between the CPU and CUDA generators; the weight norms do not.
    for cpu_layer, gpu_layer in zip(on_cpu.layers, on_gpu.layers):
        assert gpu_layer.weight_norm == pytest.approx(cpu_layer.weight_norm, rel=1e-5)


def test_a_tied_embedding_is_judged_on_the_rows_the_batch_looked_up():
    torch.manual_seed(0)
    model = TiedEmbeddingHead()
    ids = torch.randint(0, 1000, (2, 5))
    twin = copy.deepcopy(model).train()
    (grad,) = torch.autograd.grad(default_loss(twin(ids)), [twin.embed.weight])
    used = grad[torch.unique(ids)]

    stats = probe(model, ids, detail=True).layer("embed")

    assert stats.shared_with == ["head"]
    # The head gives every row a gradient; the mean still covers only the rows looked up.
    assert stats.grad_mean_abs == pytest.approx(used.abs().mean().item(), rel=1e-5)
    assert stats.grad_mean_abs > 2 * grad.abs().mean().item()
    assert stats.zero_fraction == pytest.approx((used == 0).float().mean().item(), abs=1e-6)


def test_a_forward_that_raises_is_named_at_the_users_line_without_torch_frames():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            raise KeyError("no such feature")

    with pytest.raises(ProbeError) as caught:
        probe(Broken(), torch.randn(3, 4))

    message = str(caught.value)
    assert message.startswith("Broken.forward failed on the probe inputs (float32[3, 4]) at test_probe.py:")
    assert "(forward): KeyError: 'no such feature'" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_post_accumulate_grad_hooks_never_see_the_probe():
    # An optimizer step in backward is such a hook: running it would change the weights.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = []

    def step_in_backward(param):
        calls.append(param.shape)
        with torch.no_grad():
            param.sub_(0.1 * param.grad)

    handle = model[0].weight.register_post_accumulate_grad_hook(step_in_backward)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    profile = probe(model, torch.randn(3, 4))

    assert calls == []
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert profile.layer("0").received_grad and profile.layer("0").grad_mean_abs > 0
    handle.remove()


def test_existing_grads_keep_their_objects_and_values_whichever_gradient_path_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(3, 4)).sum().backward()
    grads = [param.grad for param in model.parameters()]
    values = [grad.clone() for grad in grads]

    probe(model, torch.randn(3, 4))

    assert all(param.grad is grad for param, grad in zip(model.parameters(), grads))
    assert all(torch.equal(grad, value) for grad, value in zip(grads, values))


@pytest.mark.parametrize("collecting", [True, False], ids=["gc-on", "gc-off"])
def test_the_cycle_collector_is_left_as_it_was_even_when_forward_raises(collecting):
    was = gc.isenabled()
    try:
        gc.enable() if collecting else gc.disable()
        probe(mlp(4, 4, 2), torch.randn(3, 4))
        assert gc.isenabled() is collecting
        with pytest.raises(ProbeError):
            probe(Raises(), torch.randn(3, 4))
        assert gc.isenabled() is collecting
    finally:
        gc.enable() if was else gc.disable()


def test_layer_stats_fields_keep_the_order_the_probe_fills_them_in():
    # The probe builds LayerStats positionally, for speed; a reordered field would mislabel numbers.
    assert [field.name for field in dataclasses.fields(LayerStats)] == [
        "name", "kind", "numel", "grad_mean_abs", "finite", "all_zero", "executed", "received_grad",
        "has_matrix", "is_norm", "shared_with", "unused_parameters",
        "grad_max_abs", "grad_norm", "weight_norm", "zero_fraction",
        "role", "input_std", "scale_invariance", "normalised", "output_std", "shares_input_with", "gate",
    ]  # fmt: skip


def test_tensors_outside_the_model_get_no_gradient():
    # A scale the forward pass reads from outside the module tree (a closure, a global,
    # an unregistered attribute) is a leaf of the graph, but not the probe's to touch.
    outside = torch.ones(4, requires_grad=True)
    inputs = torch.randn(3, 4, requires_grad=True)

    class UsesOutside(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x * outside)

    profile = probe(UsesOutside(), inputs)

    assert outside.grad is None and inputs.grad is None
    assert profile.layer("fc").grad_mean_abs > 0


def test_a_gradient_read_in_several_chunks_gives_the_numbers_of_the_whole():
    torch.manual_seed(0)
    model, ids = WideTiedLM(), torch.randint(0, 1000, (2, 8))
    twin = copy.deepcopy(model).train()
    default_loss(twin(ids)).backward()
    weight, bias = twin.wide.weight.grad, twin.wide.bias.grad

    wide = probe(model, ids, detail=True).layer("wide")

    assert weight.numel() > 262_144  # more than one chunk
    assert wide.grad_mean_abs == pytest.approx(weight.abs().mean().item(), rel=1e-5)
    assert wide.grad_norm == pytest.approx(math.hypot(weight.norm().item(), bias.norm().item()), rel=1e-5)
    assert wide.grad_max_abs == pytest.approx(max(weight.abs().max(), bias.abs().max()).item(), rel=1e-6)
    zeros = (weight == 0).sum().item() + (bias == 0).sum().item()
    assert wide.zero_fraction == pytest.approx(zeros / (weight.numel() + bias.numel()), abs=1e-7)
    assert wide.weight_norm == pytest.approx(
        math.hypot(twin.wide.weight.norm().item(), twin.wide.bias.norm().item()), rel=1e-5
    )
