"""The probe: the only place that runs the model. One forward, one backward, one host sync."""

from __future__ import annotations

import contextlib
import gc
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


@dataclass
class _Layer:
    """A module that directly owns trainable parameters, while the probe runs."""

    name: str
    module: nn.Module
    registration: int
    # (attribute name, parameter): the full name is built only where a message needs it.
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    sharers: list[str] = field(default_factory=list)

    def qualified(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key


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
    detail: bool = False,
) -> GradientProfile:
    """Run one forward and backward pass of ``model`` and return its gradient profile.

    Every layer gets its mean |grad|, finiteness and all-zero flag, all three from one
    L1 norm per gradient. ``detail=True`` also measures the largest |grad|, the
    gradient and weight L2 norms and the share of exact zeros: four more reads of the
    gradients and one of the weights, which the report table, the plots and the
    ``max_grad`` bound need.

    The model is left exactly as it was: parameters, buffers, ``.grad`` tensors,
    ``requires_grad`` flags, train/eval modes, hooks and the global RNG state.
    """
    __tracebackhide__ = True
    if not isinstance(model, nn.Module):
        raise ProbeError(
            f"probe() needs a torch.nn.Module, got {type(model).__name__}; "
            "pass the model instance, e.g. gradient_health(MyModel())"
        )
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
    on_meta = [layer.qualified(key) for layer in candidates for key, param in layer.params if param.is_meta]
    if on_meta:
        raise ProbeError(
            f"{model_name} has {len(on_meta)} trainable parameter(s) on the meta device, which hold "
            f"no values (first: {on_meta[0]}); materialize the model before probing, e.g. "
            "model.to_empty(device='cpu') and then initialise or load the weights"
        )
    with _without_cyclic_gc(), isolated(model, seed, [module for _, module in named_modules]), torch.enable_grad():
        if inputs is None:
            inputs = model_io.infer_inputs(model)
        args, kwargs = model_io.as_call_arguments(inputs)
        with _recorder(model, named_modules, candidates) as record:
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
            detail = True  # its all-reduced rows hold every statistic anyway
            grads = sharded.gradients(loss, params)
            per_param, rows, loss_value = sharded.statistics(params, grads, record.embedding_rows, loss)
        else:
            grads = _gradients(loss, params)
            tied = _tied_embedding_weights(layers, record)
            per_param, rows, loss_value = _statistics(params, grads, tied, record, loss, detail)
        stats = _layer_stats(layers, per_param, rows, record, detail)
    return GradientProfile(
        model=model_name,
        layers=stats,
        loss=loss_value,
        seed=seed,
        device=str(params[0].device),
        dtype=str(params[0].dtype).replace("torch.", ""),
        input_shapes=model_io.describe(args, kwargs),
    )


@contextlib.contextmanager
def _without_cyclic_gc():
    """Python's cycle collector paused while the probe runs, and resumed as it was.

    A probe of a 1,000-layer model allocates tens of thousands of small objects, nearly
    all freed by reference counting before it returns; left on, the collector traverses
    them, and every object of the model, several times a probe: about 10 ms a probe,
    next to a 60 ms forward and backward pass.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _gradients(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """The gradient of ``loss`` for each parameter, None where it got none.

    ``torch.autograd.grad`` leaves every ``.grad`` alone, so nothing that acts on
    accumulated gradients (DDP's reducer, a post-accumulate-grad hook that steps an
    optimizer) sees the probe's, and no leaf outside the model gets one. It measured
    as fast as ``backward(inputs=...)`` into emptied ``.grad`` slots (README, Performance).
    """
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def _parameter_owners(named_modules: list[tuple[str, nn.Module]]) -> list[_Layer]:
    """Every module that directly owns a trainable parameter, in registration order."""
    owners = []
    for index, (name, module) in enumerate(named_modules):
        own = module._parameters
        if not own:
            continue
        params = [(key, param) for key, param in own.items() if param is not None and param.requires_grad]
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

    def __init__(self, named_modules: list[tuple[str, nn.Module]]) -> None:
        self.named_modules = named_modules
        self.order: dict[int, int] = {}
        self.lookups: dict[int, list[torch.Tensor]] = {}
        self.embedding_rows: dict[int, torch.Tensor] = {}
        # Tied embeddings whose sum of |g| was taken over the looked-up rows.
        self.tied_rows_measured: set[int] = set()
        self._by_name: dict[str, nn.Module] | None = None

    def position(self, layer: _Layer) -> tuple:
        """Sort key: own execution index, else just after the nearest executed ancestor."""
        own = self.order.get(id(layer.module))
        if own is not None:
            return (own, 0, layer.registration)
        if self._by_name is None:
            self._by_name = dict(self.named_modules)
        parts = layer.name.split(".") if layer.name else []
        for depth in range(len(parts) - 1, -1, -1):
            ancestor = self._by_name.get(".".join(parts[:depth]))
            if ancestor is not None and id(ancestor) in self.order:
                return (self.order[id(ancestor)], 1, layer.registration)
        return (math.inf, 2, layer.registration)


@contextlib.contextmanager
def _recorder(model: nn.Module, named_modules: list[tuple[str, nn.Module]], candidates: list[_Layer]):
    """Forward pre-hooks that record execution order and the rows embeddings look up."""
    record = _Record(named_modules)
    order = record.order

    def note(module, args):
        if id(module) not in order:
            order[id(module)] = len(order)

    def note_lookup(module, args):
        if args and isinstance(args[0], torch.Tensor):
            record.lookups.setdefault(id(module), []).append(args[0])

    # Containers are hooked too, so a module whose parameters its parent uses
    # directly (MultiheadAttention.out_proj) is placed right after that parent.
    owners = {id(layer.module) for layer in candidates}
    hooked = [module for _, module in named_modules if module._modules or id(module) in owners]
    embeddings = [module for module in hooked if isinstance(module, nn.Embedding) and id(module) in owners]
    # One registered hook whose id the other modules share: a handle per module cost
    # 3 to 4 ms on a 1,000-layer model, an entry in each module's hook dict a tenth of
    # that. The shared id is unique to this probe, and every entry is taken out again.
    handle = model.register_forward_pre_hook(note)
    handles = [module.register_forward_pre_hook(note_lookup) for module in embeddings]
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


def _assign_owners(candidates: list[_Layer], record: _Record) -> list[_Layer]:
    """Layers in execution order; a tied parameter counts once, under its first executor."""
    ranked = sorted(candidates, key=record.position)
    owner_of: dict[int, _Layer] = {}
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


def _statistics(params: list[nn.Parameter], grads, tied: dict[int, int], record: _Record, loss, detail: bool):
    """Per-parameter statistics computed on the device, then one host sync per device.

    Returns (per parameter: its L1 norm or, with ``detail``, [l1, l2, linf, nonzero, weight_l2],
    None where it got no gradient; embedding rows used by module id; loss value).

    Small tensors of one shape are stacked and reduced row by row: a few kernels for
    a thousand layers, where per-tensor kernels would cost more than the arithmetic.
    Large tensors are read once, a cache-sized chunk at a time. No gradient is
    written to: one may share its memory with a tensor that user code holds.
    """
    same_shape: dict[tuple, list[int]] = {}
    single: dict[torch.device, list[int]] = {}
    dense = list(grads)
    for index, grad in enumerate(grads):
        if grad is None:
            continue
        if grad.is_sparse:  # its values are the looked-up rows: they carry every statistic
            grad = dense[index] = grad.coalesce().values()
        if 0 < grad.numel() <= _SMALL_TENSOR and index not in tied:
            key = (grad.device, grad.shape, grad.dtype, params[index].dtype if detail else None)
            group = same_shape.get(key)
            if group is None:
                same_shape[key] = [index]
            else:
                group.append(index)
        else:
            single.setdefault(grad.device, []).append(index)
    order: dict[torch.device, list[int]] = {}
    pieces: dict[torch.device, list[torch.Tensor]] = {}
    with torch.no_grad():  # parameters go in as they are: detach() costs more than a norm
        for (device, shape, _, _), indices in same_shape.items():
            count = max(1, _PIECE_ELEMENTS // dense[indices[0]].numel())
            for start in range(0, len(indices), count):
                part = indices[start : start + count]
                order.setdefault(device, []).extend(part)
                weights = [params[i] for i in part] if detail else None
                rows = _stacked_rows([dense[i] for i in part], weights)
                pieces.setdefault(device, []).append(rows)
        buffers: dict[tuple, torch.Tensor] = {}
        for device, indices in single.items():
            rows = [_single_row(dense[i], params[i], tied.get(i), record, detail, buffers) for i in indices]
            order.setdefault(device, []).extend(indices)
            pieces.setdefault(device, []).append(torch.stack([torch.stack(c).double() for c in zip(*rows)], dim=1))
    embedding_ids = list(record.embedding_rows)
    devices = {*pieces, loss.device, *(record.embedding_rows[key].device for key in embedding_ids)}
    per_param: list[Any] = [None] * len(params)
    rows_used: dict[int, float] = {}
    loss_value = float("nan")
    width = _DETAIL_WIDTH if detail else 1
    for device in devices:
        extras = [record.embedding_rows[key] for key in embedding_ids if record.embedding_rows[key].device == device]
        if loss.device == device:
            extras.append(loss.detach())
        flat = [piece.reshape(-1) if piece.dim() > 1 else piece for piece in pieces.get(device, [])]
        values = torch.cat(flat + [extra.reshape(1).double() for extra in extras]).tolist()  # the one sync
        indices = order.get(device, [])
        if width == 1:
            for index, value in zip(indices, values):
                per_param[index] = value
        else:
            for position, index in enumerate(indices):
                per_param[index] = values[position * width : (position + 1) * width]
        position = len(indices) * width
        for key in embedding_ids:
            if record.embedding_rows[key].device == device:
                rows_used[key] = values[position]
                position += 1
        if loss.device == device:
            loss_value = values[position]
    return per_param, rows_used, loss_value


# The per-parameter statistics with ``detail``: their positions in a row.
_L1, _L2, _LINF, _NONZERO, _WEIGHT_L2 = range(5)
_DETAIL_WIDTH = 5
# Tensors up to _SMALL_TENSOR elements are stacked into copies of at most
# _PIECE_ELEMENTS elements, which bounds the extra memory; |g| is taken in place on
# those copies only. A gradient itself is never written to: autograd.grad may return
# a tensor that user code holds (a gradient hook's, a custom Function's).
_SMALL_TENSOR = 1 << 14
_PIECE_ELEMENTS = 1 << 14


def _stacked_rows(grads: list[torch.Tensor], weights: list[torch.Tensor] | None) -> torch.Tensor:
    """Each gradient's L1 norm, or with ``weights`` (detail) its row of five statistics."""
    magnitude = torch.stack(grads).reshape(len(grads), -1).abs_()  # a copy the probe owns
    accumulator = _accumulator(magnitude)
    l1 = magnitude.sum(1, dtype=accumulator)
    if weights is None:
        return l1  # the one cat before the host sync makes it float64
    stacked_weights = torch.stack(weights).reshape(len(weights), -1)
    columns = [
        l1,
        torch.linalg.vector_norm(magnitude, 2, dim=1, dtype=accumulator),
        magnitude.amax(1),
        torch.count_nonzero(magnitude, dim=1),
        torch.linalg.vector_norm(stacked_weights, 2, dim=1, dtype=_accumulator(stacked_weights)),
    ]
    return torch.stack([column.double() for column in columns], dim=1)


def _single_row(grad, weight, tied_key: int | None, record: _Record, detail: bool, buffers: dict) -> list:
    """One parameter's statistics as 0-d tensors: [l1] or [l1, l2, linf, nonzero, weight_l2]."""
    if grad.numel() == 0:
        return [torch.zeros((), dtype=torch.float64, device=grad.device)] * (_DETAIL_WIDTH if detail else 1)
    if tied_key is not None and grad.shape == weight.shape:
        l1, nonzero = _looked_up_rows(grad, record, tied_key, detail)
        if not detail:
            return [l1]
        _, l2, linf, _ = _magnitude_statistics(grad, buffers)  # the whole table's; l1 and nonzero: looked-up rows
    else:
        l1, l2, linf, nonzero = _magnitude_statistics(grad, buffers, detail)
        if not detail:
            return [l1]
    return [l1, l2, linf, nonzero, torch.linalg.vector_norm(weight, 2, dtype=_accumulator(weight))]


def _magnitude_statistics(grad: torch.Tensor, buffers: dict, detail: bool = True) -> list:
    """[sum, L2 norm, max, non-zero count] of |g| (only the sum unless ``detail``), reading ``grad`` once.

    |g| of each chunk goes into a buffer the size of a cache, and every statistic is
    taken from there: the L1 norm kernel reads at a third of the speed of abs and sum.
    """
    accumulator = _accumulator(grad)
    if not grad.is_contiguous():  # rare (channels_last weights): read-only kernels, no copy
        if not detail:
            return [torch.linalg.vector_norm(grad, 1, dtype=accumulator), None, None, None]
        low, high = torch.aminmax(grad)
        return [
            torch.linalg.vector_norm(grad, 1, dtype=accumulator),
            torch.linalg.vector_norm(grad, 2, dtype=accumulator),
            torch.maximum(-low, high),
            torch.count_nonzero(grad),
        ]
    flat = grad.view(-1)
    key = (grad.dtype, grad.device)
    if key not in buffers or buffers[key].numel() < min(flat.numel(), _CHUNK):
        buffers[key] = torch.empty(min(flat.numel(), _CHUNK), dtype=grad.dtype, device=grad.device)
    buffer = buffers[key]
    sums, norms, maxima, counts = [], [], [], []
    for start in range(0, flat.numel(), _CHUNK):
        piece = flat[start : start + _CHUNK]
        magnitude = torch.abs(piece, out=buffer[: piece.numel()])
        sums.append(magnitude.sum(dtype=accumulator))
        if detail:
            norms.append(torch.linalg.vector_norm(magnitude, 2, dtype=accumulator))
            maxima.append(magnitude.amax())
            counts.append(torch.count_nonzero(magnitude))
    if not detail:
        return [torch.stack(sums).sum(), None, None, None]
    return [
        torch.stack(sums).sum(),
        torch.linalg.vector_norm(torch.stack(norms)),
        torch.stack(maxima).amax(),
        torch.stack(counts).sum(),
    ]


# Elements of |g| taken at a time from a large gradient: 1 MB of float32, which stays in cache.
_CHUNK = 1 << 18


def _tied_embedding_weights(layers: list[_Layer], record: _Record) -> dict[int, int]:
    """Parameter index -> embedding module id, for embedding tables tied to another module."""
    tied, index = {}, 0
    for layer in layers:
        for _, param in layer.params:
            if layer.sharers and id(layer.module) in record.lookups and param is layer.module.weight:
                tied[index] = id(layer.module)
            index += 1
    return tied


def _looked_up_rows(grad: torch.Tensor, record: _Record, key: int, detail: bool):
    """A tied table's sum (and non-zero count) of |g| over the rows the batch looked up.

    The output head that shares the table gives every row a gradient; averaged over
    a 50,000-word vocabulary, the looked-up rows would vanish among the rest.
    """
    # Gather one row per lookup (a few hundred, not the whole table) and count each
    # distinct row once; sorting instead of torch.unique keeps CUDA free of a sync.
    ids = torch.cat([lookup.reshape(-1) for lookup in record.lookups[key]]).sort().values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    rows = grad.index_select(0, ids)
    record.tied_rows_measured.add(key)
    l1 = (rows.abs().sum(1, dtype=_accumulator(rows)) * first).sum()
    return l1, ((torch.count_nonzero(rows, dim=1) * first).sum() if detail else None)


def _accumulator(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half precision and float32; float64 stays (norms may not narrow)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def float32_norms(tensors: list[torch.Tensor], order: float) -> list[torch.Tensor]:
    """Fused per-tensor norms in float32 (one kernel launch per device and dtype)."""
    try:
        return list(torch._foreach_norm(tensors, order, dtype=torch.float32))
    except (TypeError, RuntimeError):  # older torch: no dtype argument, or no foreach for a dtype
        return [torch.linalg.vector_norm(t.float(), order) for t in tensors]


def _layer_stats(layers, per_param, rows, record, detail: bool) -> list[LayerStats]:
    """Aggregate per-parameter numbers into one LayerStats per layer (host side)."""
    stats = []
    values = iter(per_param)
    kinds: dict[type, tuple[str, bool]] = {}
    for layer in layers:
        module = layer.module
        kind = kinds.get(type(module))
        if kind is None:
            kind = kinds[type(module)] = (type(module).__name__, is_norm_layer(module))
        # An embedding is judged on the rows the batch looked up, so a large
        # vocabulary does not look like vanishing or mostly-zero gradients.
        looked_up = rows.get(id(module))
        if layer.sharers and id(module) not in record.tied_rows_measured:
            looked_up = None  # the whole table's numbers: every row got the sharer's gradient
        # Mean |grad| is over the weight matrices where the layer has one (a bias would
        # dilute it), else over all of its parameters.
        matrix_l1 = matrix_size = other_l1 = other_size = 0.0
        counted = nonzero = l2_squared = weight_squared = largest = 0.0
        numel, has_matrix, finite, all_zero, unused = 0, False, True, True, []
        for key, param in layer.params:
            row = next(values)
            size = param.numel()
            numel += size
            dim = param.dim()
            has_matrix = has_matrix or dim >= 2
            if row is None:
                unused.append(_public_name(layer.qualified(key)))
                continue
            l1 = row[_L1] if detail else row
            if looked_up is not None and dim == 2:
                size = looked_up * param.shape[1]
            if dim >= 2:
                matrix_l1 += l1
                matrix_size += size
            else:
                other_l1 += l1
                other_size += size
            # One L1 norm says it all: NaN or inf in any element makes it non-finite,
            # and it is zero exactly when every element is.
            finite = finite and math.isfinite(l1)
            all_zero = all_zero and l1 == 0.0
            if detail:
                counted += size
                nonzero += row[_NONZERO]
                largest = max(largest, row[_LINF])
                l2_squared += row[_L2] ** 2
                weight_squared += row[_WEIGHT_L2] ** 2
        received = len(unused) < len(layer.params)
        detail_fields = ()
        if detail:
            zero_fraction = min(1.0, max(0.0, 1.0 - nonzero / counted)) if counted else 1.0
            detail_fields = (largest, math.sqrt(l2_squared), math.sqrt(weight_squared), zero_fraction)
        # Positional, in LayerStats' field order: keyword matching would cost twice as
        # much, a microsecond per layer (tests/test_probe.py pins the order).
        stats.append(
            LayerStats(
                _public_name(layer.name),  # name
                kind[0],  # kind
                numel,
                _mean(matrix_l1, matrix_size) if has_matrix else _mean(other_l1, other_size),  # grad_mean_abs
                finite,
                all_zero and received,  # all_zero
                id(module) in record.order,  # executed
                received,  # received_grad
                has_matrix,
                kind[1],  # is_norm
                [_public_name(name) for name in layer.sharers] if layer.sharers else [],  # shared_with
                unused,  # unused_parameters
                *detail_fields,  # grad_max_abs, grad_norm, weight_norm, zero_fraction
            )
        )
    # A layer that never ran and got no gradient has no place in the execution
    # order: list it after all the layers that took part in the pass.
    return sorted(stats, key=lambda layer: not (layer.executed or layer.received_grad))


def _mean(total: float, count: float) -> float:
    return total / count if count else 0.0


def _public_name(name: str) -> str:
    """The name a user knows: a submodule wrapped by torch.compile adds an ``_orig_mod`` level."""
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


@contextlib.contextmanager
def isolated(model: nn.Module, seed: int, modules: list[nn.Module] | None = None):
    """Train mode and a seeded RNG inside; modes, buffers and RNG states restored afterwards.

    ``modules`` is ``list(model.modules())`` where the caller has it already.
    """
    if modules is None:
        modules = list(model.modules())
    modes, buffers, own_train = [], [], False
    for module in modules:
        modes.append(module.training)
        own_train = own_train or type(module).train is not nn.Module.train
        if module._buffers:
            saved = {name: (buf, None if buf is None else buf.detach().clone()) for name, buf in module._buffers.items()}
            buffers.append((module, saved))
    cuda_devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_devices = list(range(torch.cuda.device_count()))
    try:
        if own_train:
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
