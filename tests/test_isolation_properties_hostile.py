"""Property-based isolation tests over hostile models: forward passes that edit parameters in place,
register buffers, and train() methods that toggle requires_grad. Whatever the model does, the
probe returns a profile or a ProbeError, and the model comes back bit-identical (state.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers.state import assert_untouched, attempt, snapshot
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_gradcheck import ProbeError, probe

pytestmark = pytest.mark.slow

# Deterministic examples keep CI reproducible; small models run in a few seconds.
PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass
class Recipe:
    """A random MLP with hostile habits, and the state it is left in before the probe."""

    depth: int
    width: int
    in_place: str  # "none", "mul" (weight.mul_ under no_grad) or "add" (bias.add_ under no_grad)
    edited_block: int  # which block's parameters forward edits
    lazy_buffer: bool  # a block registers a buffer on its first forward
    train_hook: str  # "none", "freeze_in_eval" (train(mode) sets requires_grad=mode), "freeze_in_train"
    hooked_block: int
    dropout: float
    training: bool
    grad_fraction: float
    explicit_inputs: bool
    seed: int


recipes = st.builds(
    Recipe,
    depth=st.integers(1, 3),
    width=st.integers(2, 8),
    in_place=st.sampled_from(["none", "mul", "add"]),
    edited_block=st.integers(0, 2),
    lazy_buffer=st.booleans(),
    train_hook=st.sampled_from(["none", "freeze_in_eval", "freeze_in_train"]),
    hooked_block=st.integers(0, 2),
    dropout=st.sampled_from([0.0, 0.3]),
    training=st.booleans(),
    grad_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    explicit_inputs=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


class Block(nn.Module):
    def __init__(self, fan_in: int, width: int, recipe: Recipe, index: int):
        super().__init__()
        self.fc = nn.Linear(fan_in, width)
        self.drop = nn.Dropout(recipe.dropout)
        self.in_place = recipe.in_place if index == recipe.edited_block % recipe.depth else "none"
        self.lazy_buffer = recipe.lazy_buffer and index == 0

    def forward(self, x):
        if self.in_place == "mul":
            with torch.no_grad():
                self.fc.weight.mul_(0.5)
        elif self.in_place == "add":
            with torch.no_grad():
                self.fc.bias.add_(0.25)
        hidden = self.drop(torch.tanh(self.fc(x)))
        if self.lazy_buffer:
            if "cache" not in self._buffers:
                self.register_buffer("cache", torch.zeros(hidden.shape[-1]))
            hidden = hidden + self.cache
        return hidden


class HostileNet(nn.Module):
    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        widths = [5] + [recipe.width] * recipe.depth
        self.blocks = nn.ModuleList(Block(widths[i], widths[i + 1], recipe, i) for i in range(recipe.depth))
        self.head = nn.Linear(recipe.width, 3)

    def train(self, mode: bool = True):
        super().train(mode)
        hooked = self.blocks[self.recipe.hooked_block % self.recipe.depth]
        if self.recipe.train_hook == "freeze_in_eval":
            hooked.requires_grad_(mode)
        elif self.recipe.train_hook == "freeze_in_train" and mode:
            hooked.requires_grad_(False)
        return self

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(recipe: Recipe):
    torch.manual_seed(recipe.seed)
    model = HostileNet(recipe)
    nn.Module.train(model, recipe.training)  # the mode without the custom train()'s side effects
    generator = torch.Generator().manual_seed(recipe.seed)
    for param in model.parameters():
        if torch.rand((), generator=generator).item() < recipe.grad_fraction:
            param.grad = torch.randn(param.shape, generator=generator)
    inputs = torch.randn(4, 5, generator=generator) if recipe.explicit_inputs else None
    return model, inputs


@PROPERTY_SETTINGS
@given(recipe=recipes)
def test_hostile_models_come_back_bit_identical(recipe):
    model, inputs = build(recipe)
    before = snapshot(model)
    _, error = attempt(probe, model, inputs, seed=recipe.seed % 1000)
    assert error is None or isinstance(error, ProbeError), f"raw {type(error).__name__}: {error}"
    assert_untouched(model, before)


@PROPERTY_SETTINGS
@given(recipe=recipes)
def test_hostile_models_give_the_same_profile_for_the_same_seed(recipe):
    model, inputs = build(recipe)
    first, error = attempt(probe, model, inputs, seed=recipe.seed % 1000)
    if error is not None:
        assert isinstance(error, ProbeError), f"raw {type(error).__name__}: {error}"
        return
    torch.randn(100)  # the global RNG moves on between the two probes; the profile must not
    second, error = attempt(probe, model, inputs, seed=recipe.seed % 1000)
    assert error is None, f"the second probe failed where the first did not: {error!r}"
    assert second.to_dict() == first.to_dict()


@PROPERTY_SETTINGS
@given(recipe=recipes.filter(lambda r: r.in_place == "none" and not r.lazy_buffer and r.train_hook == "none"))
def test_models_without_hostile_habits_always_get_a_profile(recipe):
    # The control group: the same architecture, well behaved, probes and comes back untouched today.
    model, inputs = build(recipe)
    before = snapshot(model)
    profile = probe(model, inputs, seed=recipe.seed % 1000)
    assert [layer.name for layer in profile.layers][-1] == "head"
    assert_untouched(model, before)
