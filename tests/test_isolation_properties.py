"""Property-based tests: over random MLPs and conv nets, the probe leaves no trace and is reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers.state import assert_untouched, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_gradcheck import ProbeError, probe

# Thirty models per property take seconds: out of the quick loop (pytest -m "not slow").
pytestmark = pytest.mark.slow

# Deterministic examples keep CI reproducible; 30 small models run in a few seconds.
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
ACTIVATIONS = {
    "none": nn.Identity,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}


@dataclass
class Recipe:
    """A random architecture and the state it is left in before the probe, as plain data."""

    kind: str  # "mlp" or "conv"
    depth: int
    width: int
    activation: str
    norm: str  # "none", "batch" or "layer" (GroupNorm with one group for conv)
    dropout: float
    training: bool
    frozen: list[bool]  # per block, plus the head last
    grad_fraction: float  # share of parameters holding a .grad before the probe
    explicit_inputs: bool
    user_hooks: bool
    under_no_grad: bool  # the probe is called inside torch.no_grad()
    seed: int


recipes = st.builds(
    Recipe,
    kind=st.sampled_from(["mlp", "conv"]),
    depth=st.integers(1, 4),
    width=st.integers(2, 12),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    norm=st.sampled_from(["none", "batch", "layer"]),
    dropout=st.sampled_from([0.0, 0.2, 0.5]),
    training=st.booleans(),
    frozen=st.lists(st.booleans(), min_size=5, max_size=5),
    grad_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    explicit_inputs=st.booleans(),
    user_hooks=st.booleans(),
    under_no_grad=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def norm_layer(recipe: Recipe, width: int) -> nn.Module:
    if recipe.norm == "batch":
        return nn.BatchNorm1d(width) if recipe.kind == "mlp" else nn.BatchNorm2d(width)
    if recipe.norm == "layer":
        return nn.LayerNorm(width) if recipe.kind == "mlp" else nn.GroupNorm(1, width)
    return nn.Identity()


def build(recipe: Recipe) -> tuple[nn.Module, torch.Tensor | None]:
    """The model a recipe describes, in the state it describes, and its inputs (None: inferred)."""
    torch.manual_seed(recipe.seed)
    in_width, blocks = 5, []
    for index in range(recipe.depth):
        if recipe.kind == "mlp":
            layer, dropout = nn.Linear(in_width, recipe.width), nn.Dropout(recipe.dropout)
        else:
            layer, dropout = nn.Conv2d(in_width, recipe.width, 3, padding=1), nn.Dropout2d(recipe.dropout)
        block = nn.Sequential(layer, norm_layer(recipe, recipe.width), ACTIVATIONS[recipe.activation](), dropout)
        block.requires_grad_(not recipe.frozen[index])
        blocks.append(block)
        in_width = recipe.width
    if recipe.kind == "conv":
        blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    head = nn.Linear(recipe.width, 3).requires_grad_(not recipe.frozen[-1])
    model = nn.Sequential(*blocks, head).train(recipe.training)

    generator = torch.Generator().manual_seed(recipe.seed)
    for param in model.parameters():
        if torch.rand((), generator=generator).item() < recipe.grad_fraction:
            param.grad = torch.randn(param.shape, generator=generator)
    if recipe.user_hooks:
        model[0].register_forward_pre_hook(lambda module, args: None)
        head.register_forward_hook(lambda module, args, output: None)
        model.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    shape = (4, 5) if recipe.kind == "mlp" else (4, 5, 6, 6)
    inputs = torch.randn(shape, generator=generator) if recipe.explicit_inputs else None
    return model, inputs


def run_probe(model: nn.Module, inputs, recipe: Recipe):
    if recipe.under_no_grad:
        with torch.no_grad():
            return probe(model, inputs, seed=recipe.seed % 1000)
    return probe(model, inputs, seed=recipe.seed % 1000)


def trainable(model: nn.Module) -> bool:
    return any(param.requires_grad for param in model.parameters())


# The recipe's own backward hook warns when its input needs no grad; that is the user's hook talking.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@PROPERTY_SETTINGS
@given(recipe=recipes)
def test_probe_leaves_the_model_and_rng_bit_identical(recipe):
    model, inputs = build(recipe)
    grad_mode = torch.is_grad_enabled()
    before = snapshot(model)
    if trainable(model):
        profile = run_probe(model, inputs, recipe)
        assert [layer.name for layer in profile.layers], "a trainable model gave an empty profile"
    else:
        with pytest.raises(ProbeError, match="no trainable parameters"):
            run_probe(model, inputs, recipe)
    assert_untouched(model, before)
    assert torch.is_grad_enabled() == grad_mode


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@PROPERTY_SETTINGS
@given(recipe=recipes.filter(lambda recipe: not all(recipe.frozen)))
def test_same_seed_gives_the_same_profile(recipe):
    model, inputs = build(recipe)
    if not trainable(model):  # the head is frozen and so is every block
        return
    first = run_probe(model, inputs, recipe).to_dict()
    torch.randn(100)  # the global RNG moves on between the two probes; the profile must not
    assert run_probe(model, inputs, recipe).to_dict() == first


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@PROPERTY_SETTINGS
@given(recipe=recipes)
def test_frozen_parameters_never_appear_in_the_profile(recipe):
    model, inputs = build(recipe)
    if not trainable(model):
        return
    profile = run_probe(model, inputs, recipe)
    frozen_owners = {
        name
        for name, module in model.named_modules()
        if any(not param.requires_grad for param in module.parameters(recurse=False))
    }
    assert not frozen_owners & {layer.name for layer in profile.layers}
    assert sum(layer.numel for layer in profile.layers) == sum(
        param.numel() for param in model.parameters() if param.requires_grad
    )
