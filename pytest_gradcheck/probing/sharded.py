"""Gradient statistics of FSDP2 (``fully_shard``) models: local shards, all-reduced sums and maxima."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pytest_gradcheck.errors import ProbeError
from pytest_gradcheck.probing.statistics import ParamStats, StatRow

# Columns summed across ranks per parameter: |g| sum, g^2 sum, nonzero count, w^2 sum.
_SUMMED = 4


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule was passed to ``fully_shard``; FSDP1 is refused."""
    # A model can only be sharded if its user imported FSDP, so this costs nothing otherwise.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    legacy = getattr(fsdp, "FullyShardedDataParallel", None)
    if legacy is not None and any(isinstance(module, legacy) for module in model.modules()):
        raise ProbeError(
            f"{type(model).__name__} is wrapped in FullyShardedDataParallel (FSDP1), whose flat "
            "parameters hide the layers; shard it with torch.distributed.fsdp.fully_shard (FSDP2) "
            "or probe the unwrapped model"
        )
    # torch < 2.6 kept FSDP2 under torch.distributed._composable.fsdp.
    homes = [fsdp, sys.modules.get("torch.distributed._composable.fsdp")]
    sharded_types = tuple({home.FSDPModule for home in homes if home is not None and hasattr(home, "FSDPModule")})
    return bool(sharded_types) and any(isinstance(module, sharded_types) for module in model.modules())


def statistics(
    params: list[nn.Parameter],
    grads: list[torch.Tensor | None],
    embedding_rows: dict[int, torch.Tensor],
    loss: torch.Tensor,
) -> tuple[list[ParamStats], dict[int, float], float]:
    """What ``statistics.gradient_statistics`` returns with ``detail`` (a StatRow per parameter),
    with sums and maxima all-reduced across the shards.

    Every rank must call this: it runs two collectives. Parameters that FSDP leaves
    unsharded hold unsynchronised local gradients, so only rank 0's numbers count for them.
    """
    group = _shard_group(grads)
    zero = torch.zeros((), device=loss.device)
    rank_zero = float(dist.get_rank(group) == 0)
    sums, maxima, received = [], [], []
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        local = _local(grad).reshape(-1).float() * _share(grad, rank_zero)
        weight = _local(param.detach()).reshape(-1).float() * _share(param, rank_zero)
        sums += [local.abs().sum(), local.pow(2).sum(), torch.count_nonzero(local), weight.pow(2).sum()]
        maxima.append(local.abs().amax() if local.numel() else zero)  # a rank may hold an empty shard
        received.append(param)
    embedding_ids = list(embedding_rows)
    rows_used = [embedding_rows[key] for key in embedding_ids]
    summed = torch.stack([t.float().reshape(()) for t in [*sums, loss.detach()]])
    maximal = torch.stack([t.float().reshape(()) for t in [*maxima, *rows_used, zero]])  # never empty
    dist.all_reduce(summed, dist.ReduceOp.SUM, group=group)
    dist.all_reduce(maximal, dist.ReduceOp.MAX, group=group)
    summed_values, maximal_values = summed.tolist(), maximal.tolist()  # the one host sync
    by_param: dict[int, StatRow] = {}
    for index, param in enumerate(received):
        l1, l2_squared, nonzero, weight_squared = summed_values[_SUMMED * index : _SUMMED * (index + 1)]
        linf = maximal_values[index]
        by_param[id(param)] = StatRow(l1, math.sqrt(l2_squared), linf, nonzero, math.sqrt(weight_squared))
    per_param: list[ParamStats] = [by_param.get(id(param)) for param in params]
    # The union of rows looked up is not a sum; with the probe's seeded inputs all ranks agree.
    rows = dict(zip(embedding_ids, maximal_values[len(received) :]))
    loss_value = summed_values[-1] / dist.get_world_size(group)
    return per_param, rows, loss_value


def _shard_group(grads: list[torch.Tensor | None]) -> Any:
    """The one process group the gradients are sharded over (FSDP2 on a 1-D mesh)."""
    from torch.distributed.tensor import DTensor

    meshes = {grad.device_mesh for grad in grads if isinstance(grad, DTensor)}
    if not meshes:  # only unsharded parameters received a gradient
        return None
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        raise ProbeError(
            f"gradient statistics of fully_shard models need every sharded parameter on one 1-D "
            f"device mesh; found {len(meshes)} mesh(es) of dimensions "
            f"{sorted(mesh.ndim for mesh in meshes)} (HSDP and tensor parallelism are not supported)"
        )
    return next(iter(meshes)).get_group()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _share(tensor: torch.Tensor, rank_zero: float) -> float:
    """1 for a shard (each rank holds its own part), rank_zero for a replicated tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor) and all(placement.is_shard() for placement in tensor.placements):
        return 1.0
    return rank_zero
