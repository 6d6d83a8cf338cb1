"""The rules the gradient ratio cannot see: the forward signal, the loss at init, and gradients through time."""

from __future__ import annotations

import math

from pytest_gradcheck.core.bounds import Bounds
from pytest_gradcheck.core.findings import Finding
from pytest_gradcheck.core.profile import GradientProfile, LayerStats, TimeProfile

# |cos(grad, weight)| of a weight the loss does not depend on the scale of: exactly 0 up to
# float rounding and normalisation's eps (docs, "Rules"). A weight that feeds a normalisation
# layer counts below the first bound; any weight below the second, which float32 reaches
# only for exact invariance (weight standardisation).
SCALE_INVARIANT_FED = 1e-2
SCALE_INVARIANT = 1e-6


def is_scale_invariant(layer: LayerStats) -> bool:
    """Whether the loss ignores the scale of ``layer``'s weights: <dL/dw, w> = 0 (Euler's theorem).

    A random weight may have a small |cos| by chance, so a weight must also feed a
    normalisation layer, unless the cosine is as small as only exact invariance makes it.
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


def signal_curve(profile: GradientProfile) -> list[tuple[str, float]]:
    """(layer, std of its input over the first layer's), for the weight layers in execution order.

    Normalisation layers are left out (the signal they receive is the one they rescale), and
    so are inputs with no spread at all: an exactly-zero gate before them, not a collapse.
    """
    points = [
        (layer.name, layer.input_std)
        for layer in profile.layers
        if layer.input_std is not None and layer.input_std > 0.0 and not layer.is_norm and layer.role == "layer"
    ]
    if not points or not math.isfinite(points[0][1]):
        return []
    reference = points[0][1]
    return [(name, std / reference) for name, std in points]


def output_signal(profile: GradientProfile) -> float | None:
    """The output's std over the first layer's input's, or None."""
    curve = [layer for layer in profile.layers if layer.input_std and not layer.is_norm and layer.role == "layer"]
    if profile.output_std is None or not curve or not curve[0].input_std:
        return None
    return profile.output_std / curve[0].input_std


def signal_findings(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    """The forward signal, the loss at init and the gradient through time, against their bounds."""
    return _signal(profile, bounds) + _initial_loss(profile, bounds) + _through_time(profile, bounds)


def _signal(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    curve = signal_curve(profile)
    if len(curve) < 2:
        return []
    findings = []
    first_name = curve[0][0]
    if bounds.min_signal is not None:
        low = [(name, value) for name, value in curve if value < bounds.min_signal]
        if low:
            where, value = low[0]
            lowest = min(low, key=lambda point: point[1])
            message = (
                f"vanishing signal: the forward signal collapses: the input of {where} has {value:.2g} of the std of "
                f"{first_name}'s input (< min_signal {bounds.min_signal:g}), the first layer below the bound"
                + (f"; lowest {lowest[1]:.2g} at {lowest[0]}" if lowest[0] != where else "")
            )
            findings.append(
                Finding("vanishing_signal", [name for name, _ in low], message, True, lowest[1], bounds.min_signal)
            )
    if bounds.max_signal is not None:
        output = output_signal(profile)
        points = curve + ([("the output", output)] if output is not None else [])
        high = [(name, value) for name, value in points if value > bounds.max_signal]
        if high:
            where, value = high[0]
            highest = max(high, key=lambda point: point[1])
            message = (
                f"exploding signal: the forward signal blows up: {_of(where)} has {value:.3g} times the std of "
                f"{first_name}'s input (> max_signal {bounds.max_signal:g}), the first above the bound"
                + (f"; highest {highest[1]:.3g} at {_of(highest[0])}" if highest[0] != where else "")
            )
            layers = [name for name, _ in high if name != "the output"]
            findings.append(Finding("exploding_signal", layers, message, True, highest[1], bounds.max_signal))
    return findings


def _of(name: str) -> str:
    return name if name == "the output" else f"the input of {name}"


def _initial_loss(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    """A classifier under cross-entropy whose initial loss is far above chance: its logits are far too large."""
    if bounds.max_initial_loss is None or not profile.under_softmax_loss or profile.expected_loss is None:
        return []
    classes = profile.output_classes or 0
    chance = math.log(classes)
    factor = profile.expected_loss / chance
    if factor <= bounds.max_initial_loss:
        return []
    std = f" (their std is {profile.output_std:.3g})" if profile.output_std is not None else ""
    message = (
        f"loss at init: the cross-entropy of the initial logits against a random label is {profile.expected_loss:.3g}, "
        f"{factor:.3g} times the chance level ln({classes}) = {chance:.3g} "
        f"(> max_initial_loss {bounds.max_initial_loss:g}): "
        f"the logits are far too large at init{std}, so the softmax is saturated"
    )
    return [Finding("loss_at_init", [], message, True, factor, bounds.max_initial_loss)]


def _through_time(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    findings = []
    for steps in profile.time:
        ratio = steps.ratio
        if ratio is None or math.isnan(ratio):
            continue
        if bounds.min_time_ratio is not None and ratio < bounds.min_time_ratio:
            findings.append(_time_finding(steps, ratio, bounds.min_time_ratio, "vanishing"))
        elif bounds.max_time_ratio is not None and ratio > bounds.max_time_ratio:
            findings.append(_time_finding(steps, ratio, bounds.max_time_ratio, "exploding"))
    return findings


def _time_finding(steps: TimeProfile, ratio: float, bound: float, direction: str) -> Finding:
    crossed = steps_back_to(steps, bound, direction)
    per_step = steps.per_step
    rate = f", {per_step:.3g}x per step" if per_step else ""
    sign = "<" if direction == "vanishing" else ">"
    name = "min_time_ratio" if direction == "vanishing" else "max_time_ratio"
    message = (
        f"{direction} in time: the gradient reaching the earliest of the {len(steps.steps)} steps of {steps.layer} "
        f"({steps.kind}) is {ratio:.3g} times the latest step's ({sign} {name} {bound:.3g}); it crosses the "
        f"bound {crossed} steps back{rate}"
    )
    return Finding(f"{direction}_in_time", [steps.layer], message, True, ratio, bound)


def steps_back_to(steps: TimeProfile, bound: float, direction: str) -> int:
    """How many steps back from the latest the gradient first crosses ``bound`` (relative to the latest)."""
    latest = steps.steps[-1]
    for back, value in enumerate(reversed(steps.steps)):
        relative = value / latest
        if (direction == "vanishing" and relative < bound) or (direction == "exploding" and relative > bound):
            return back
    return len(steps.steps) - 1
