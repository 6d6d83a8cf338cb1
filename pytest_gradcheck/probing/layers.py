"""Layer discovery: which modules own trainable parameters, in what order they ran, and tied weights."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` normalises its input (torch's norm layers, or a class named ...Norm...)."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def public_name(name: str) -> str:
    """The name a user knows: a submodule wrapped by torch.compile adds an ``_orig_mod`` level."""
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


@dataclass
class Layer:
    """A module that directly owns trainable parameters, while the probe runs."""

    name: str
    module: nn.Module
    registration: int
    # (attribute name, parameter): the full name is built only where a message needs it.
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    sharers: list[str] = field(default_factory=list)

    def qualified(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key


def parameter_owners(named_modules: list[tuple[str, nn.Module]]) -> list[Layer]:
    """Every module that directly owns a trainable parameter, in registration order."""
    owners = []
    for index, (name, module) in enumerate(named_modules):
        own = module._parameters
        if not own:
            continue
        params = [(key, param) for key, param in own.items() if param is not None and param.requires_grad]
        if params:
            owners.append(Layer(name, module, index, params))
    return owners


class ExecutionRecord:
    """What the forward pass revealed: execution order, the layers' inputs, embedding lookups."""

    def __init__(self, named_modules: list[tuple[str, nn.Module]]) -> None:
        self.named_modules = named_modules
        self.order: dict[int, int] = {}
        # Each layer's arguments: those of its first call, and of every call of a layer called again.
        self.first_args: dict[int, tuple[Any, ...]] = {}
        self.repeated_args: dict[int, list[tuple[Any, ...]]] = {}
        # A recurrent module's sequence input, made to carry gradient: (module id, tensor, time dim).
        self.sequences: list[tuple[int, torch.Tensor, int]] = []
        self.lookups: dict[int, list[torch.Tensor]] = {}
        self.embedding_rows: dict[int, torch.Tensor] = {}
        # Tied embeddings whose sum of |g| was taken over the looked-up rows.
        self.tied_rows_measured: set[int] = set()
        # Modules never called whose parameters others used: the execution index they were used after.
        self.used_after: dict[int, float] = {}
        self.hooks_registered = 0
        self._by_name: dict[str, nn.Module] | None = None

    def position(self, layer: Layer) -> tuple[float, int, int]:
        """Sort key: its execution index, else where its parameters were used, else after its nearest run ancestor."""
        own = self.order.get(id(layer.module))
        if own is not None:
            return (own, 0, layer.registration)
        used = self.used_after.get(id(layer.module))
        if used is not None:
            return (used, 1, layer.registration)
        if self._by_name is None:
            self._by_name = dict(self.named_modules)
        parts = layer.name.split(".") if layer.name else []
        for depth in range(len(parts) - 1, -1, -1):
            ancestor = self._by_name.get(".".join(parts[:depth]))
            if ancestor is not None and id(ancestor) in self.order:
                return (self.order[id(ancestor)], 1, layer.registration)
        return (math.inf, 2, layer.registration)


@contextlib.contextmanager
def record_execution(
    model: nn.Module, named_modules: list[tuple[str, nn.Module]], candidates: list[Layer]
) -> Iterator[ExecutionRecord]:
    """Forward pre-hooks that record execution order, the layers' inputs and the rows embeddings look up."""
    record = ExecutionRecord(named_modules)
    order, first_args, repeated_args = record.order, record.first_args, record.repeated_args
    owners = {id(layer.module) for layer in candidates}

    def note(module: nn.Module, args: Any) -> None:
        key = id(module)
        if key not in order:
            order[key] = len(order)
            if key in owners:
                first_args[key] = args
        elif key in owners:  # a layer called again: an RNN cell over time, a block shared by depth
            calls = repeated_args.get(key)
            if calls is None:
                repeated_args[key] = [first_args[key], args]
            else:
                calls.append(args)

    def note_sequence(module: nn.Module, args: Any) -> Any:
        # The gradient that reaches each time step of the input: a sequence that carries none
        # (the model's own input) is replaced by a copy that does, which changes no parameter's.
        sequence = args[0] if args else None
        if not isinstance(sequence, torch.Tensor) or not sequence.is_floating_point() or sequence.dim() < 2:
            return None
        if not sequence.requires_grad:
            sequence = sequence.detach().requires_grad_()
            args = (sequence, *args[1:])
        time_dim = 1 if getattr(module, "batch_first", False) and sequence.dim() == 3 else 0
        record.sequences.append((id(module), sequence, time_dim))
        return args

    def note_lookup(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input")  # emb(ids) or emb(input=ids)
        if isinstance(ids, torch.Tensor):
            record.lookups.setdefault(id(module), []).append(ids)

    # Containers are hooked too, so a module whose parameters its parent uses
    # directly (MultiheadAttention.out_proj) is placed right after that parent.
    hooked = [module for _, module in named_modules if module._modules or id(module) in owners]
    embeddings = [module for module in hooked if isinstance(module, nn.Embedding) and id(module) in owners]
    recurrent = [module for module in hooked if isinstance(module, nn.RNNBase) and id(module) in owners]
    # One registered hook whose id the other modules share: a handle per module cost
    # 3 to 4 ms on a 1,000-layer model, an entry in each module's hook dict a tenth of
    # that. The shared id is unique to this probe, and every entry is taken out again.
    handle = model.register_forward_pre_hook(note)
    handles = [module.register_forward_pre_hook(note_lookup, with_kwargs=True) for module in embeddings]
    handles += [module.register_forward_pre_hook(note_sequence) for module in recurrent]
    record.hooks_registered = 1 + len(handles)
    shared = [module for module in hooked if module is not model]
    try:
        for module in shared:
            module._forward_pre_hooks[handle.id] = note
        yield record
    finally:
        for module in shared:
            module._forward_pre_hooks.pop(handle.id, None)
        for each in (handle, *handles):
            each.remove()
    for module in embeddings:
        if id(module) in record.lookups:
            record.embedding_rows[id(module)] = _rows_used(module, record.lookups[id(module)])


def _rows_used(embedding: nn.Embedding, lookups: list[torch.Tensor]) -> torch.Tensor:
    """How many distinct rows the batch looked up, kept on the device (no host sync)."""
    weight = embedding.weight
    seen = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    for lookup in lookups:
        seen[lookup.reshape(-1)] = True
    return seen.sum()


def assign_owners(candidates: list[Layer], record: ExecutionRecord) -> list[Layer]:
    """Layers in execution order; a tied parameter counts once, under its first executor."""
    ranked = sorted(candidates, key=record.position)
    owner_of: dict[int, Layer] = {}
    layers = []
    for layer in ranked:
        kept = []
        for entry in layer.params:
            owner = owner_of.setdefault(id(entry[1]), layer)
            if owner is layer:
                kept.append(entry)
            elif layer.name not in owner.sharers:
                owner.sharers.append(layer.name)
        layer.params = kept
        if kept:
            layers.append(layer)
    return layers


def place_by_use(layers: list[Layer], record: ExecutionRecord, arrivals: list[int]) -> None:
    """Place the layers that were never called where their parameters were used, from gradient arrival.

    Gradients arrive in reverse order of use: a layer whose gradient arrived just after
    an uncalled layer's was used just before it. ``arrivals`` holds indices into ``layers``.
    """
    rank = {index: position for position, index in enumerate(arrivals)}
    for index, layer in enumerate(layers):
        if id(layer.module) in record.order or index not in rank:
            continue
        used_before = [
            other for other in rank
            if rank[other] > rank[index] and id(layers[other].module) in record.order
        ]  # fmt: skip
        if used_before:
            latest = min(used_before, key=lambda other: rank[other])
            record.used_after[id(layer.module)] = record.order[id(layers[latest].module)]
        else:
            record.used_after[id(layer.module)] = -1


def tied_embedding_weights(layers: list[Layer], record: ExecutionRecord) -> dict[int, int]:
    """Parameter index -> embedding module id, for embedding tables tied to another module."""
    tied, index = {}, 0
    for layer in layers:
        for _, param in layer.params:
            if layer.sharers and id(layer.module) in record.lookups and param is layer.module.weight:
                tied[index] = id(layer.module)
            index += 1
    return tied
