"""Data-parallel training of the layers over 2 CPU processes with gloo: DistributedDataParallel
and FSDP2's fully_shard each give the gradients and parameters of one process training on
the whole batch (float64). One start of the processes runs both scenarios: starting them is
most of the cost."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import _distributed
from tests.support import assert_close

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

#: Seconds the spawned processes may take in all before they are killed.
SPAWN_TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's {scenario: result} from _distributed.run_rank."""
    out_dir = tmp_path_factory.mktemp("distributed")
    # The fork server imports torch once for both ranks and forks them from a process that
    # has run nothing (forking pytest itself, after its tests have run threads, is not safe).
    # Python 3.11's fork server ignores sys.path, so it preloads site-packages modules only:
    # the slow ones (DDP's constructor imports torch._dynamo, 2 s a rank).
    mp.set_forkserver_preload(["torch._dynamo", "torch.distributed.fsdp", "torch.nn.parallel"])
    context = mp.start_processes(
        _distributed.run_rank, args=(_free_port(), str(out_dir)), nprocs=_distributed.WORLD_SIZE,
        join=False, start_method="forkserver",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {_distributed.WORLD_SIZE} processes did not finish in {SPAWN_TIMEOUT} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(_distributed.WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process() -> dict:
    return _distributed.train(_distributed.make_model(), _distributed.batches())


def _check(ranks, single_process, scenario: str) -> None:
    results = [rank[scenario] for rank in ranks]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
    for step in range(_distributed.STEPS):
        want = single_process["grads"][step]
        for rank, result in enumerate(results):
            assert result["grads"][step].keys() == want.keys()
            for name, grad in result["grads"][step].items():
                # The ranks hold the same all-reduced gradient, bit for bit.
                assert torch.equal(grad, results[0]["grads"][step][name]), (step, rank, name)
                assert_close(grad, want[name])
    for result in results:
        for name, param in result["params"].items():
            assert_close(param, single_process["params"][name])


def test_ddp_matches_single_process(ranks, single_process):
    _check(ranks, single_process, "ddp")


def test_fully_shard_matches_single_process(ranks, single_process):
    _check(ranks, single_process, "fully_shard")
