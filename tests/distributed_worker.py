"""One rank of the distributed tests: probe a wrapped model, then train it; results as JSON.

Run by tests/test_ddp.py as ``python distributed_worker.py SCENARIOS RANK WORLD STORE OUT``,
where SCENARIOS is a comma-separated list of keys of ``SCENARIOS``.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from pytest_gradcheck import probe

# A collective that waits longer than this fails the rank instead of hanging the test.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every rank builds the same weights
    # The 1-wide head leaves rank 1 of 2 an empty FSDP shard of both of its parameters.
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank trains on its own data, so only an all-reduce can make the grads agree."""
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)


def gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([param.grad.reshape(-1) for param in model.parameters()])


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().reshape(-1) for param in model.parameters()])


def ddp_scenario(rank: int) -> dict:
    plain = make_model()
    model = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
    result = {"every_rank": probe(model).to_dict()}
    if rank == 0:  # probing one rank alone must not wait for the others
        result["rank0_only"] = probe(model, seed=1).to_dict()
    result["local"] = probe(plain).to_dict()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = local_batch(rank)
    for step in range(2):  # the reducer rebuilds its buckets after the first step
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        grads = flat_grads(model)
        # What the all-reduce should produce: the mean of every rank's local gradient.
        plain.zero_grad()
        plain.load_state_dict(model.module.state_dict())
        nn.functional.mse_loss(plain(x), target).backward()
        expected = torch.stack(gathered(flat_grads(plain))).mean(0)
        result[f"step{step}_grads_equal_across_ranks"] = all(torch.equal(grads, g) for g in gathered(grads))
        result[f"step{step}_grads_are_the_mean"] = torch.allclose(grads, expected, atol=1e-6)
        optimizer.step()
    params = flat_params(model)
    result["params_equal_across_ranks"] = all(torch.equal(params, p) for p in gathered(params))
    return result


def fsdp_scenario(rank: int) -> dict:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as error:  # torch < 2.6
        return {"skipped": f"no torch.distributed.fsdp.fully_shard in torch {torch.__version__}: {error}"}

    plain = make_model()
    model = copy.deepcopy(plain)
    for index in (0, 3, 5):
        fully_shard(model[index])
    fully_shard(model)
    result = {"local": probe(plain, detail=True).to_dict(), "every_rank": probe(model).to_dict()}
    result["grads_none_after_probe"] = all(param.grad is None for param in model.parameters())

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = local_batch(rank)
    nn.functional.mse_loss(model(x), target).backward()
    full = torch.cat([param.grad.full_tensor().reshape(-1) for param in model.parameters()])
    nn.functional.mse_loss(plain(x), target).backward()
    expected = torch.stack(gathered(flat_grads(plain))).mean(0)
    result["step_grads_are_the_mean"] = torch.allclose(full, expected, atol=1e-6)

    # A probe between backward() and step() must hand the accumulated shards back bit for bit.
    shards = [param.grad.to_local().clone() for param in model.parameters()]
    result["after_step"] = probe(model).to_dict()
    result["grads_kept"] = all(
        torch.equal(param.grad.to_local(), shard) for param, shard in zip(model.parameters(), shards)
    )
    optimizer.step()
    full_params = torch.cat([param.full_tensor().reshape(-1) for param in model.parameters()])
    result["params_equal_across_ranks"] = all(torch.equal(full_params, p) for p in gathered(full_params))
    return result


SCENARIOS = {"ddp": ddp_scenario, "fsdp": fsdp_scenario}


def main() -> None:
    scenarios, rank, world, store, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        # One process pair runs every scenario: starting torch twice more would cost seconds.
        result = {}
        for scenario in scenarios.split(","):
            result[scenario] = SCENARIOS[scenario](rank)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
