"""The probe: the only place that runs the model. One forward, one backward, one host sync."""

from __future__ import annotations

import contextlib
import math
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from pytest_gradcheck import inputs as model_io
from pytest_gradcheck import sharded
from pytest_gradcheck.errors import ProbeError
from pytest_gradcheck.profile import GradientProfile, LayerStats

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
# Per-parameter gradient statistics, one column each, computed on the device.
_L1, _L2, _LINF, _NONZERO, _WEIGHT_L2 = range(5)


@dataclass
class _Layer:
    """A module that directly owns trainable parameters, while the probe runs."""

    name: str
    module: nn.Module
    registration: int
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    sharers: list[str] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, DataParallel or torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def probe(
    model: nn.Module,
    inputs: Any = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    seed: int = 0,
) -> GradientProfile:
    """Run one forward and backward pass of ``model`` and return its gradient profile.

    The model is left exactly as it was: parameters, buffers, ``.grad`` tensors,
    ``requires_grad`` flags, train/eval modes, hooks and the global RNG state.
    """
    __tracebackhide__ = True
    if not isinstance(model, nn.Module):
        raise ProbeError(
            f"probe() needs a torch.nn.Module, got {type(model).__name__}; "
            "pass the model instance, e.g. gradient_health(MyModel())"
        )
    wrapped = model
    model = unwrap(model)
    model_name = type(model).__name__
    fully_sharded = sharded.is_fully_sharded(model)
    named_modules = list(model.named_modules())
    candidates = _parameter_owners(named_modules)
    if not candidates:
        raise ProbeError(
            f"{model_name} has no trainable parameters (none with requires_grad=True); "
            "there are no gradients to check"
        )
    # Meta tensors run forward and backward happily but hold no numbers to report.
    on_meta = [name for layer in candidates for name, param in layer.params if param.is_meta]
    if on_meta:
        raise ProbeError(
            f"{model_name} has {len(on_meta)} trainable parameter(s) on the meta device, which hold "
            f"no values (first: {on_meta[0]}); materialize the model before probing, e.g. "
            "model.to_empty(device='cpu') and then initialise or load the weights"
        )
    with isolated(model, seed), torch.enable_grad():
        if inputs is None:
            inputs = model_io.infer_inputs(model)
        args, kwargs = model_io.as_call_arguments(inputs)
        with _recorder(named_modules, candidates) as record:
            output = run_forward(model, args, kwargs)
        loss = model_io.loss_of(output, loss_fn, model_name)
        layers = _assign_owners(candidates, record)
        params = [param for layer in layers for _, param in layer.params]
        if not loss.requires_grad:
            raise ProbeError(
                f"the loss of {model_name} does not depend on any trainable parameter; "
                "check that forward() uses the parameters and that no torch.no_grad() hides them"
            )
        if fully_sharded:  # every rank must probe: FSDP2 all-gathers and reduce-scatters
            grads = sharded.gradients(loss, params)
            per_param, rows, loss_value = sharded.statistics(params, grads, record.embedding_rows, loss)
        else:
            grads = _gradients(loss, params, through_ddp=wrapped is not model)
            per_param, rows, loss_value = _statistics(layers, grads, record, loss)
    return GradientProfile(
        model=model_name,
        layers=_layer_stats(layers, per_param, rows, record),
        loss=loss_value,
        seed=seed,
        device=str(params[0].device),
        dtype=str(params[0].dtype).replace("torch.", ""),
        input_shapes=model_io.describe(args, kwargs),
    )


def _gradients(loss: torch.Tensor, params: list[nn.Parameter], through_ddp: bool) -> list[torch.Tensor | None]:
    """The gradient of ``loss`` for each parameter (None where it got none); ``.grad`` ends as it was.

    ``backward(inputs=...)`` into emptied ``.grad`` slots runs as fast as the bare pass;
    ``torch.autograd.grad`` was 40% slower on a GPT-2-sized model. It is the fallback
    wherever accumulating would act: post-accumulate-grad hooks (an optimizer step in
    backward) and DDP's reducer must not see the probe's gradients.
    """
    if through_ddp or any(getattr(param, "_post_accumulate_grad_hooks", None) for param in params):
        return list(torch.autograd.grad(loss, params, allow_unused=True))
    return stashed_backward(loss, params, inputs=params)


def stashed_backward(loss: torch.Tensor, params: list[nn.Parameter], **backward_options) -> list[torch.Tensor | None]:
    """``loss.backward()`` into emptied ``.grad`` slots; the original ``.grad`` objects are put back."""
    saved = [param.grad for param in params]
    try:
        for param in params:
            param.grad = None
        loss.backward(**backward_options)
        return [param.grad for param in params]
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad


def _parameter_owners(named_modules: list[tuple[str, nn.Module]]) -> list[_Layer]:
    """Every module that directly owns a trainable parameter, in registration order."""
    owners = []
    for index, (name, module) in enumerate(named_modules):
        if not module._parameters:
            continue
        params = [
            (f"{name}.{key}" if name else key, param)
            for key, param in module._parameters.items()
            if param is not None and param.requires_grad
        ]
        if params:
            owners.append(_Layer(name, module, index, params))
    return owners


def run_forward(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    __tracebackhide__ = True  # pytest shows the test's line, not this frame
    try:
        return model(*args, **kwargs)
    except Exception as error:
        shapes = ", ".join(model_io.describe(args, kwargs)) or "no arguments"
        # Said in one message, without torch's internal frames: the place in the user's
        # code where it broke is named, and the chained traceback is left out.
        raise ProbeError(
            f"{type(model).__name__}.forward failed on the probe inputs ({shapes}){_user_frame(error)}: "
            f"{type(error).__name__}: {error}. Pass inputs= that fit the model's forward()"
        ) from None


def _user_frame(error: BaseException) -> str:
    """' at file:line (function)' of the innermost frame in the user's code, or ''."""
    skipped = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(skipped)]
    if not frames:  # it broke inside torch's own modules: the message says enough
        return ""
    frame = frames[-1]
    return f" at {os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"


class _Record:
    """What the forward pass revealed: execution order and embedding lookups."""

    def __init__(self) -> None:
        self.order: dict[int, int] = {}
        self.by_name: dict[str, nn.Module] = {}
        self.lookups: dict[int, list[torch.Tensor]] = {}
        self.embedding_rows: dict[int, torch.Tensor] = {}
        # Tied embeddings whose sum and non-zero count were taken over the looked-up rows.
        self.tied_rows_measured: set[int] = set()

    def position(self, layer: _Layer) -> tuple:
        """Sort key: own execution index, else just after the nearest executed ancestor."""
        own = self.order.get(id(layer.module))
        if own is not None:
            return (own, 0, layer.registration)
        parts = layer.name.split(".") if layer.name else []
        for depth in range(len(parts) - 1, -1, -1):
            ancestor = self.by_name.get(".".join(parts[:depth]))
            if ancestor is not None and id(ancestor) in self.order:
                return (self.order[id(ancestor)], 1, layer.registration)
        return (math.inf, 2, layer.registration)


@contextlib.contextmanager
def _recorder(named_modules: list[tuple[str, nn.Module]], candidates: list[_Layer]):
    """Forward pre-hooks that record execution order and the rows embeddings look up."""
    record = _Record()
    order = record.order

    def note(module, args):
        if id(module) not in order:
            order[id(module)] = len(order)

    def note_lookup(module, args):
        if args and isinstance(args[0], torch.Tensor):
            record.lookups.setdefault(id(module), []).append(args[0])

    # Ancestors are hooked too, so a module whose parameters its parent uses
    # directly (MultiheadAttention.out_proj) is placed right after that parent.
    owners = {layer.name for layer in candidates}
    hooked = set(owners)
    for name in owners:
        parts = name.split(".") if name else []
        hooked.update(".".join(parts[:depth]) for depth in range(len(parts)))
    handles = []
    try:
        for name, module in named_modules:
            if name not in hooked:
                continue
            record.by_name[name] = module
            handles.append(module.register_forward_pre_hook(note))
            if isinstance(module, nn.Embedding) and name in owners:
                handles.append(module.register_forward_pre_hook(note_lookup))
        yield record
    finally:
        for handle in handles:
            handle.remove()
    for name in owners:
        module = record.by_name[name]
        if id(module) in record.lookups:
            record.embedding_rows[id(module)] = _rows_used(module, record.lookups[id(module)])


def _rows_used(embedding: nn.Embedding, lookups: list[torch.Tensor]) -> torch.Tensor:
    """How many distinct rows the batch looked up, kept on the device (no host sync)."""
    weight = embedding.weight
    seen = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    for lookup in lookups:
        seen[lookup.reshape(-1)] = True
    return seen.sum()


def _assign_owners(candidates: list[_Layer], record: _Record) -> list[_Layer]:
    """Layers in execution order; a tied parameter counts once, under its first executor."""
    ranked = sorted(candidates, key=record.position)
    owner_of: dict[int, _Layer] = {}
    layers = []
    for layer in ranked:
        kept = []
        for pname, param in layer.params:
            owner = owner_of.setdefault(id(param), layer)
            if owner is layer:
                kept.append((pname, param))
            elif layer.name not in owner.sharers:
                owner.sharers.append(layer.name)
        layer.params = kept
        if kept:
            layers.append(layer)
    return layers


def _statistics(layers: list[_Layer], grads, record: _Record, loss: torch.Tensor):
    """Per-parameter statistics computed on the device, then one host sync per device.

    Returns (per-parameter rows [l1, l2, linf, nonzero, weight_l2] or None when a
    parameter got no gradient, embedding rows used by module id, loss value).
    """
    params = [param for layer in layers for _, param in layer.params]
    by_device: dict[torch.device, list[int]] = {}
    for index, param in enumerate(params):
        by_device.setdefault(param.device, []).append(index)
    per_param: list[list[float] | None] = [None] * len(params)
    tied = _tied_embedding_weights(layers, record)
    embedding_ids = list(record.embedding_rows)
    rows: dict[int, float] = {}
    loss_value = float("nan")
    for device, indices in by_device.items():
        with_grad = [i for i in indices if grads[i] is not None]
        columns = []
        if with_grad:
            # Each column is stacked at once so that thousands of 0-d results never
            # pile up together: peak memory stays that of the pass itself.
            grad_list = [_dense(grads[i]) for i in with_grad]
            with torch.no_grad():  # parameters go in as they are: detach() costs more than the norm
                columns = _columns(grad_list, [params[i] for i in with_grad])
                _restrict_tied_embeddings(columns, with_grad, grad_list, tied, record)
        extras = [record.embedding_rows[key] for key in embedding_ids]
        extras = [t.reshape(1).float() for t in extras if t.device == device]
        own_loss = loss.device == device
        flat = columns + extras + ([loss.detach().float().reshape(1)] if own_loss else [])
        if not flat:
            continue
        values = torch.cat(flat).tolist()  # the one host sync for this device
        count = len(with_grad)
        by_column = [values[k * count:(k + 1) * count] for k in range(5)]
        for i, row in zip(with_grad, zip(*by_column)):
            per_param[i] = row
        position = 5 * count
        for key in embedding_ids:
            if record.embedding_rows[key].device == device:
                rows[key] = values[position]
                position += 1
        if own_loss:
            loss_value = values[position]
    return per_param, rows, loss_value


def _tied_embedding_weights(layers: list[_Layer], record: _Record) -> dict[int, tuple[int, torch.Size]]:
    """Parameter index -> (module id, table shape), for embedding tables tied to another module."""
    tied, index = {}, 0
    for layer in layers:
        for _, param in layer.params:
            if layer.sharers and id(layer.module) in record.lookups and param is layer.module.weight:
                tied[index] = (id(layer.module), param.shape)
            index += 1
    return tied


def _restrict_tied_embeddings(columns, with_grad, grad_list, tied, record) -> None:
    """Take a tied table's sum and non-zero count of |g| over the rows the batch looked up.

    The output head that shares the table gives every row a gradient; averaged over
    a 50,000-word vocabulary, the looked-up rows would vanish among the rest.
    """
    for slot, index in enumerate(with_grad):
        if index not in tied:
            continue
        key, shape = tied[index]
        grad = grad_list[slot]
        if grad.shape != shape:  # a sparse gradient's values: only the looked-up rows anyway
            continue
        # Gather one row per lookup (a few hundred, not the whole table) and count each
        # distinct row once; sorting instead of torch.unique keeps CUDA free of a sync.
        ids = torch.cat([lookup.reshape(-1) for lookup in record.lookups[key]]).sort().values
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        rows = grad.index_select(0, ids)
        columns[0][slot] = (rows.abs().sum(1, dtype=_accumulator(rows)) * first).sum()
        columns[3][slot] = (torch.count_nonzero(rows, dim=1) * first).sum()
        record.tied_rows_measured.add(key)


def _columns(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """[l1, l2, linf, nonzero, weight_l2] of each parameter, as float32 vectors on the device.

    Small tensors of one size are stacked into a matrix and reduced row by row: a
    few kernels for a thousand layers, where per-tensor kernels would cost more than
    the arithmetic. Large tensors are reduced one by one, without copies.
    """
    device = grads[0].device
    columns = [torch.zeros(len(grads), device=device) for _ in range(5)]
    same_size: dict[tuple, list[int]] = {}
    large = []
    for index, grad in enumerate(grads):
        size = grad.numel()
        if 0 < size <= _SMALL_TENSOR:
            same_size.setdefault((size, grad.dtype, weights[index].dtype), []).append(index)
        elif size:
            large.append(index)
    for (size, _, _), indices in same_size.items():
        rows = max(1, _PIECE_ELEMENTS // size)
        for start in range(0, len(indices), rows):
            part = indices[start : start + rows]
            _scatter(columns, part, _stacked_statistics([grads[i] for i in part], [weights[i] for i in part]))
    if large:
        _scatter(columns, large, _large_statistics([grads[i] for i in large], [weights[i] for i in large]))
    return columns


# Tensors up to _SMALL_TENSOR elements are stacked into copies of at most
# _PIECE_ELEMENTS elements, which bounds the extra memory; |g| is taken in place on
# those copies only. A gradient itself is never written to: autograd.grad may return
# a tensor that user code holds (a gradient hook's, a custom Function's).
_SMALL_TENSOR = 1 << 14
_PIECE_ELEMENTS = 1 << 16


def _stacked_statistics(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    magnitude = torch.stack([grad.reshape(-1) for grad in grads]).abs_()  # a copy the probe owns
    stacked_weights = torch.stack([weight.reshape(-1) for weight in weights])
    return [
        magnitude.sum(1, dtype=_accumulator(magnitude)),
        torch.linalg.vector_norm(magnitude, 2, dim=1, dtype=_accumulator(magnitude)),
        magnitude.amax(1),
        torch.count_nonzero(magnitude, dim=1),
        torch.linalg.vector_norm(stacked_weights, 2, dim=1, dtype=_accumulator(stacked_weights)),
    ]


def _accumulator(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half precision and float32; float64 stays (norms may not narrow)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _large_statistics(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    sums, maxima, counts = [], [], []
    for grad in grads:
        # Each reads the gradient once and writes nothing: no copy of |g| is made.
        sums.append(torch.linalg.vector_norm(grad, 1, dtype=_accumulator(grad)))
        low, high = torch.aminmax(grad)
        maxima.append(torch.maximum(-low, high))
        counts.append(torch.count_nonzero(grad))
    return [
        torch.stack(sums),
        torch.stack(float32_norms(grads, 2)),
        torch.stack(maxima),
        torch.stack(counts),
        torch.stack(float32_norms(weights, 2)),
    ]


def _scatter(columns: list[torch.Tensor], indices: list[int], values: list[torch.Tensor]) -> None:
    where = torch.tensor(indices, device=columns[0].device)
    for column, value in zip(columns, values):
        column[where] = value.float()


def _dense(grad: torch.Tensor) -> torch.Tensor:
    # A sparse embedding gradient holds only the looked-up rows: its values carry
    # every statistic (the implicit rows are zeros, counted via the row count).
    return grad.coalesce().values() if grad.is_sparse else grad


def float32_norms(tensors: list[torch.Tensor], order: float) -> list[torch.Tensor]:
    """Fused per-tensor norms in float32 (one kernel launch per device and dtype)."""
    try:
        return list(torch._foreach_norm(tensors, order, dtype=torch.float32))
    except (TypeError, RuntimeError):  # older torch: no dtype argument, or no foreach for a dtype
        return [torch.linalg.vector_norm(t.float(), order) for t in tensors]


def _layer_stats(layers, per_param, rows, record) -> list[LayerStats]:
    """Aggregate per-parameter numbers into one LayerStats per layer (host side)."""
    stats = []
    values = iter(per_param)
    for layer in layers:
        has_matrix = any(param.dim() >= 2 for _, param in layer.params)
        # An embedding is judged on the rows the batch looked up, so a large
        # vocabulary does not look like vanishing or mostly-zero gradients.
        looked_up = rows.get(id(layer.module))
        if layer.sharers and id(layer.module) not in record.tied_rows_measured:
            looked_up = None  # the whole table's numbers: every row got the sharer's gradient
        l1 = measured = nonzero = counted = l2_squared = weight_squared = largest = 0.0
        numel, finite, got_any, unused = 0, True, False, []
        for pname, param in layer.params:
            value = next(values)
            numel += param.numel()
            if value is None:
                unused.append(_public_name(pname))
                continue
            got_any = True
            size = looked_up * param.shape[1] if looked_up is not None and param.dim() == 2 else param.numel()
            if param.dim() >= 2 or not has_matrix:
                l1 += value[_L1]
                measured += size
            counted += size
            nonzero += value[_NONZERO]
            largest = max(largest, value[_LINF])
            l2_squared += value[_L2] ** 2
            weight_squared += value[_WEIGHT_L2] ** 2
            finite = finite and math.isfinite(value[_L1])
        stats.append(
            LayerStats(
                name=_public_name(layer.name),
                kind=type(layer.module).__name__,
                numel=numel,
                grad_mean_abs=l1 / measured if measured else 0.0,
                grad_max_abs=largest,
                grad_norm=math.sqrt(l2_squared),
                weight_norm=math.sqrt(weight_squared),
                zero_fraction=min(1.0, max(0.0, 1.0 - nonzero / counted)) if counted else 1.0,
                finite=finite,
                executed=id(layer.module) in record.order,
                received_grad=got_any,
                has_matrix=has_matrix,
                is_norm=is_norm_layer(layer.module),
                shared_with=[_public_name(name) for name in layer.sharers],
                unused_parameters=unused,
            )
        )
    # A layer that never ran and got no gradient has no place in the execution
    # order: list it after all the layers that took part in the pass.
    return sorted(stats, key=lambda layer: not (layer.executed or layer.received_grad))


def _public_name(name: str) -> str:
    """The name a user knows: a submodule wrapped by torch.compile adds an ``_orig_mod`` level."""
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


@contextlib.contextmanager
def isolated(model: nn.Module, seed: int):
    """Train mode and a seeded RNG inside; modes, buffers and RNG states restored afterwards."""
    modules = list(model.modules())
    modes = [module.training for module in modules]
    buffers = []
    for module in modules:
        if module._buffers:
            saved = {name: (buf, None if buf is None else buf.detach().clone()) for name, buf in module._buffers.items()}
            buffers.append((module, saved))
    cuda_devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_devices = list(range(torch.cuda.device_count()))
    try:
        if any(type(module).train is not nn.Module.train for module in modules):
            model.train()  # a model's own train() (one that keeps BatchNorm frozen, say) has its say
        else:
            _set_modes(modules, [True] * len(modules))
        with torch.random.fork_rng(devices=cuda_devices):
            # Only the CUDA devices in use are seeded: torch.manual_seed would also queue
            # a lazy seeding of CUDA, changing its RNG after the probe has returned.
            torch.random.default_generator.manual_seed(seed)
            for index in cuda_devices:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        with torch.no_grad():
            for module, saved in buffers:
                module._buffers.clear()
                for name, (buf, copy) in saved.items():
                    if buf is not None:
                        buf.copy_(copy)
                    module._buffers[name] = buf
        _set_modes(modules, modes)


def _set_modes(modules: list[nn.Module], modes: list[bool]) -> None:
    # What Module.train() does, minus its recursion and Module.__setattr__'s
    # lookups, which cost more than the rest of a probe on a 1,000-layer model.
    for module, training in zip(modules, modes):
        module.__dict__["training"] = training
