"""The causes of a first/last ratio out of bounds, and of dead layers: activations, init, depth, recurrence."""

from __future__ import annotations

import math

from pytest_gradcheck.core.bounds import DEFAULT_DEAD_RELU, DEFAULT_SATURATION, Bounds
from pytest_gradcheck.core.findings import Cause
from pytest_gradcheck.core.init_scale import init_nonlinearity
from pytest_gradcheck.core.profile import ActivationProfile, ActivationStats, GradientProfile, InitScale
from pytest_gradcheck.core.signal import signal_curve

# Activations between the first and last layer that together keep at most this much of the
# gradient are a cause: one sigmoid's derivative bound.
SATURATION_CHAIN_FACTOR = 0.25
# A weight std this many times off its Kaiming/Xavier reference is a cause. PyTorch's own
# default (uniform, std 1/sqrt(3 fan_in)) sits 2.45x under the ReLU reference and is not flagged.
INIT_FACTOR_LIMIT = 4.0
# Decades the forward signal must move across the chain, in a normalised model, for an init
# scale to be a cause: a scheme like BERT's N(0, 0.02) moves it less (0.77 decades at width 64,
# where the pooler's tanh output reaches the head at 0.17), a broken init by several.
SIGNAL_MOVED = 1.0
# A shortest input-to-output path through at least this many weight layers counts as deep.
DEPTH_LIMIT = 6
# One layer applied at least this often along that path is a recurrence (an unrolled RNN).
RECURRENCE_LIMIT = 4
# log10 of the factor a cause accounts for is capped here (a fully dead layer, a ratio of 0).
MAX_LOG10 = 30.0


def ratio_causes(profile: GradientProfile, data: ActivationProfile, rule: str, bounds: Bounds) -> list[Cause]:
    """Ranked causes of a vanishing or exploding first/last ratio."""
    vanishing = rule == "vanishing"
    chain = Chain(profile)
    causes = []
    if vanishing:
        causes += _saturation(chain, data.sites, bounds)
        causes += _dead_relu(chain, data.sites, bounds)
    causes += _initialisation(chain, data.init_scales, data.repeated, vanishing, profile)
    explained = sum(cause.log10_factor for cause in causes)
    causes += _depth(chain, data, vanishing, explained)
    return causes


def dead_causes(profile: GradientProfile, data: ActivationProfile, bounds: Bounds) -> list[Cause]:
    """Why layers got no gradient at all: dead ReLUs anywhere after the first of them."""
    dead = [index for index, layer in enumerate(profile.layers) if layer.dead]
    if not dead:
        return []
    chain = Chain(profile, start=dead[0], stop=len(profile.layers))
    return _dead_relu(chain, data.sites, bounds)


class Chain:
    """The layers between the profile's first and last layer (or ``start`` and ``stop``), in execution order."""

    def __init__(self, profile: GradientProfile, start: int | None = None, stop: int | None = None) -> None:
        names = [layer.name for layer in profile.layers]
        first, last = profile.first, profile.last
        if start is not None and stop is not None:
            stop = min(stop, len(names) - 1)
        elif first is None or last is None or first is last:
            start, stop = 0, len(names) - 1
        else:
            start, stop = names.index(first.name), names.index(last.name)
        # Activations after the last layer scale every gradient alike, so they end the chain.
        self.before_last = set(names[start:stop])
        self.layers = set(names[start : stop + 1])
        self.first = names[start] if names else "-"
        self.last = names[stop] if names else "-"
        self.decades = _decades(profile.ratio)

    def holds(self, site: ActivationStats) -> bool:
        return site.after is not None and site.after in self.before_last

    @property
    def span(self) -> str:
        return f"between {self.first} and {self.last}"


def _decades(ratio: float | None) -> float:
    """|log10| of the first/last ratio, capped; 0 when there is no ratio."""
    if ratio is None or math.isnan(ratio):
        return 0.0
    if ratio <= 0.0 or math.isinf(ratio):
        return MAX_LOG10
    return min(MAX_LOG10, abs(math.log10(ratio)))


def _saturation(chain: Chain, sites: list[ActivationStats], bounds: Bounds) -> list[Cause]:
    on_chain = [s for s in sites if s.function in ("sigmoid", "tanh") and chain.holds(s)]
    derivatives = [(s.calls, s.mean_derivative) for s in on_chain if s.mean_derivative is not None]
    on_chain = [s for s in on_chain if s.mean_derivative is not None]
    if not on_chain:
        return []
    calls = sum(s.calls for s in on_chain)
    log10_factor = -sum(count * math.log10(max(derivative, 1e-30)) for count, derivative in derivatives)
    threshold = bounds.saturation if bounds.saturation is not None else DEFAULT_SATURATION
    saturated = max(on_chain, key=lambda s: s.saturated_share or 0.0)
    if 10**-log10_factor > SATURATION_CHAIN_FACTOR and (saturated.saturated_share or 0.0) <= threshold:
        return []
    functions = sorted({s.function for s in on_chain})
    bound = max(s.derivative_bound or 1.0 for s in on_chain)
    mean_derivative = 10 ** (-log10_factor / calls)
    share = saturated.saturated_share or 0.0
    saturation = (
        f"{share:.0%} of the inputs {saturated.where} are saturated (|x| >= 5)"
        if share
        else "none of their inputs is saturated (|x| >= 5)"
    )
    summary = (
        f"saturating activations: {calls} {'/'.join(functions)} call(s) {chain.span} ({_places(on_chain)}) "
        f"each pass at most {bound:g} of the gradient ({mean_derivative:.3g} measured), "
        f"{10**-log10_factor:.3g} together; {saturation}"
    )
    if "sigmoid" in functions:
        fix = (
            "use ReLU or GELU between hidden layers and keep sigmoid for outputs and gates; "
            "or normalise (LayerNorm/BatchNorm) right before each sigmoid"
        )
    else:
        fix = (
            "keep tanh inputs near zero: normalise before it (LayerNorm), initialise the layer "
            "feeding it with nn.init.xavier_normal_(w, gain=5/3), or use a gated cell (nn.LSTM/nn.GRU)"
        )
    evidence = {
        "function": "/".join(functions),
        "calls": calls,
        "where": [s.where for s in on_chain],
        "mean_derivative": mean_derivative,
        "derivative_bound": bound,
        "chain_factor": 10**-log10_factor,
        "saturated_share": share,
        "log10_factor": log10_factor,
    }
    return [Cause("saturation", summary, evidence, fix)]


def _dead_relu(chain: Chain, sites: list[ActivationStats], bounds: Bounds) -> list[Cause]:
    threshold = bounds.dead_relu if bounds.dead_relu is not None else DEFAULT_DEAD_RELU
    dead: list[tuple[ActivationStats, float]] = []
    for site in sites:
        share = site.dead_share
        if share is not None and share >= threshold and chain.holds(site):
            dead.append((site, share))
    if not dead:
        return []
    # The gradient reaching a layer through a ReLU scales with the share of units still alive.
    log10_factor = -sum(s.calls * math.log10(max(1.0 - share, 1e-6)) for s, share in dead)
    worst, worst_share = max(dead, key=lambda pair: pair[1])
    inputs = f", mean input {worst.input_mean:.3g}" if worst.input_mean is not None else ""
    summary = (
        f"dead ReLUs: {worst_share:.0%} of the units {worst.where} ({worst.call}{inputs}) are zero "
        f"for every sample in the batch (threshold {threshold:.0%})"
        + (f", and {len(dead) - 1} more site(s) over it" if len(dead) > 1 else "")
        + "; no gradient flows back through a dead unit"
    )
    fix = (
        f"check the weights and bias of {worst.after or 'the layer'} that feed the ReLU (a large negative "
        "bias or a too-high learning rate kills units): start biases at 0 with Kaiming init, lower the "
        "learning rate, or use LeakyReLU/GELU"
    )
    evidence = {
        "where": [s.where for s, _ in dead],
        "dead_share": worst_share,
        "input_mean": worst.input_mean,
        "threshold": threshold,
        "log10_factor": min(MAX_LOG10, log10_factor),
    }
    return [Cause("dead_relu", summary, evidence, fix)]


def _initialisation(
    chain: Chain, scales: list[InitScale], repeated: dict[str, int], vanishing: bool, profile: GradientProfile
) -> list[Cause]:
    def off(scale: InitScale) -> float:
        """How many times too small (vanishing) or too large (exploding); below 1: the other way."""
        if scale.std <= 0.0:
            return math.inf if vanishing else 0.0
        return 1.0 / scale.factor if vanishing else scale.factor

    flagged = [s for s in scales if off(s) >= INIT_FACTOR_LIMIT]
    on_chain = [s for s in flagged if s.layer in chain.layers]
    if not on_chain or (
        profile.activations and profile.activations.normalisation and not _signal_moved(profile, chain, vanishing)
    ):
        return []
    log10_factor = sum(repeated.get(s.layer, 1) * min(MAX_LOG10, math.log10(off(s))) for s in on_chain)
    # Only the layers between the first and the last one explain the ratio; a badly
    # initialised head outside that chain is not named as the cause.
    factor = 10 ** (sum(math.log10(min(off(s), 1e30)) for s in on_chain) / len(on_chain))
    worst = max(on_chain, key=off)
    direction = "below" if vanishing else "above"
    names = listed([s.layer for s in on_chain])
    followed_by = "no activation" if worst.activation == "linear" else worst.activation
    summary = (
        f"initialisation: the weights of {names} are about {factor:.3g}x {direction} the Kaiming/Xavier "
        f"reference ({worst.layer}.{worst.parameter}: std {worst.std:.3g} against {worst.reference_std:.3g} "
        f"for fan-in {worst.fan_in}, gain {worst.gain:.3g}, {followed_by})"
    )
    nonlinearity = init_nonlinearity(worst.activation)
    fix = (
        f"re-initialise {names} at the reference scale (std {worst.reference_std:.3g} for {worst.layer}), e.g. "
        f"nn.init.kaiming_normal_(layer.weight, nonlinearity={nonlinearity!r}), or drop the custom init "
        "and keep PyTorch's default"
    )
    evidence = {
        "layers": [s.layer for s in on_chain],
        "factor": factor,
        "direction": direction,
        "worst_layer": worst.layer,
        "worst_factor": off(worst),
        "std": worst.std,
        "reference_std": worst.reference_std,
        "kaiming_std": worst.kaiming_std,
        "xavier_std": worst.xavier_std,
        "fan_in": worst.fan_in,
        "fan_out": worst.fan_out,
        "gain": worst.gain,
        "log10_factor": min(MAX_LOG10, log10_factor),
    }
    return [Cause("initialisation", summary, evidence, fix)]


def _signal_moved(profile: GradientProfile, chain: Chain, vanishing: bool) -> bool:
    """Whether the forward signal shrinks (vanishing) or grows across the chain by half a decade or more.

    In a normalised model, a weight scale away from the reference changes the gradients only
    where it changes the signal: normalisation after it (BERT's N(0, 0.02), T5's scaled
    queries) rescales the signal, and such an init is not a cause. The signal is read where
    the chain starts and where it ends (inputs inside a branch, an attention's output, may be
    small by design). Without normalisation a bounded activation (tanh) may hide in the signal
    what the gradient shows, so it is not asked.
    """
    points = [value for name, value in signal_curve(profile) if name in chain.layers]
    if len(points) < 2:
        return True
    change = math.log10(points[-1] / points[0])
    return abs(change) >= SIGNAL_MOVED and (change < 0) == vanishing


def _depth(chain: Chain, data: ActivationProfile, vanishing: bool, explained: float) -> list[Cause]:
    """Depth (or an unrolled recurrence) takes whatever part of the ratio the specific causes leave."""
    shortest = data.shortest_chain
    if shortest < DEPTH_LIMIT:
        return []
    log10_factor = max(0.0, chain.decades - explained)
    steps = max(1, shortest - 1)
    # A ratio of 0 or inf (a layer with no gradient at all) has no meaningful per-layer rate.
    per_layer = 10 ** (chain.decades / steps) if chain.decades < MAX_LOG10 else None
    change = "shrinks" if vanishing else "grows"
    rate = f"; the gradient {change} about {per_layer:.3g}x per " if per_layer else ""
    norms = len(data.normalisation)
    looped = {name: count for name, count in data.repeated.items() if name in chain.layers}
    recurrent = max(looped, key=lambda name: looped[name], default=None)
    evidence: dict[str, float | int | str | None] = {
        "shortest_chain": shortest,
        "longest_chain": data.longest_chain,
        "normalisation_layers": norms,
        "per_layer_factor": per_layer,
        "log10_factor": log10_factor,
    }
    if recurrent is not None and looped[recurrent] >= max(RECURRENCE_LIMIT, shortest / 2):
        evidence.update(layer=recurrent, steps=looped[recurrent])
        summary = (
            f"recurrence: {recurrent} is applied {looped[recurrent]} times in sequence ({shortest} weight "
            f"layers on the shortest path from input to output){rate + 'step' if rate else ''}"
        )
        fix = (
            f"use a gated cell (nn.LSTM/nn.GRU), initialise {recurrent} orthogonally (nn.init.orthogonal_), "
            "or backpropagate through fewer steps (truncated BPTT)"
            + ("" if vanishing else "; clip gradients with torch.nn.utils.clip_grad_norm_")
        )
        return [Cause("recurrence", summary, evidence, fix)]
    normalised = "no normalisation" if not norms else f"{norms} normalisation layer(s)"
    if shortest == data.longest_chain:
        shape = f"{shortest} weight layers in a plain stack (no residual connection, {normalised})"
    else:
        shape = (
            f"even through its residual connections the shortest path crosses {shortest} weight layers ({normalised})"
        )
    summary = f"depth: {shape}{rate + 'layer' if rate else ''}"
    fix = (
        "add residual connections (x = x + block(x)) or normalisation (LayerNorm/BatchNorm) every few layers, "
        "or use Kaiming init (nn.init.kaiming_normal_) so each layer keeps the gradient scale; or use fewer layers"
    )
    return [Cause("depth", summary, evidence, fix)]


def _places(sites: list[ActivationStats]) -> str:
    return listed([site.where.replace("after ", "") for site in sites], prefix="after ")


def listed(names: list[str], prefix: str = "") -> str:
    """'fc1, fc2, fc3' or, for long lists, 'fc1, fc2, ... fc9 (9)'."""
    unique = list(dict.fromkeys(names))
    if len(unique) <= 4:
        return prefix + ", ".join(unique)
    return f"{prefix}{unique[0]}, {unique[1]}, ... {unique[-1]} ({len(unique)})"
