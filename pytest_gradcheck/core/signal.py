"""The rules the gradient ratio cannot see: the forward signal, the loss at init, and gradients through time."""

from __future__ import annotations

import math

from pytest_gradcheck.core.bounds import Bounds
from pytest_gradcheck.core.findings import Finding
from pytest_gradcheck.core.profile import GradientProfile, TimeProfile


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


def first_input_std(profile: GradientProfile) -> float | None:
    """The std of the first weight layer's input: what the signal curve is relative to."""
    for layer in profile.layers:
        if layer.input_std is not None and layer.input_std > 0.0 and not layer.is_norm and layer.role == "layer":
            return layer.input_std if math.isfinite(layer.input_std) else None
    return None


def output_signal(profile: GradientProfile) -> float | None:
    """The output's std over the first layer's input's, or None."""
    curve = [layer for layer in profile.layers if layer.input_std and not layer.is_norm and layer.role == "layer"]
    if profile.output_std is None or not curve or not curve[0].input_std:
        return None
    return profile.output_std / curve[0].input_std


def signal_findings(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    """The forward signal, the loss at init and the gradient through time, against their bounds."""
    return _signal(profile, bounds) + _initial_loss(profile, bounds) + _through_time(profile, bounds)


# A head input this close above min_signal is said, not failed: He et al.'s 22-layer Xavier net
# (2.4e-5 here) and VGG-11 at N(0, 0.01) (3.7e-5) train, slowly; the zoo's real models read 7.6e-3 and up.
WEAK_SIGNAL_FACTOR = 100.0


def main_path_end(profile: GradientProfile, curve: list[tuple[str, float]]) -> int:
    """Where the forward signal is judged: the output layer's input, else the last weight layer's.

    Inputs inside branches (a squeeze-excite's pooled vector, attention's output) may be small
    by design; what reaches the head has passed the whole network.
    """
    names = [name for name, _ in curve]
    if profile.output_layer in names:
        return names.index(profile.output_layer)
    return len(curve) - 1


def _signal(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    curve = signal_curve(profile)
    reference = first_input_std(profile)
    if len(curve) < 2 or reference is None:
        return []
    findings = []
    first_name = curve[0][0]
    # Judged against the unit scale as well as the input's: normalisation brings a small input
    # up to std 1 and a large one down to it, and neither is the signal exploding or vanishing.
    if bounds.min_signal is not None:
        lift = max(reference, 1.0)
        end = main_path_end(profile, curve)
        end_name, value = curve[end][0], curve[end][1] * lift
        if value < bounds.min_signal:
            start = end
            while start > 0 and curve[start - 1][1] * lift < bounds.min_signal:
                start -= 1
            where, crossed = curve[start][0], curve[start][1] * lift
            message = (
                f"vanishing signal: the forward signal collapses: the input of {end_name} has {value:.2g} of the std "
                f"of {first_name}'s input{_unit(reference)} (< min_signal {bounds.min_signal:g})"
                + (f"; it fell below the bound at {where}'s input ({crossed:.2g})" if start != end else "")
            )
            low = [name for name, _ in curve[start : end + 1]]
            findings.append(Finding("vanishing_signal", low, message, True, value, bounds.min_signal))
        elif value < bounds.min_signal * WEAK_SIGNAL_FACTOR:
            message = (
                f"weak signal: the input of {end_name} has {value:.2g} of the std of {first_name}'s "
                f"input{_unit(reference)}, above min_signal {bounds.min_signal:g} but within "
                f"{WEAK_SIGNAL_FACTOR:g}x of it: a network whose signal shrinks this much trains slowly, if at all "
                "(He et al. 2015); not failing"
            )
            findings.append(Finding("vanishing_signal", [end_name], message, False, value, bounds.min_signal))
    if bounds.max_signal is not None:
        shrink = min(reference, 1.0)
        output = output_signal(profile)
        points = curve + ([("the output", output)] if output is not None else [])
        high = [(name, value * shrink) for name, value in points if value * shrink > bounds.max_signal]
        if high:
            where, value = high[0]
            highest = max(high, key=lambda point: point[1])
            message = (
                f"exploding signal: the forward signal blows up: {_of(where)} has {value:.3g} times the std of "
                f"{first_name}'s input{_unit(reference)} (> max_signal {bounds.max_signal:g}), the first above the "
                "bound" + (f"; highest {highest[1]:.3g} at {_of(highest[0])}" if highest[0] != where else "")
            )
            layers = [name for name, _ in high if name != "the output"]
            findings.append(Finding("exploding_signal", layers, message, True, highest[1], bounds.max_signal))
    return findings


def _unit(reference: float) -> str:
    """Where the first input's std is not near 1, say what the signal is measured against."""
    if 0.5 <= reference <= 2.0:
        return ""
    return f" (std {reference:.2g}; against std 1, the scale normalisation gives, where that is nearer)"


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
        f"({steps.kind}) is {_times(ratio)} the latest step's ({sign} {name} {bound:.3g}); it crosses the "
        f"bound {crossed} steps back{rate}"
    )
    return Finding(f"{direction}_in_time", [steps.layer], message, True, ratio, bound)


def _times(ratio: float) -> str:
    return "exactly 0 times (it underflows)" if ratio == 0.0 else f"{ratio:.3g} times"


def steps_back_to(steps: TimeProfile, bound: float, direction: str) -> int:
    """How many steps back from the latest the gradient first crosses ``bound`` (relative to the latest)."""
    latest = steps.steps[-1]
    for back, value in enumerate(reversed(steps.steps)):
        relative = value / latest
        if (direction == "vanishing" and relative < bound) or (direction == "exploding" and relative > bound):
            return back
    return len(steps.steps) - 1
