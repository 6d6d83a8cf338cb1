"""Checks: pure functions from a profile and bounds to findings."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pytest_gradcheck.core.bounds import Bounds, resolve
from pytest_gradcheck.core.fairness import backward_ratio, is_scale_invariant, smallest_gate, stack_copy
from pytest_gradcheck.core.findings import Finding
from pytest_gradcheck.core.profile import ActivationStats, GradientProfile, LayerStats
from pytest_gradcheck.core.signal import signal_findings
from pytest_gradcheck.errors import SettingError


def check(profile: GradientProfile, bounds: Bounds | None = None, **overrides: Any) -> list[Finding]:
    """All findings for ``profile`` under ``bounds``, in a stable order.

    Keyword bounds override ``bounds`` (the defaults when it is None), as the fixture's
    keywords do: ``check(profile, min_ratio=0.05, max_ratio="off")``.
    """
    if bounds is None or overrides:
        bounds = resolve(bounds.to_dict() if bounds else {}, overrides)
    findings: list[Finding] = []
    findings += _ratio_findings(profile, bounds)
    findings += _max_grad_findings(profile, bounds)
    findings += _nonfinite_findings(profile)
    findings += _dead_findings(profile)
    findings += signal_findings(profile, bounds)
    findings += _unused_findings(profile, bounds)
    findings += _dead_relu_findings(profile, bounds)
    findings += _saturation_findings(profile, bounds)
    return findings


def _ratio_findings(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    ratio, first, last = profile.ratio, profile.first, profile.last
    if ratio is None or math.isnan(ratio) or first is None or last is None:
        return []
    pair = [first.name, last.name]
    numbers = (
        f"first layer {first.name} mean |grad| {first.grad_mean_abs:.3g}, "
        f"last layer {last.name} mean |grad| {last.grad_mean_abs:.3g}"
    )
    if bounds.min_ratio is not None and ratio < bounds.min_ratio:
        rule, bound, name, side = "vanishing", bounds.min_ratio, "min_ratio", "below"
    elif bounds.max_ratio is not None and ratio > bounds.max_ratio:
        rule, bound, name, side = "exploding", bounds.max_ratio, "max_ratio", "above"
    else:
        return []
    reason = _not_depth(profile, rule, bounds)
    if reason is None:
        sign = "<" if rule == "vanishing" else ">"
        message = f"{rule} gradients: first/last ratio {ratio:.3g} {sign} {name} {bound:g} ({numbers})"
        return [Finding(rule, pair, message, True, ratio, bound)]
    message = f"first/last ratio {ratio:.3g} is {side} {name} {bound:g} ({numbers}), but {reason}; not failing"
    return [Finding(rule, pair, message, False, ratio, bound)]


def _within(value: float | None, bounds: Bounds) -> bool:
    if value is None or math.isnan(value):
        return False
    low = bounds.min_ratio if bounds.min_ratio is not None else 0.0
    high = bounds.max_ratio if bounds.max_ratio is not None else math.inf
    return low <= value <= high


def _not_beyond(value: float | None, rule: str, bounds: Bounds) -> bool:
    """Whether ``value`` stays on the healthy side of the bound that ``rule`` crossed."""
    if value is None or math.isnan(value):
        return False
    if rule == "vanishing":
        return bounds.min_ratio is None or value >= bounds.min_ratio
    return bounds.max_ratio is None or value <= bounds.max_ratio


def _not_depth(profile: GradientProfile, rule: str, bounds: Bounds) -> str | None:
    """Why a ratio out of bounds is not the backward signal vanishing or exploding with depth, or None.

    Each reason is a measured mechanism (docs, "Rules"): the forward signal, scale invariance,
    the layers' own gains seen against a stack of repeated blocks, and small constant gates.
    """
    first, last = profile.first, profile.last
    assert first is not None and last is not None
    backward = backward_ratio(profile)
    if _not_beyond(backward, rule, bounds):
        return (
            f"a weight's gradient scales with its input, and {last.name}'s input has {_relative(first, last):.3g} "
            f"times the std of {first.name}'s: the backward signal itself changes by {backward:.3g}, not "
            f"{'below min_ratio' if rule == 'vanishing' else 'above max_ratio'}, and the forward signal rule "
            "judges the rest"
        )
    if rule == "exploding" and is_scale_invariant(first):
        # A weight followed by normalisation: its gradient shrinks as the weight grows, so a
        # large one corrects itself (Arora et al. 2019, Hoffer et al. 2018).
        return (
            f"{first.name}'s weights are scale-invariant (|cos(grad, weight)| is {first.scale_invariance:.2g} of "
            "its chance level: normalisation follows them), and a large gradient of a scale-invariant weight "
            "shrinks as the weight grows"
        )
    stack = stack_copy(profile, first)
    if stack is not None and _within(stack.ratio, bounds):
        return (
            f"{first.name} and its copy in the last of {stack.blocks} repeated blocks, {stack.copy.name}, read "
            f"{stack.ratio:.3g}: the gradient keeps its size through the stack, so the gap lies in the layers "
            "around it (a narrow or small-init head, a pooler, a branch's own gain), not in depth"
        )
    gate = smallest_gate(profile)
    if rule == "vanishing" and gate is not None and bounds.min_ratio is not None:
        value, holders = gate
        ratio = profile.ratio or 0.0
        if ratio >= bounds.min_ratio * value:
            return (
                f"the model holds gains at the constant {value:.2g} at init ({_listed(holders)}: LayerScale, "
                "ReZero or SkipInit gates), which scale the gradients of the layers behind them by that much "
                f"until training grows them; a ratio down to min_ratio x {value:.2g} = "
                f"{bounds.min_ratio * value:.2g} is the gates', not depth"
            )
    return None


def _relative(first: LayerStats, last: LayerStats) -> float:
    return (last.input_std or 0.0) / (first.input_std or 1.0)


def _max_grad_findings(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    if bounds.max_grad is None:
        return []
    if not profile.detailed:
        raise SettingError(
            "max_grad",
            f"max_grad needs each layer's largest |grad|, which the profile of {profile.model} does not hold; "
            "probe with detail=True (gradient_health and gradcheck do so whenever max_grad is set)",
        )
    limit = bounds.max_grad
    over = [
        (layer.name, largest)
        for layer in profile.layers
        if layer.finite and (largest := layer.grad_max_abs or 0.0) > limit
    ]
    if not over:
        return []
    worst, value = max(over, key=lambda pair: pair[1])
    message = (
        f"exploding gradients: {len(over)} layer(s) have |grad| above max_grad {limit:g}; "
        f"largest {value:.3g} in {worst}"
    )
    return [Finding("exploding", [name for name, _ in over], message, True, value, limit)]


def _nonfinite_findings(profile: GradientProfile) -> list[Finding]:
    bad = [layer.name for layer in profile.layers if layer.received_grad and not layer.finite]
    if not bad:
        return []
    message = f"non-finite gradients (NaN or Inf) in {len(bad)} layer(s): {', '.join(bad)}"
    return [Finding("nonfinite", bad, message, True)]


def _dead_findings(profile: GradientProfile) -> list[Finding]:
    gates, gated = zero_gates(profile)
    dead = [layer.name for layer in profile.layers if layer.dead and layer.name not in gated]
    findings = []
    if gated:
        shown = ", ".join(gates[:4]) + (f" and {len(gates) - 4} more" if len(gates) > 4 else "")
        message = (
            f"zero-initialised gates: {shown} hold exactly-zero gains or weights at init, so the "
            f"{len(gated)} layer(s) behind them get no gradient yet ({_listed(gated)}); they are not measurable "
            "until the first step moves the gates off zero (zero-init residuals and heads: Goyal et al. 2017, "
            "Fixup, SkipInit, ReZero); not failing"
        )
        findings.append(Finding("zero_init", gated, message, False))
    if dead:
        message = f"dead layers: every gradient is exactly zero in {len(dead)} layer(s): {', '.join(dead)}"
        findings.append(Finding("dead", dead, message, True))
    return findings


def zero_gates(profile: GradientProfile) -> tuple[list[str], list[str]]:
    """(zero gates, the layers behind them): exactly-zero gains or weights that pass no gradient back, yet get one.

    A layer that multiplies its output by an exactly-zero parameter (a zero BN gamma, a
    zero SkipInit gain, a zero-initialised head) passes nothing back, while its own gain
    gets a gradient. Behind such a gate, and so not dead, are the layers that got no
    gradient and ran before the last gate, or sit in a gate's own block (a squeeze-excite
    branch after a zero gamma reads only zeros): the first step moves the gate.
    """
    gates = [layer for layer in profile.layers if layer.gate == 0.0 and layer.received_grad and not layer.all_zero]
    if not gates:
        return [], []
    last = max(profile.layers.index(gate) for gate in gates)
    blocks = tuple(gate.name.rsplit(".", 1)[0] + "." for gate in gates if "." in gate.name)
    behind = [
        layer.name
        for index, layer in enumerate(profile.layers)
        if layer.dead and (index < last or layer.name.startswith(blocks))
    ]
    return [gate.name for gate in gates], behind


def _listed(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ... {names[-1]}"


def _unused_findings(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    params = [name for layer in profile.layers for name in layer.unused_parameters]
    if not params:
        return []
    layers = [layer.name for layer in profile.layers if layer.unused_parameters]
    how = (
        "failing because fail_on_unused is set" if bounds.fail_on_unused else "not failing; set fail_on_unused to fail"
    )
    message = f"unused parameters: {len(params)} trainable parameter(s) got no gradient ({', '.join(params)}); {how}"
    return [Finding("unused", layers, message, bounds.fail_on_unused)]


def _dead_relu_findings(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    """Opt-in: ReLU sites where at least ``dead_relu`` of the units are zero for the whole batch."""
    return _activation_rule(
        profile,
        "dead_relu",
        bounds.dead_relu,
        "dead_share",
        # From the threshold up, as in DeepDiagnosis.
        lambda share, limit: share >= limit,
        "dead ReLUs: {count} activation site(s) have at least dead_relu {limit:.0%} of their units "
        "zero for every sample in the batch: {places}",
    )


def _saturation_findings(profile: GradientProfile, bounds: Bounds) -> list[Finding]:
    """Opt-in: sigmoid/tanh sites where more than ``saturation`` of the inputs have |x| >= 5."""
    return _activation_rule(
        profile,
        "saturation",
        bounds.saturation,
        "saturated_share",
        # Strictly above, as in DeepDiagnosis.
        lambda share, limit: share > limit,
        "saturated activations: {count} sigmoid/tanh site(s) have more than saturation {limit:.0%} "
        "of their inputs at |x| >= 5: {places}",
    )


def _activation_rule(
    profile: GradientProfile,
    rule: str,
    limit: float | None,
    share_field: str,
    crosses: Callable[[float, float], bool],
    template: str,
) -> list[Finding]:
    """One finding listing every activation site whose ``share_field`` crosses ``limit``."""
    if limit is None:
        return []
    if profile.activations is None:
        return [_not_measured(rule)]
    sites = [
        site
        for site in profile.activations.sites
        if getattr(site, share_field) is not None and crosses(getattr(site, share_field), limit)
    ]
    if not sites:
        return []
    worst = max(sites, key=lambda site: getattr(site, share_field))
    places = ", ".join(f"{getattr(site, share_field):.0%} {site.where} ({site.call})" for site in sites)
    message = template.format(count=len(sites), limit=limit, places=places)
    return [Finding(rule, _after_layers(sites), message, True, getattr(worst, share_field), limit)]


def _after_layers(sites: list[ActivationStats]) -> list[str]:
    return list(dict.fromkeys(s.after for s in sites if s.after is not None))


def _not_measured(rule: str) -> Finding:
    message = (
        f"the {rule} rule is on but this profile has no activation statistics; "
        "check through gradient_health or pytest_gradcheck.assess, which measure them"
    )
    return Finding(rule, [], message, False)
