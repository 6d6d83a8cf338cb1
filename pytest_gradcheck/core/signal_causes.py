"""The causes of a forward signal out of bounds and of gradients that vanish or explode through time."""

from __future__ import annotations

import math

from pytest_gradcheck.core.findings import Cause
from pytest_gradcheck.core.init_scale import init_nonlinearity
from pytest_gradcheck.core.profile import ActivationProfile, GradientProfile, InitScale
from pytest_gradcheck.core.ratio_causes import MAX_LOG10, listed
from pytest_gradcheck.core.signal import output_signal, signal_curve, steps_back_to

# A share of the signal's decades the init scales must account for to be named.
INIT_SHARE = 0.5
# Within this factor of Xavier's std with gain 1 (torch.nn.init.xavier_*'s default), a weight is said to use it.
XAVIER_TOLERANCE = 1.15


def signal_causes(profile: GradientProfile, data: ActivationProfile | None, rule: str) -> list[Cause]:
    """Ranked causes of a forward signal that collapses (vanishing_signal) or blows up (exploding_signal)."""
    curve = signal_curve(profile)
    if len(curve) < 2:
        return []
    vanishing = rule == "vanishing_signal"
    points = curve + ([("the output", value)] if (value := output_signal(profile)) is not None else [])
    extreme = min(points, key=lambda point: point[1]) if vanishing else max(points, key=lambda point: point[1])
    decades = min(MAX_LOG10, abs(math.log10(max(extreme[1], 1e-300))))
    layers = [name for name, _ in curve]
    steps = max(1, len(layers) - 1)
    causes = []
    if data is not None:
        causes += _init_mismatch(data.init_scales, layers, decades, vanishing)
        if not vanishing and data.shortest_chain < data.longest_chain and not data.normalisation:
            causes.append(_residual(data, decades, extreme[1]))
    if not causes:
        per_layer = extreme[1] ** (1.0 / steps)
        causes.append(
            Cause(
                "depth",
                f"depth: the signal {'shrinks' if vanishing else 'grows'} about {per_layer:.3g}x per layer over "
                f"{len(layers)} weight layers, {extreme[1]:.3g}x in all",
                {"layers": len(layers), "per_layer_factor": per_layer, "log10_factor": decades},
                "initialise every layer so that it keeps the scale of its input (nn.init.kaiming_normal_ before "
                "ReLUs), or normalise (LayerNorm/BatchNorm) every few layers",
            )
        )
    causes.sort(key=lambda cause: -cause.log10_factor)
    return causes


def _init_mismatch(scales: list[InitScale], layers: list[str], decades: float, vanishing: bool) -> list[Cause]:
    """Weights at a scale right for one activation and wrong for the one that follows them.

    A layer passes on about std * sqrt(fan_in) of its input's scale, times what its
    activation keeps; the Kaiming reference is the std that keeps the signal, so the
    signal changes by std / kaiming_std per layer, compounded over the layers.
    """
    on_path = [scale for scale in scales if scale.layer in layers and scale.std > 0 and scale.kaiming_std > 0]
    if not on_path:
        return []
    logs = [math.log10(scale.std / scale.kaiming_std) for scale in on_path]
    predicted = sum(logs)
    if (predicted < 0) != vanishing or abs(predicted) < INIT_SHARE * decades:
        return []
    per_layer = 10 ** (predicted / len(on_path))
    # The layer quoted is the first that moves the signal the way it went: the typical layer.
    worst = next((scale for scale, log in zip(on_path, logs) if (log < 0) == vanishing), on_path[0])
    xavier = sum(abs(math.log(s.std * s.gain / s.xavier_std)) < math.log(XAVIER_TOLERANCE) for s in on_path)
    scheme = (
        " This is Xavier's scale (gain 1), right for tanh and linear layers, not for what follows these"
        if xavier >= len(on_path) / 2 and worst.gain > 1.0
        else ""
    )
    summary = (
        f"initialisation: the weights of {listed([s.layer for s in on_path])} are about {per_layer:.3g}x the scale "
        f"that keeps the signal for the {worst.activation if worst.activation != 'linear' else 'no activation'} after "
        f"them ({worst.layer}.{worst.parameter}: std {worst.std:.3g} against Kaiming's {worst.kaiming_std:.3g} for "
        f"fan-in {worst.fan_in}, gain {worst.gain:.3g}), so each layer keeps {per_layer:.3g}x of the signal, "
        f"{10**predicted:.3g}x over {len(on_path)} layers.{scheme}"
    )
    nonlinearity = init_nonlinearity(worst.activation)
    fix = (
        f"initialise with the gain of the activation that follows, e.g. nn.init.kaiming_normal_(layer.weight, "
        f"nonlinearity={nonlinearity!r}) (He et al. 2015), or normalise (BatchNorm/LayerNorm) after each layer"
    )
    evidence = {
        "layers": [s.layer for s in on_path],
        "per_layer_factor": per_layer,
        "predicted_factor": 10**predicted,
        "std": worst.std,
        "kaiming_std": worst.kaiming_std,
        "xavier_std": worst.xavier_std,
        "gain": worst.gain,
        "log10_factor": min(MAX_LOG10, abs(predicted)),
    }
    return [Cause("initialisation", summary, evidence, fix)]


def _residual(data: ActivationProfile, decades: float, growth: float) -> Cause:
    """Residual branches added to the stream without normalisation: each adds its variance to the sum."""
    depth = data.longest_chain
    summary = (
        f"residual branches summed without normalisation: with no normalisation layer, each residual branch adds "
        f"its output's variance to the stream, which grows block after block ({growth:.3g}x over a longest path of "
        f"{depth} weight layers)"
    )
    fix = (
        "normalise each branch's input (pre-norm LayerNorm, BatchNorm), or scale the branches at init: zero-init "
        "the last layer of each branch (Fixup, Zhang et al. 2019; SkipInit) or a learnable gain starting at 0 (ReZero)"
    )
    evidence = {
        "longest_chain": depth,
        "shortest_chain": data.shortest_chain,
        "growth": growth,
        "log10_factor": decades,
    }
    return Cause("residual", summary, evidence, fix)


def time_causes(profile: GradientProfile, rule: str, layers: list[str], bound: float | None) -> list[Cause]:
    """Why the gradient vanishes or explodes through a recurrent layer's steps: its per-step factor, by cell."""
    direction = "vanishing" if rule == "vanishing_in_time" else "exploding"
    causes = []
    for steps in profile.time:
        if steps.layer not in layers or steps.ratio is None:
            continue
        per_step = steps.per_step or 0.0
        crossed = steps_back_to(steps, bound, direction) if bound else None
        mechanism, fix = _cell_mechanism(steps.kind, per_step, direction)
        limit = f"; it crosses the bound {crossed} steps back" if crossed is not None else ""
        overall = (
            f"exactly 0 from {steps.reached + 1} steps back (it underflows)"
            if steps.ratio == 0.0
            else f"{steps.ratio:.3g}x from the latest step to the earliest"
        )
        summary = (
            f"recurrence: {steps.layer} ({steps.kind}) runs {len(steps.steps)} steps and {mechanism}: "
            f"{per_step:.3g}x per step, {overall}{limit}"
        )
        if crossed:
            fix += f"; or backpropagate through at most {crossed} steps (truncated BPTT)"
        evidence = {
            "layer": steps.layer,
            "steps": len(steps.steps),
            "per_step_factor": per_step,
            "ratio": steps.ratio,
            "steps_back_to_bound": crossed,
            "log10_factor": min(MAX_LOG10, abs(math.log10(max(steps.ratio, 1e-300)))),
        }
        causes.append(Cause("recurrence", summary, evidence, fix))
    return causes


def _cell_mechanism(kind: str, per_step: float, direction: str) -> tuple[str, str]:
    """What multiplies the gradient at each step of this kind of cell, and what to change."""
    if direction == "exploding":
        return (
            "each step multiplies the gradient by its recurrent weights, whose largest singular value is above 1",
            "initialise the recurrent weights orthogonally (nn.init.orthogonal_), clip gradients "
            "(torch.nn.utils.clip_grad_norm_), or use a gated cell",
        )
    if "LSTM" in kind:
        return (
            "its forget gate starts at sigmoid(0) = 1/2, so the cell state, and the gradient through it, "
            "keeps about half of itself each step",
            "start the forget-gate bias at 1 (bias_ih_l0[hidden:2*hidden] = 1; Gers et al. 2000, "
            "Jozefowicz et al. 2015)",
        )
    if "GRU" in kind:
        return (
            "its update gate starts at sigmoid(0) = 1/2, so the state keeps about half of itself each step",
            "start the update-gate bias high, so the state is carried over at first (chrono init, Tallec & Ollivier "
            "2018), or use shorter sequences",
        )
    return (
        "each step multiplies the gradient by its recurrent weights and tanh's derivative (at most 1)",
        "initialise the recurrent weights orthogonally (nn.init.orthogonal_, Saxe et al. 2014) or use a gated cell "
        "(nn.LSTM with forget-gate bias 1, nn.GRU)",
    )
