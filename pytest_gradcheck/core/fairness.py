"""When a first/last ratio out of bounds is not a depth problem: the documented explanations.

The ratio compares two weight gradients, and a weight's gradient is the backward signal
at its output times its input. Besides depth, three things move it, each measured here:

- the forward signal: the two layers' inputs differ in scale (``backward_ratio``);
- scale invariance: normalisation follows the first layer, so its gradient size says
  nothing about its training (``is_scale_invariant``);
- the layers' own gains: a narrow or fixed-std head, a pooler, a branch's output
  projection. The same layer in the first and the last of a stack of repeated blocks has
  the same gains, so their ratio is depth alone (``stack_copy``);
- gates: gains held at a small constant at init (LayerScale, ReZero, SkipInit) scale
  every gradient behind them by that constant until training grows them (``smallest_gate``).

Each function is pure: a profile in, numbers or layers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pytest_gradcheck.core.profile import GradientProfile, LayerStats

# |cos(grad, weight)| in units of its chance level 1/sqrt(n): a weight unrelated to its gradient
# reads |N(0, 1)|, about 0.8, and below 1e-3 one time in a thousand. Exact invariance (weight
# standardisation) leaves only rounding. A weight that feeds a norm reads under half the chance
# level: exactly 0 through ReLU, up to 0.2 through GELU or with a bias before the activation.
SCALE_INVARIANT = 1e-3
SCALE_INVARIANT_FED = 0.5


@dataclass(frozen=True)
class StackCopy:
    """A layer's copy in the last block of the stack of repeated blocks it belongs to."""

    layer: LayerStats
    copy: LayerStats
    blocks: int

    @property
    def ratio(self) -> float:
        return self.layer.grad_mean_abs / self.copy.grad_mean_abs


def stack_copy(profile: GradientProfile, layer: LayerStats) -> StackCopy | None:
    """``layer``'s copy in the last of its repeated blocks (``encoder.layer.0.attention.self.value``
    and ``encoder.layer.11.attention.self.value``), or None when it is not in such a stack.

    A stack is a list of blocks (``<parent>.<i>``), each holding two or more weight layers;
    the copies are the layers at the same path in each block, of the same kind and size.
    A list of single layers (an ``nn.Sequential`` MLP) is not a stack of blocks: there the
    ratio between the layers is what the ratio rule is for.
    """
    parts = layer.name.split(".")
    for position in reversed(range(len(parts) - 1)):
        if not parts[position].isdigit():
            continue
        parent, suffix = parts[:position], parts[position + 1 :]
        copies: dict[int, LayerStats] = {}
        members: dict[int, int] = {}
        for other in profile.layers:
            other_parts = other.name.split(".")
            if len(other_parts) <= position or other_parts[:position] != parent:
                continue
            if not other_parts[position].isdigit():
                continue
            index = int(other_parts[position])
            if other.has_matrix:
                members[index] = members.get(index, 0) + 1
            if other_parts[position + 1 :] == suffix and other.kind == layer.kind and other.numel == layer.numel:
                copies[index] = other
        blocks = [index for index in copies if members.get(index, 0) >= 2]
        if len(blocks) < 2:
            continue
        last = copies[max(blocks)]
        if last is layer or not last.pickable:
            return None
        return StackCopy(layer, last, len(blocks))
    return None


def smallest_gate(profile: GradientProfile) -> tuple[float, list[str]] | None:
    """The smallest non-zero constant gain in the model, and the layers that hold it; None if none.

    Exact zeros are the dead rule's (what is behind them gets no gradient at all). The model's
    own (root) parameters are tokens and tables that the model concatenates or adds, never gains.
    """
    gated = [(layer.gate, layer.name) for layer in profile.layers if layer.gate and layer.name]
    if not gated:
        return None
    smallest = min(value for value, _ in gated)
    return smallest, [name for value, name in gated if math.isclose(value, smallest, rel_tol=1e-6)]


def is_scale_invariant(layer: LayerStats) -> bool:
    """Whether the loss ignores the scale of ``layer``'s weights: <dL/dw, w> = 0 (Euler's theorem).

    A weight unrelated to its gradient reads about 1 (|cos| in units of 1/sqrt(n)). Below
    SCALE_INVARIANT only exact invariance explains it (weight standardisation); below
    SCALE_INVARIANT_FED it counts where the weight feeds a normalisation layer.
    """
    cosine = layer.scale_invariance
    if cosine is None:
        return False
    return cosine < SCALE_INVARIANT or (bool(layer.normalised) and cosine < SCALE_INVARIANT_FED)


def backward_ratio(profile: GradientProfile) -> float | None:
    """The first/last ratio with the forward signal taken out: the backward signal's own change.

    A weight's gradient is the backward signal at its output times its input, so where the
    inputs shrink or grow across the network the ratio moves with them; times the last
    input's std over the first's, what is left is how the backward signal changed.
    """
    ratio, first, last = profile.ratio, profile.first, profile.last
    if ratio is None or first is None or last is None or not math.isfinite(ratio):
        return None
    if not first.input_std or not last.input_std or math.isnan(first.input_std) or math.isnan(last.input_std):
        return None
    return ratio * last.input_std / first.input_std
