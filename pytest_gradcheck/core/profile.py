"""What a probe measured, as plain data: dataclasses of numbers and names that go straight to JSON."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerStats:
    """Gradient statistics of one module that directly owns trainable parameters.

    ``grad_max_abs``, ``grad_norm``, ``weight_norm`` and ``zero_fraction`` are None
    unless the probe ran with ``detail=True`` (the report table, plots and the
    ``max_grad`` bound ask for it).

    ``role`` is "layer" (it applies its weights to its input), "lookup" (an embedding
    table) or "container" (a model's own module holding tokens, tables or gains next to
    its submodules); None in files written before it was measured. ``input_std`` is the std
    of its first input: the forward signal.
    ``scale_invariance`` is |cos| between its weight and the weight's gradient in units of
    the chance level 1/sqrt(n), measured for the first weight layers: about 1 for an ordinary
    weight, near 0 when normalisation follows it. ``normalised`` says whether its output
    reaches a normalisation layer through element-wise activations at most, and
    ``output_std`` is then the std of what that layer receives; ``shares_input_with`` names
    the layers that read the very same input (the query, key and value projections of one
    attention); ``gate`` is the constant, at most 1e-3 in magnitude, that one of its gains
    holds at init (a LayerScale, ReZero or SkipInit gain, a zero BN gamma) or 0.0 for an
    exactly-zero weight matrix (read when some layer got no gradient), else None.
    """

    name: str
    kind: str
    numel: int
    grad_mean_abs: float
    finite: bool = True
    all_zero: bool = False
    executed: bool = True
    received_grad: bool = True
    has_matrix: bool = True
    is_norm: bool = False
    shared_with: list[str] = field(default_factory=list)
    unused_parameters: list[str] = field(default_factory=list)
    grad_max_abs: float | None = None
    grad_norm: float | None = None
    weight_norm: float | None = None
    zero_fraction: float | None = None
    role: str | None = None
    input_std: float | None = None
    scale_invariance: float | None = None
    normalised: bool | None = None
    output_std: float | None = None
    shares_input_with: list[str] = field(default_factory=list)
    gate: float | None = None

    @property
    def pickable(self) -> bool:
        """Whether this layer may serve as the ratio's first or last layer: a weight layer with a gradient.

        Not a norm, an embedding table, a container's own tokens, nor a layer holding a gate: its
        mean |grad| is the gate's, over weights the gate still holds at (almost) nothing.
        """
        return (
            self.has_matrix
            and self.received_grad
            and self.grad_mean_abs > 0.0  # a weight with no gradient at all is the dead rule's, not the ratio's
            and not self.is_norm
            and self.role not in ("lookup", "container")
            and self.gate is None
        )

    @property
    def dead(self) -> bool:
        """All gradients exactly zero although the layer is in the loss graph."""
        return self.received_grad and self.finite and self.all_zero


@dataclass
class ActivationStats:
    """One activation site of the instrumented forward pass: a function, where it sits, what it saw.

    Calls of the same function after the same layer (an RNN cell over many steps) pool
    into one site; ``calls`` says how many there were.
    """

    function: str
    call: str
    after: str | None
    calls: int
    numel: int
    output_std: float
    saturated_share: float | None = None
    dead_share: float | None = None
    mean_derivative: float | None = None
    derivative_bound: float | None = None
    input_mean: float | None = None
    input_std: float | None = None

    @property
    def where(self) -> str:
        """'after fc1', 'after (root)' or 'before any layer'."""
        if self.after is None:
            return "before any layer"
        return f"after {self.after or '(root)'}"


@dataclass
class InitScale:
    """One weight matrix's standard deviation next to the Kaiming and Xavier references for it."""

    layer: str
    parameter: str
    fan_in: int
    fan_out: int
    std: float
    activation: str
    gain: float
    kaiming_std: float
    xavier_std: float

    @property
    def reference_std(self) -> float:
        """The nearer of the two references (on a log scale): the scheme the layer seems to follow."""
        if self.std <= 0.0:
            return self.kaiming_std
        return min((self.kaiming_std, self.xavier_std), key=lambda ref: abs(math.log(self.std / ref)))

    @property
    def factor(self) -> float:
        """std / reference_std: below 1 the weights are too small, above 1 too large."""
        return self.std / self.reference_std


@dataclass
class ActivationProfile:
    """What the instrumented forward pass measured (``pytest_gradcheck.probing.activations``)."""

    sites: list[ActivationStats] = field(default_factory=list)
    init_scales: list[InitScale] = field(default_factory=list)
    longest_chain: int = 0
    shortest_chain: int = 0
    normalisation: list[str] = field(default_factory=list)
    repeated: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActivationProfile:
        values = dict(data)
        values["sites"] = [ActivationStats(**site) for site in data.get("sites", [])]
        values["init_scales"] = [InitScale(**scale) for scale in data.get("init_scales", [])]
        return cls(**values)


# Rows of an output gradient that must have softmax cross-entropy's shape (p - y) for the output
# to count as a classifier's under cross-entropy.
SOFTMAX_SHARE = 0.5


@dataclass
class TimeProfile:
    """The gradient that reached each step of one recurrent layer's input or state, earliest step first."""

    layer: str
    kind: str
    steps: list[float]

    @property
    def ratio(self) -> float | None:
        """Mean |grad| at the earliest step over the latest's, or None with fewer than two steps."""
        if len(self.steps) < 2 or not all(math.isfinite(step) for step in self.steps):
            return None
        latest = self.steps[-1]
        if latest == 0.0:
            return None
        return self.steps[0] / latest

    @property
    def per_step(self) -> float | None:
        """The factor the gradient changes by per step back in time (geometric mean), or None.

        Taken over the steps back to the earliest one the gradient still reaches: where it
        underflows to exactly 0 further back, those steps say nothing about the rate.
        """
        ratio = self.ratio
        if ratio is None:
            return None
        latest = self.steps[-1]
        for back, value in enumerate(reversed(self.steps[:-1]), start=1):
            if value == 0.0:
                if back == 1:
                    return 0.0
                reached = self.steps[-back]
                return (reached / latest) ** (1.0 / (back - 1))
        return ratio ** (1.0 / (len(self.steps) - 1)) if ratio > 0.0 else None

    @property
    def reached(self) -> int:
        """How many steps back from the latest the gradient is still non-zero (all of them: len - 1)."""
        for back, value in enumerate(reversed(self.steps[:-1]), start=1):
            if value == 0.0:
                return back - 1
        return len(self.steps) - 1


@dataclass
class GradientProfile:
    """Per-layer gradient statistics of one forward and backward pass.

    ``loss_kind`` says where the loss came from: "random" (the default: the output
    projected on a fixed random direction), "model" (the output's own ``loss``),
    "loss_fn" (the caller's), or "sum" (the output's sum: the default of older files).
    The ``output_*`` fields describe the output the loss read: its std, the share of its
    rows whose gradient has the shape of softmax cross-entropy's (p - y), its number of
    classes (last dimension), and ``expected_loss``, its cross-entropy against a uniformly
    random label (log-sum-exp minus the mean logit), and the layer whose weights produce it.
    ``time`` follows recurrent layers.
    """

    model: str
    layers: list[LayerStats]
    loss: float
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    input_shapes: list[str] = field(default_factory=list)
    loss_kind: str = "sum"
    output_std: float | None = None
    output_softmax_share: float | None = None
    output_classes: int | None = None
    expected_loss: float | None = None
    output_layer: str | None = None
    time: list[TimeProfile] = field(default_factory=list)
    # None unless the instrumented activation pass ran (pytest_gradcheck.assess decides when).
    activations: ActivationProfile | None = None

    @property
    def first(self) -> LayerStats | None:
        """First executed layer with a weight matrix that received a gradient (see :meth:`at_depth_of`)."""
        return self.at_depth_of(next((layer for layer in self.layers if layer.pickable), None))

    def at_depth_of(self, layer: LayerStats | None) -> LayerStats | None:
        """Of ``layer`` and the layers that read the very same input, the one with the largest gradient.

        They sit at one depth, and the backward signal there shows in the largest of their
        gradients: a layer whose output is multiplied by another activation (attention's
        query and key, in scores = q k^T) gets only the part that passes the softmax, which
        starts near uniform.
        """
        if layer is None or not layer.shares_input_with:
            return layer
        names = set(layer.shares_input_with)
        group = [layer] + [other for other in self.layers if other.name in names and other.pickable]
        return max(group, key=lambda other: other.grad_mean_abs)

    @property
    def last(self) -> LayerStats | None:
        """Last executed layer with a weight matrix that received a gradient.

        Under a softmax cross-entropy, not the layer that produces the logits: its gradient
        is p - y, about 1/C for every class but one at init, so its mean |grad| is diluted by
        the C classes rather than by anything that vanished. The ratio ends at the layer before.
        """
        picks = [layer for layer in reversed(self.layers) if layer.pickable][:2]
        if len(picks) == 2 and picks[0].name == self.output_layer and self.under_softmax_loss:
            return self.at_depth_of(picks[1])
        return self.at_depth_of(picks[0]) if picks else None

    @property
    def under_softmax_loss(self) -> bool:
        """Whether the loss is a softmax cross-entropy of the output: its gradient is p - y, row by row."""
        share = self.output_softmax_share
        return share is not None and share >= SOFTMAX_SHARE and (self.output_classes or 0) > 1

    @property
    def ratio(self) -> float | None:
        """first.grad_mean_abs / last.grad_mean_abs, or None when it cannot be formed."""
        first, last = self.first, self.last
        if first is None or last is None or first is last:
            return None
        if not (first.finite and last.finite):
            return float("nan")
        return first.grad_mean_abs / last.grad_mean_abs

    @property
    def detailed(self) -> bool:
        """Whether the probe measured the detail statistics (``probe(..., detail=True)``)."""
        return bool(self.layers) and all(layer.grad_max_abs is not None for layer in self.layers)

    def layer(self, name: str) -> LayerStats:
        """The layer called ``name``; raises KeyError listing the known names."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in self.layers)
        raise KeyError(f"no layer named {name!r} in the profile of {self.model}; layers: {known}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (the ratio and picks included for readers)."""
        data = dataclasses.asdict(self)
        data["ratio"] = self.ratio
        data["first"] = self.first.name if self.first else None
        data["last"] = self.last.name if self.last else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradientProfile:
        """Rebuild a profile from :meth:`to_dict` output (derived keys are ignored)."""
        layer_fields = {f.name for f in dataclasses.fields(LayerStats)}
        layers = [LayerStats(**{k: v for k, v in layer.items() if k in layer_fields}) for layer in data["layers"]]
        own_fields = {f.name for f in dataclasses.fields(cls)} - {"layers", "activations", "time"}
        activations = data.get("activations")
        if activations is not None:
            activations = ActivationProfile.from_dict(activations)
        time = [TimeProfile(**steps) for steps in data.get("time", [])]
        values = {k: v for k, v in data.items() if k in own_fields}
        return cls(layers=layers, activations=activations, time=time, **values)
