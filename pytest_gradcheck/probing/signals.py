"""What else the gradient pass shows: the forward signal, the output, scale invariance, and steps in time.

Each measurement is a few device tensors that join the probe's one copy to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_gradcheck.probing import model_io
from pytest_gradcheck.probing.layers import ExecutionRecord, Layer, is_norm_layer
from pytest_gradcheck.probing.statistics import float32_norms

# Elements an activation's scale is estimated from: its std to about 1%, which is plenty
# for a signal followed over decades, read in a strided pass instead of a whole one.
_SCALE_SAMPLE = 1 << 16
# Inputs up to this many elements are stacked with others of their size for one reduction.
_SMALL_INPUT = 1 << 14
# Weight layers at the start of the execution order whose scale invariance is measured:
# the ratio's first layer is one of them unless the earliest ones got no gradient.
_INVARIANCE_CANDIDATES = 6
# A parameter that holds one constant no larger than this at init is a gate: LayerScale starts
# at 1e-1 to 1e-6 (Touvron et al. 2021), ReZero and SkipInit at 0, zero-init residual BN gammas at 0.
GATE_SCALE = 1e-3
# Layers at the end of the execution order looked at first for the one that produces the output.
_OUTPUT_CANDIDATES = 8
# A layer called this often in one forward pass is followed through time (an RNN cell).
RECURRENCE_CALLS = 4


@dataclass
class TimeSource:
    """The tensors whose gradients show one recurrent layer's steps, earliest first."""

    layer: str
    kind: str
    tensors: list[torch.Tensor]
    time_dim: int | None  # a fused RNN's one sequence tensor: its time dimension; None for one tensor a step


def siblings(layers: list[Layer], record: ExecutionRecord) -> dict[int, list[str]]:
    """For each layer that reads the very same input tensor as others (attention's q, k and v): their names."""
    readers: dict[int, list[Layer]] = {}
    for layer in layers:
        args = record.first_args.get(id(layer.module))
        if args and isinstance(args[0], torch.Tensor):
            readers.setdefault(id(args[0]), []).append(layer)
    found = {}
    for group in readers.values():
        if len(group) > 1:
            for layer in group:
                found[id(layer.module)] = [other.name for other in group if other is not layer]
    return found


def input_scales(layers: list[Layer], record: ExecutionRecord) -> list[tuple[list[int], torch.Tensor]]:
    """The std of each layer's first floating-point input: (module ids, their stds as one device tensor).

    Inputs of one size, device and dtype up to _SMALL_INPUT elements are stacked and reduced
    together, one kernel per group instead of one per layer (a 1,000-layer MLP has 1,000);
    larger ones are reduced one by one, from a strided sample.
    """
    groups: dict[tuple[int, torch.device, torch.dtype], tuple[list[int], list[torch.Tensor]]] = {}
    scales = []
    for layer in layers:
        args = record.first_args.get(id(layer.module))
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor) or not first.is_floating_point() or first.numel() <= 1:
            continue
        if first.numel() <= _SMALL_INPUT and not first.is_complex():
            keys, tensors = groups.setdefault((first.numel(), first.device, first.dtype), ([], []))
            keys.append(id(layer.module))
            tensors.append(first.detach().reshape(-1))
        else:
            scales.append(([id(layer.module)], tensor_scale(first).reshape(1)))
    with torch.no_grad():
        for keys, tensors in groups.values():
            scales.append((keys, torch.stack(tensors).float().std(dim=1, unbiased=False)))
    return scales


def tensor_scale(tensor: torch.Tensor) -> torch.Tensor:
    """The std of ``tensor``'s elements, from a strided sample of the large ones."""
    with torch.no_grad():
        values = tensor.detach()
        values = values.real if values.is_complex() else values
        if values.numel() > _SCALE_SAMPLE and values.is_contiguous():
            flat = values.view(-1)
            step = math.ceil(flat.numel() / _SCALE_SAMPLE)
            # A step that shares no factor with the last dimension visits every column.
            while math.gcd(step, values.shape[-1]) != 1:
                step += 1
            values = flat[::step]
        return values.float().std(unbiased=False)


def main_output(output: Any) -> torch.Tensor | None:
    """The output tensor a loss reads: the tensor itself, ``logits`` where there are, else the first float tensor."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        return logits
    floats = [tensor for tensor in model_io.tensors_in(output, max_depth=2) if tensor.is_floating_point()]
    return floats[0] if floats else None


# Autograd nodes between a weight and the tensor it produces that change neither which weight
# it is nor the output's meaning: transposes, reshapes, dtype casts, the matmul itself.
_PRODUCING = frozenset({
    "AddmmBackward0", "MmBackward0", "BmmBackward0", "ConvolutionBackward0", "MkldnnConvolutionBackward0",
    "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0",
    "ReshapeAliasBackward0", "ToCopyBackward0", "CloneBackward0", "SqueezeBackward0", "UnsqueezeBackward0",
    "SqueezeBackward1", "UnsqueezeBackward1", "ExpandBackward0",
})  # fmt: skip
# Element-wise activations between a weight and the normalisation it feeds: ReLU keeps the
# weight exactly scale-invariant (it is positively homogeneous), the smooth ones nearly so.
_ELEMENTWISE = frozenset({
    "ReluBackward0", "LeakyReluBackward0", "GeluBackward0", "SiluBackward0", "HardswishBackward0",
    "EluBackward0", "MishBackward0", "HardtanhBackward0",
})  # fmt: skip


def output_layer(output: torch.Tensor, layers: list[Layer]) -> str | None:
    """The layer whose weight matrix produces ``output`` directly (a classifier's head), or None."""
    # Only the last layers can produce the output: look up their weights, not every layer's.
    producers = _producers(output, _weight_owners(layers[-_OUTPUT_CANDIDATES:]))
    if not producers and len(layers) > _OUTPUT_CANDIDATES:  # a head that ran early (used after a loop)
        producers = _producers(output, _weight_owners(layers))
    return producers[0].name if producers else None


def normalised_layers(layers: list[Layer], record: ExecutionRecord) -> dict[int, int]:
    """The layers whose output reaches a normalisation layer through element-wise activations at
    most (conv -> BN, conv -> GELU -> BN): producer's module id -> the norm's."""
    norms = [
        (layer, args[0])
        for layer in layers
        if is_norm_layer(layer.module)
        and (args := record.first_args.get(id(layer.module)))
        and isinstance(args[0], torch.Tensor)
    ]
    if not norms:  # no graph to walk, and no owners to look up
        return {}
    owners = _weight_owners(layers)
    found: dict[int, int] = {}
    for layer, tensor in norms:
        for producer in _producers(tensor, owners, _PRODUCING | _ELEMENTWISE):
            found.setdefault(id(producer.module), id(layer.module))
    return found


def _weight_owners(layers: list[Layer]) -> dict[int, Layer]:
    return {id(param): layer for layer in layers for _, param in layer.params if param.dim() >= 2}


def _producers(tensor: torch.Tensor, owners: dict[int, Layer], through: frozenset[str] = _PRODUCING) -> list[Layer]:
    """The layers whose weight matrices produce ``tensor`` with nothing but ``through`` nodes in between."""
    frontier, seen, found = [tensor.grad_fn], set(), []
    for _ in range(6):
        following = []
        for node in frontier:
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)  # an AccumulateGrad: a leaf
            if variable is not None:
                if id(variable) in owners:
                    found.append(owners[id(variable)])
            elif type(node).__name__ in through:
                following += [function for function, _ in node.next_functions]
        frontier = following
    return found


def output_measures(output: torch.Tensor, grad: torch.Tensor | None, softmax_possible: bool) -> list[torch.Tensor]:
    """[std, share of rows whose gradient has softmax cross-entropy's shape, expected CE, classes].

    Without ``softmax_possible`` (the default random-direction loss, whose gradient is never
    p - y) the share is 0 and the expected cross-entropy NaN, unmeasured: over a language
    model's 50,000-way logits each is a pass of its own.
    """
    with torch.no_grad():
        logits = output.detach().float()
        classes = logits.shape[-1] if logits.dim() >= 1 else 1
        rows = logits.reshape(-1, classes) if logits.dim() >= 1 else logits.reshape(1, 1)
        shape_share = torch.zeros((), device=logits.device)
        expected = torch.full((), math.nan, device=logits.device)
        if softmax_possible:
            # Cross-entropy against a uniformly random label: log-sum-exp minus the mean logit.
            expected = (torch.logsumexp(rows, dim=-1) - rows.mean(dim=-1)).mean()
            if grad is not None and classes > 1:
                shape_share = _softmax_share(grad.detach().float().reshape(-1, classes))
        return [tensor_scale(logits), shape_share, expected, torch.tensor(float(classes), device=logits.device)]


def _softmax_share(rows: torch.Tensor) -> torch.Tensor:
    """Share of the rows with a gradient whose gradient is p - y over the classes.

    Softmax cross-entropy gives every class p_c and the label p_y - 1: each row sums to
    zero and holds one negative entry. A random direction or a squared error does neither.
    """
    magnitude = rows.abs().sum(dim=-1)
    live = magnitude > 0
    balanced = rows.sum(dim=-1).abs() <= 1e-3 * magnitude
    one_negative = (rows < 0).sum(dim=-1) == 1
    return (live & balanced & one_negative).sum() / live.sum().clamp(min=1)


def invariance_candidates(layers: list[Layer], grads: dict[int, torch.Tensor | None]) -> list[Layer]:
    """The first few weight layers that got a gradient: where the ratio's first layer comes from."""
    eligible = (
        layer
        for layer in layers
        if classify(layer.module) == "layer"
        and not is_norm_layer(layer.module)
        and any(param.dim() >= 2 and grads.get(id(param)) is not None for _, param in layer.params)
    )
    return [layer for _, layer in zip(range(_INVARIANCE_CANDIDATES), eligible)]


def scale_invariance(layer: Layer, grads: dict[int, torch.Tensor | None]) -> torch.Tensor:
    """|cos| between a layer's weight and its gradient, in units of the chance level 1/sqrt(n).

    By Euler's theorem, a loss that does not change when w is scaled has <dL/dw, w> = 0:
    a weight followed by normalisation, whose gradient shrinks as the weight grows. A gradient
    unrelated to the weight has |cos| about sqrt(2 / (pi n)) for n entries, so |cos| sqrt(n)
    is about 1 for an ordinary weight and far below 1 only for an invariant one. The weight is
    the layer's largest parameter (a weight-standardised conv's gain is not invariant).
    """
    with torch.no_grad():
        weights = [param for _, param in layer.params if param.dim() >= 2]
        param = max(weights, key=lambda weight: weight.numel(), default=None)
        grad = grads.get(id(param)) if param is not None else None
        if param is None or grad is None or grad.is_sparse or grad.is_complex() or param.is_complex():
            return torch.tensor(math.nan)
        if grad.shape != param.shape:
            return torch.tensor(math.nan)
        g, w = _flat32(grad), _flat32(param)
        dot, norm_grad, norm_weight = torch.stack([torch.dot(g, w), torch.dot(g, g), torch.dot(w, w)]).double()
        cosine = dot.abs() / (norm_grad * norm_weight).sqrt().clamp(min=1e-300)
        return cosine * math.sqrt(param.numel())


def _flat32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as one float32 (or float64) row: a view where it can be, for fused dot products."""
    flat = tensor.detach().reshape(-1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def time_sources(layers: list[Layer], record: ExecutionRecord) -> list[TimeSource]:
    """Recurrent modules' sequence inputs, and the per-call states of layers called again and again."""
    names = {id(layer.module): layer for layer in layers}
    sources = []
    for key, sequence, time_dim in record.sequences:
        layer = names.get(key)
        if layer is not None and sequence.shape[time_dim] > 1:
            sources.append(TimeSource(layer.name, type(layer.module).__name__, [sequence], time_dim))
    fused = {key for key, _, _ in record.sequences}
    for key, calls in record.repeated_args.items():
        layer = names.get(key)
        if layer is None or key in fused or len(calls) < RECURRENCE_CALLS:
            continue
        states = [_state(args) for args in calls]
        # A loop that starts from a constant state (zeros) has no gradient at its first input:
        # the steps are those whose state carries one.
        tensors = [state for state in states if state is not None]
        if len(tensors) >= 2:
            sources.append(TimeSource(layer.name, type(layer.module).__name__, tensors, None))
    return sources


def _state(args: tuple[Any, ...]) -> torch.Tensor | None:
    """The one tensor of a call's arguments that carries gradient: the hidden state, or an input that does."""
    for arg in args:
        for tensor in model_io.tensors_in(arg, max_depth=1):
            if tensor.requires_grad and tensor.is_floating_point():
                return tensor
    return None


def step_gradients(source: TimeSource, grads: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Mean |gradient| at each step of ``source``, earliest first, on the device."""
    with torch.no_grad():
        if source.time_dim is not None:
            grad = grads[0]
            if grad is None:
                return None
            other = [dim for dim in range(grad.dim()) if dim != source.time_dim]
            return grad.detach().abs().float().mean(dim=other)
        per_step = [grad.detach().abs().float().mean() for grad in grads if grad is not None]
        return torch.stack(per_step) if per_step else None


def gate_values(layers: list[Layer]) -> dict[int, torch.Tensor]:
    """By module id: the smallest constant that one of its vector-sized non-bias parameters
    holds, if no larger than GATE_SCALE (a LayerScale, ReZero or SkipInit gain, a zero BN
    gamma), else inf. Layers without such a parameter are left out.

    Only vector-sized parameters are read (no more entries than their largest dimension), so
    this costs a min and a max per gain, not a pass over the weight matrices. A parameter
    whose name says bias is additive, never a gate.
    """
    with torch.no_grad():
        values = {}
        for layer in layers:
            found = None
            for key, param in layer.params:
                if "bias" in key or not param.numel() or param.numel() > max(param.shape, default=1):
                    continue
                if param.is_complex() or not param.is_floating_point():
                    continue
                low, high = torch.aminmax(param.detach().reshape(-1).float())
                gate = torch.where((low == high) & (high.abs() <= GATE_SCALE), high.abs(), math.inf)
                found = gate if found is None else torch.minimum(found, gate)
            if found is not None:
                values[id(layer.module)] = found
        return values


def zero_weights(layers: list[Layer]) -> tuple[list[int], list[torch.Tensor]]:
    """The L1 norm of every non-bias weight, 0 only for an exactly-zero one (a zero-initialised
    head): (parameter ids, device tensors whose values follow them in order).

    Small weights of one shape are stacked and reduced together, large ones get one fused norm
    per device and dtype: a handful of kernels for a 1,000-layer model, not one per weight.
    """
    with torch.no_grad():
        groups: dict[tuple[torch.Size, torch.device, torch.dtype], list[torch.Tensor]] = {}
        large, complex_weights = [], []
        for layer in layers:
            for key, param in layer.params:
                if not is_weight(key, param):
                    continue
                if param.is_complex():
                    complex_weights.append(param)
                elif param.numel() <= _SMALL_INPUT:
                    groups.setdefault((param.shape, param.device, param.dtype), []).append(param)
                else:
                    large.append(param)
        order, tensors = [], []
        for group in groups.values():
            stacked = torch.stack([param.detach() for param in group]).reshape(len(group), -1)
            tensors.append(stacked.abs().sum(1, dtype=torch.float32))
            order += [id(param) for param in group]
        if large:
            tensors += [norm.reshape(1) for norm in float32_norms([param.detach() for param in large], 1)]
            order += [id(param) for param in large]
        tensors += [param.detach().abs().sum().float().reshape(1) for param in complex_weights]
        order += [id(param) for param in complex_weights]
        return order, tensors


def is_weight(key: str, param: torch.Tensor) -> bool:
    """Whether a parameter is a (non-empty) weight that could gate a layer, not an additive bias."""
    return "bias" not in key and param.numel() > 0


def classify(module: nn.Module) -> str:
    """A layer's role: 'lookup' (an embedding table), 'container' (a model's own module holding
    tokens, tables or gains next to its submodules) or 'layer' (it applies its weights)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "lookup"
    if module._modules and not type(module).__module__.startswith("torch.nn"):
        return "container"
    return "layer"
