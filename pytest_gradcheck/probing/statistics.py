"""Gradient statistics: reduced on the device, copied to the host once, aggregated into LayerStats."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from pytest_gradcheck.core.profile import LayerStats
from pytest_gradcheck.probing.layers import ExecutionRecord, Layer, is_norm_layer, public_name


class StatRow(NamedTuple):
    """One parameter's detail statistics: sum, L2 norm, max and non-zero count of |g|, and the weight's L2 norm."""

    l1: float
    l2: float
    linf: float
    nonzero: float
    weight_l2: float


# Without ``detail`` a parameter has its L1 norm alone; None where it got no gradient.
ParamStats = float | StatRow | None
_DETAIL_WIDTH = len(StatRow._fields)
# Tensors up to _SMALL_TENSOR elements are stacked into copies of at most
# _PIECE_ELEMENTS elements, which bounds the extra memory; |g| is taken in place on
# those copies only. A gradient itself is never written to: autograd.grad may return
# a tensor that user code holds (a gradient hook's, a custom Function's).
_SMALL_TENSOR = 1 << 14
_PIECE_ELEMENTS = 1 << 14
# Elements of |g| taken at a time from a large gradient: 1 MB of float32, which stays in cache.
_CHUNK = 1 << 18


def to_host(tensors: Sequence[torch.Tensor]) -> list[list[float]]:
    """Every tensor's values as a flat list of floats, in input order: one copy to the host per device.

    The pieces are joined by one ``torch.cat``, which promotes them to their widest dtype.
    """
    values: list[list[float]] = [[] for _ in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices]).tolist()
        position = 0
        for i in indices:
            size = tensors[i].numel()
            values[i] = flat[position : position + size]
            position += size
    return values


def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradient of ``loss`` for each parameter, None where it got none.

    ``torch.autograd.grad`` leaves every ``.grad`` alone, so nothing that acts on
    accumulated gradients (DDP's reducer, a post-accumulate-grad hook that steps an
    optimizer) sees the probe's, and no leaf outside the model gets one. It measured
    as fast as ``backward(inputs=...)`` into emptied ``.grad`` slots (docs, Benchmarks).
    """
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def gradients_by_backward(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradients a plain ``loss.backward()`` leaves in ``params``' ``.grad``, which is put back after.

    For graphs that ``torch.autograd.grad`` cannot take: FSDP2 reduce-scatters in its
    post-backward hooks, and a reentrant ``torch.utils.checkpoint`` runs its own backward.
    """
    saved = [param.grad for param in params]
    try:
        for param in params:
            param.grad = None
        loss.backward()
        return [param.grad for param in params]
    finally:
        for param, grad in zip(params, saved):
            param.grad = grad


def gradient_statistics(
    params: list[nn.Parameter],
    grads: list[torch.Tensor | None],
    tied: dict[int, int],
    record: ExecutionRecord,
    loss: torch.Tensor,
    detail: bool,
    extras: list[torch.Tensor] | None = None,
) -> tuple[list[ParamStats], dict[int, float], float, list[list[float]]]:
    """Per-parameter statistics computed on the device, then one host sync per device.

    Returns (per parameter: its L1 norm or, with ``detail``, its StatRow; embedding rows
    used by module id; loss value; the values of ``extras``, other device tensors that
    join the same copy to the host).

    Small tensors of one shape are stacked and reduced row by row: a few kernels for
    a thousand layers, where per-tensor kernels would cost more than the arithmetic.
    Large tensors are read once, a cache-sized chunk at a time. No gradient is
    written to: one may share its memory with a tensor that user code holds.
    """
    same_shape: dict[tuple[object, ...], list[int]] = {}
    single: dict[torch.device, list[int]] = {}
    dense = list(grads)
    for index, grad in enumerate(grads):
        if grad is None:
            continue
        if grad.is_sparse:  # its values are the looked-up rows: they carry every statistic
            grad = dense[index] = grad.coalesce().values()
        if 0 < grad.numel() <= _SMALL_TENSOR and index not in tied:
            # With detail the weights are stacked too: a sparse gradient's rows need not match its table's.
            weight = (params[index].shape, params[index].dtype) if detail else None
            key = (grad.device, grad.shape, grad.dtype, weight)
            same_shape.setdefault(key, []).append(index)
        else:
            single.setdefault(grad.device, []).append(index)
    pieces: list[tuple[list[int], torch.Tensor]] = []
    with torch.no_grad():  # parameters go in as they are: detach() costs more than a norm
        for indices in same_shape.values():
            count = max(1, _PIECE_ELEMENTS // _present(dense[indices[0]]).numel())
            for start in range(0, len(indices), count):
                part = indices[start : start + count]
                weights: list[torch.Tensor] | None = [params[i] for i in part] if detail else None
                pieces.append((part, _stacked_rows([_present(dense[i]) for i in part], weights)))
        buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        for indices in single.values():
            rows = [_single_row(_present(dense[i]), params[i], tied.get(i), record, detail, buffers) for i in indices]
            pieces.append((indices, torch.stack([torch.stack(column).double() for column in zip(*rows)], dim=1)))
    embedding_ids = list(record.embedding_rows)
    more = extras or []
    rows_and_loss = [record.embedding_rows[key] for key in embedding_ids] + [loss.detach()]
    values = to_host([piece for _, piece in pieces] + rows_and_loss + more)  # the one sync per device
    per_param: list[ParamStats] = [None] * len(params)
    for (indices, _), flat in zip(pieces, values):
        if not detail:
            for index, value in zip(indices, flat):
                per_param[index] = value
        else:
            for position, index in enumerate(indices):
                per_param[index] = StatRow._make(flat[position * _DETAIL_WIDTH : (position + 1) * _DETAIL_WIDTH])
    rows_used = {key: found[0] for key, found in zip(embedding_ids, values[len(pieces) :])}
    loss_index = len(pieces) + len(embedding_ids)
    return per_param, rows_used, values[loss_index][0], values[loss_index + 1 :]


def _present(grad: torch.Tensor | None) -> torch.Tensor:
    assert grad is not None  # only parameters that received a gradient are grouped
    return grad


def _stacked_rows(grads: list[torch.Tensor], weights: list[torch.Tensor] | None) -> torch.Tensor:
    """Each gradient's L1 norm, or with ``weights`` (detail) its row of five statistics."""
    stacked = torch.stack(grads).reshape(len(grads), -1)  # a copy the probe owns
    magnitude = stacked.abs() if stacked.is_complex() else stacked.abs_()
    accumulator = accumulator_dtype(magnitude)
    l1 = magnitude.sum(1, dtype=accumulator)
    if weights is None:
        return l1  # the one cat before the host sync makes it float64 where needed
    stacked_weights = torch.stack(weights).reshape(len(weights), -1)
    columns = [
        l1,
        torch.linalg.vector_norm(magnitude, 2, dim=1, dtype=accumulator),
        magnitude.amax(1),
        torch.count_nonzero(magnitude, dim=1),
        torch.linalg.vector_norm(stacked_weights, 2, dim=1, dtype=_norm_dtype(stacked_weights)),
    ]
    return torch.stack([column.double() for column in columns], dim=1)


def _single_row(
    grad: torch.Tensor,
    weight: nn.Parameter,
    tied_key: int | None,
    record: ExecutionRecord,
    detail: bool,
    buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor],
) -> list[torch.Tensor]:
    """One parameter's statistics as 0-d tensors: [l1] or the five of a StatRow."""
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
    assert l2 is not None and linf is not None and nonzero is not None
    return [l1, l2, linf, nonzero, torch.linalg.vector_norm(weight, 2, dtype=_norm_dtype(weight))]


def _magnitude_statistics(
    grad: torch.Tensor, buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor], detail: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(sum, L2 norm, max, non-zero count) of |g| (only the sum unless ``detail``), reading ``grad`` once.

    |g| of each chunk goes into a buffer the size of a cache, and every statistic is
    taken from there: the L1 norm kernel reads at a third of the speed of abs and sum.
    """
    accumulator = accumulator_dtype(grad)
    if not grad.is_contiguous():  # rare (channels_last weights): read-only kernels, no copy
        l1 = torch.linalg.vector_norm(grad, 1, dtype=accumulator)
        if not detail:
            return l1, None, None, None
        low, high = torch.aminmax(grad.abs() if grad.is_complex() else grad)
        return (
            l1,
            torch.linalg.vector_norm(grad, 2, dtype=accumulator),
            torch.maximum(-low, high),
            torch.count_nonzero(grad),
        )
    flat = grad.view(-1)
    real = flat.real.dtype if flat.is_complex() else flat.dtype  # |g| of a complex gradient is real
    key = (real, grad.device)
    if key not in buffers or buffers[key].numel() < min(flat.numel(), _CHUNK):
        buffers[key] = torch.empty(min(flat.numel(), _CHUNK), dtype=real, device=grad.device)
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
        return torch.stack(sums).sum(), None, None, None
    return (
        torch.stack(sums).sum(),
        torch.linalg.vector_norm(torch.stack(norms)),
        torch.stack(maxima).amax(),
        torch.stack(counts).sum(),
    )


def _looked_up_rows(
    grad: torch.Tensor, record: ExecutionRecord, key: int, detail: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    l1 = (rows.abs().sum(1, dtype=accumulator_dtype(rows)) * first).sum()
    return l1, ((torch.count_nonzero(rows, dim=1) * first).sum() if detail else None)


def accumulator_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half precision and float32; float64 stays (norms may not narrow); complex by its parts."""
    return torch.float64 if tensor.dtype in (torch.float64, torch.complex128) else torch.float32


def _norm_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype vector_norm accumulates ``tensor`` in: a complex one for complex tensors, as it requires."""
    if tensor.is_complex():
        return torch.complex128 if tensor.dtype == torch.complex128 else torch.complex64
    return accumulator_dtype(tensor)


def float32_norms(tensors: list[torch.Tensor], order: float) -> list[torch.Tensor]:
    """Fused per-tensor norms in float32 (one kernel launch per device and dtype)."""
    try:
        return list(torch._foreach_norm(tensors, order, dtype=torch.float32))
    except (TypeError, RuntimeError):  # older torch: no dtype argument, or no foreach for a dtype
        return [torch.linalg.vector_norm(t.float(), order) for t in tensors]


def layer_stats(
    layers: list[Layer], per_param: list[ParamStats], rows: dict[int, float], record: ExecutionRecord, detail: bool
) -> list[LayerStats]:
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
        size: float
        counted = nonzero = l2_squared = weight_squared = largest = 0.0
        numel, has_matrix, finite, all_zero, unused = 0, False, True, True, []
        for key, param in layer.params:
            row = next(values)
            size = param.numel()
            numel += size
            dim = param.dim()
            has_matrix = has_matrix or dim >= 2
            if row is None:
                unused.append(public_name(layer.qualified(key)))
                continue
            l1 = row.l1 if isinstance(row, StatRow) else row
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
            if isinstance(row, StatRow):
                counted += size
                nonzero += row.nonzero
                largest = max(largest, row.linf)
                l2_squared += row.l2**2
                weight_squared += row.weight_l2**2
        received = len(unused) < len(layer.params)
        detail_fields: tuple[float, ...] = ()
        if detail:
            zero_fraction = min(1.0, max(0.0, 1.0 - nonzero / counted)) if counted else 1.0
            detail_fields = (largest, math.sqrt(l2_squared), math.sqrt(weight_squared), zero_fraction)
        # Positional, in LayerStats' field order: keyword matching would cost twice as
        # much, a microsecond per layer (tests/test_probe.py pins the order).
        stats.append(
            LayerStats(
                public_name(layer.name),  # name
                kind[0],  # kind
                numel,
                _mean(matrix_l1, matrix_size) if has_matrix else _mean(other_l1, other_size),  # grad_mean_abs
                finite,
                all_zero and received and numel > 0,  # all_zero: a layer of zero elements has no values
                id(module) in record.order,  # executed
                received,  # received_grad
                has_matrix,
                kind[1],  # is_norm
                [public_name(name) for name in layer.sharers] if layer.sharers else [],  # shared_with
                unused,  # unused_parameters
                *detail_fields,  # type: ignore[arg-type]  # grad_max_abs, grad_norm, weight_norm, zero_fraction
            )
        )
    # A layer that never ran and got no gradient has no place in the execution
    # order: list it after all the layers that took part in the pass.
    return sorted(stats, key=lambda layer: not (layer.executed or layer.received_grad))


def _mean(total: float, count: float) -> float:
    return total / count if count else 0.0
