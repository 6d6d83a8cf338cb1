"""Probing models wrapped for multi-process training (DDP, FSDP2): two CPU ranks, gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from torch import nn

from pytest_gradcheck import ProbeError, probe

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch build has no gloo process groups", allow_module_level=True)

# Two worker processes join a gloo process group: seconds to start, so out of the quick loop.
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD_SIZE = 2
# Both ranks import torch on a busy CI machine; a hang past this fails the test instead.
DEADLINE_S = 240


def run_ranks(scenarios: str, folder: Path) -> list[dict]:
    """Start WORLD_SIZE worker processes running ``scenarios``; return each rank's JSON result."""
    store = folder / "store"  # a FileStore rendezvous: no port to pick, none to collide on
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = []
    for rank in range(WORLD_SIZE):
        out = folder / f"rank{rank}.json"
        command = [sys.executable, str(WORKER), scenarios, str(rank), str(WORLD_SIZE), str(store), str(out)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ranks.append((process, out))
    logs = []
    deadline = time.monotonic() + DEADLINE_S  # one deadline for the pair, not one per rank
    try:
        for process, _ in ranks:
            logs.append(process.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for process, _ in ranks:
            process.kill()
        tails = "\n".join(
            f"rank {rank}:\n{process.communicate()[0][-1500:]}" for rank, (process, _) in enumerate(ranks)
        )
        pytest.fail(f"{scenarios}: the ranks did not finish within {DEADLINE_S} s (deadlock?)\n{tails}")
    for rank, ((process, _), log) in enumerate(zip(ranks, logs)):
        assert process.returncode == 0, f"{scenarios} rank {rank} exited with {process.returncode}:\n{log[-3000:]}"
    return [json.loads(out.read_text()) for _, out in ranks]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks("ddp,fsdp", tmp_path_factory.mktemp("distributed"))


@pytest.fixture
def ddp_results(results):
    return [result["ddp"] for result in results]


@pytest.fixture
def fsdp_results(results):
    skipped = results[0]["fsdp"].get("skipped")
    if skipped:
        pytest.skip(skipped)
    return [result["fsdp"] for result in results]


def names(profile: dict) -> list[str]:
    return [layer["name"] for layer in profile["layers"]]


def test_ddp_layer_names_lack_the_module_prefix(ddp_results):
    for result in ddp_results:
        assert names(result["every_rank"]) == ["0", "1", "3", "5"]
        assert (result["every_rank"]["first"], result["every_rank"]["last"]) == ("0", "5")


def test_ddp_profile_equals_the_unwrapped_model(ddp_results):
    rank0, rank1 = ddp_results
    # Same seed, same inferred inputs: every rank measures what a single process would.
    assert rank0["every_rank"] == rank0["local"] == rank1["every_rank"]


def test_probing_one_rank_alone_does_not_wait_for_the_others(ddp_results):
    rank0, rank1 = ddp_results
    assert names(rank0["rank0_only"]) == ["0", "1", "3", "5"]
    assert rank0["rank0_only"]["seed"] == 1
    assert "rank0_only" not in rank1


@pytest.mark.parametrize("step", [0, 1])
def test_ddp_training_step_after_the_probe_all_reduces(ddp_results, step):
    for result in ddp_results:
        assert result[f"step{step}_grads_equal_across_ranks"]
        assert result[f"step{step}_grads_are_the_mean"]
    assert all(result["params_equal_across_ranks"] for result in ddp_results)


def test_fsdp2_profile_matches_the_unsharded_model(fsdp_results):
    for result in fsdp_results:
        local, sharded = result["local"], result["every_rank"]
        assert names(sharded) == names(local) == ["0", "1", "3", "5"]
        assert (sharded["first"], sharded["last"]) == ("0", "5")
        # Each rank holds half of every gradient; the all-reduced sums give the full numbers.
        for whole, shards in zip(local["layers"], sharded["layers"]):
            assert shards["numel"] == whole["numel"]
            for stat in ("grad_mean_abs", "grad_max_abs", "grad_norm", "weight_norm", "zero_fraction"):
                assert shards[stat] == pytest.approx(whole[stat], rel=1e-5), (whole["name"], stat)
        assert sharded["loss"] == pytest.approx(local["loss"], rel=1e-6)


def test_fsdp2_probe_leaves_grads_and_training_intact(fsdp_results):
    for result in fsdp_results:
        assert result["grads_none_after_probe"]
        assert result["grads_kept"], "the probe changed gradient shards accumulated before it"
        assert result["step_grads_are_the_mean"]
        assert result["params_equal_across_ranks"]
        assert names(result["after_step"]) == ["0", "1", "3", "5"]


def test_data_parallel_layer_names_lack_the_module_prefix():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    profile = probe(nn.DataParallel(model))  # without GPUs it simply calls the module
    assert [layer.name for layer in profile.layers] == ["0", "2"]
    assert profile.to_dict() == probe(model).to_dict()


def test_fsdp1_wrapped_model_is_refused_with_a_pointer_to_fully_shard():
    from torch.distributed.fsdp import FullyShardedDataParallel

    # FSDP1 cannot be built without an accelerator and a process group; an instance made
    # without its __init__ is enough to exercise the check on the type.
    legacy = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(legacy)
    model = nn.Sequential(nn.Linear(4, 4), legacy)
    with pytest.raises(ProbeError, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard"):
        probe(model)
