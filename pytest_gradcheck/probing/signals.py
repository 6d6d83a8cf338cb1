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

# Elements an activation's scale is estimated from: its std to about 1%, which is plenty
# for a signal followed over decades, read in a strided pass instead of a whole one.
_SCALE_SAMPLE = 1 << 16
# Weight layers at the start of the execution order whose scale invariance is measured:
# the ratio's first layer is one of them unless the earliest ones got no gradient.
_INVARIANCE_CANDIDATES = 3
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


def input_scales(layers: list[Layer], record: ExecutionRecord) -> dict[int, torch.Tensor]:
    """The std of each layer's first floating-point input, by module id, as 0-d device tensors."""
    scales = {}
    for layer in layers:
        args = record.first_args.get(id(layer.module))
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.is_floating_point() and first.numel() > 1:
            scales[id(layer.module)] = tensor_scale(first)
    return scales


def backward_candidates(
    layers: list[Layer], record: ExecutionRecord, count: int = 4
) -> list[tuple[Layer, torch.Tensor]]:
    """The first and last ``count`` weight layers whose input carries gradient, with that input."""
    found = []
    for layer in layers:
        args = record.first_args.get(id(layer.module))
        first = args[0] if args else None
        if (
            isinstance(first, torch.Tensor)
            and first.requires_grad
            and first.is_floating_point()
            and classify(layer.module) == "layer"
            and not is_norm_layer(layer.module)
            and any(param.dim() >= 2 for _, param in layer.params)
        ):
            found.append((layer, first))
    picked = found[:count] + found[-count:]
    return list({id(layer.module): (layer, tensor) for layer, tensor in picked}.values())


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
_PRODUCING = {
    "AddmmBackward0", "MmBackward0", "BmmBackward0", "ConvolutionBackward0", "MkldnnConvolutionBackward0",
    "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0",
    "ReshapeAliasBackward0", "ToCopyBackward0", "CloneBackward0", "SqueezeBackward0", "UnsqueezeBackward0",
    "SqueezeBackward1", "UnsqueezeBackward1", "ExpandBackward0",
}  # fmt: skip


def output_layer(output: torch.Tensor, layers: list[Layer]) -> str | None:
    """The layer whose weight matrix produces ``output`` directly (a classifier's head), or None."""
    producers = _producers(output, _weight_owners(layers))
    return producers[0].name if producers else None


def normalised_layers(layers: list[Layer], record: ExecutionRecord) -> dict[int, int]:
    """The layers whose output goes straight into a normalisation layer: producer's module id -> the norm's."""
    owners = _weight_owners(layers)
    found: dict[int, int] = {}
    for layer in layers:
        args = record.first_args.get(id(layer.module))
        if args and isinstance(args[0], torch.Tensor) and is_norm_layer(layer.module):
            for producer in _producers(args[0], owners):
                found.setdefault(id(producer.module), id(layer.module))
    return found


def _weight_owners(layers: list[Layer]) -> dict[int, Layer]:
    return {id(param): layer for layer in layers for _, param in layer.params if param.dim() >= 2}


def _producers(tensor: torch.Tensor, owners: dict[int, Layer]) -> list[Layer]:
    """The layers whose weight matrices produce ``tensor`` with nothing but reshapes in between."""
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
            elif type(node).__name__ in _PRODUCING:
                following += [function for function, _ in node.next_functions]
        frontier = following
    return found


def output_measures(output: torch.Tensor, grad: torch.Tensor | None) -> list[torch.Tensor]:
    """[std, share of rows whose gradient has softmax cross-entropy's shape, expected CE, classes]."""
    with torch.no_grad():
        logits = output.detach().float()
        classes = logits.shape[-1] if logits.dim() >= 1 else 1
        rows = logits.reshape(-1, classes) if logits.dim() >= 1 else logits.reshape(1, 1)
        # Cross-entropy against a uniformly random label: log-sum-exp minus the mean logit.
        expected = (torch.logsumexp(rows, dim=-1) - rows.mean(dim=-1)).mean()
        shape_share = torch.zeros((), device=logits.device)
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
    """|cos| between a layer's weight matrices and their gradient: 0 when the loss ignores the weights' scale.

    By Euler's theorem, a loss that does not change when w is scaled has <dL/dw, w> = 0:
    a weight followed by normalisation, whose gradient shrinks as the weight grows.
    """
    with torch.no_grad():
        pieces = []
        for _, param in layer.params:
            grad = grads.get(id(param))
            if param.dim() < 2 or grad is None or grad.is_sparse:
                continue
            if grad.is_complex() or param.is_complex() or grad.shape != param.shape:
                continue
            g, w = _flat32(grad), _flat32(param)
            pieces.append(torch.stack([torch.dot(g, w), torch.dot(g, g), torch.dot(w, w)]).double())
        if not pieces:
            return torch.tensor(math.nan)
        dot, norm_grad, norm_weight = torch.stack(pieces).sum(dim=0)
        return dot.abs() / (norm_grad * norm_weight).sqrt().clamp(min=1e-300)


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
        tensors = [state for state in states if state is not None]
        if len(tensors) >= RECURRENCE_CALLS:
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


def zero_gates(layers: list[Layer]) -> list[torch.Tensor]:
    """Per layer: whether all its parameters other than biases are exactly zero (a gate that passes nothing back)."""
    with torch.no_grad():
        flags = []
        for layer in layers:
            weights = [param for key, param in layer.params if key != "bias" and param.numel()]
            if not weights:
                flags.append(torch.zeros((), dtype=torch.bool, device=layer.params[0][1].device))
                continue
            flags.append(torch.stack([torch.count_nonzero(weight) == 0 for weight in weights]).all())
        return flags


def classify(module: nn.Module) -> str:
    """A layer's role: 'lookup' (an embedding table), 'container' (a model's own module holding
    tokens, tables or gains next to its submodules) or 'layer' (it applies its weights)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "lookup"
    if module._modules and not type(module).__module__.startswith("torch.nn"):
        return "container"
    return "layer"
