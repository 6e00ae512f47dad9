"""What tests/test_distributed.py runs in each of its processes, and the model, data and
training steps it shares with the single-process run it compares against."""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import coordgate_ext as cg

WORLD_SIZE = 2
STEPS = 2
BATCH = 4  # split evenly over the ranks: their mean losses average to the full batch's
SCENARIOS = ("ddp", "fully_shard")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        cg.FusedCoordGateConv2d(3, 4, 3, padding=1, dtype=torch.float64),
        nn.ReLU(),
        cg.FusedCoordGateBlock2d(4, 5, 2, 3, stride=2, padding=1, hidden_activation="tanh", dtype=torch.float64),
    )


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 3, 7, 6, dtype=torch.float64, generator=generator) for _ in range(STEPS)]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor parameter or gradient."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(model: nn.Module, inputs: list[torch.Tensor]) -> dict:
    """STEPS SGD steps on mean(model(x)^2): {"grads": [{name: grad} per step], "params": {name:
    the parameter after the last step}}, names without a DDP "module." prefix."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for x in inputs:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        grads.append({n.removeprefix("module."): _full(p.grad) for n, p in model.named_parameters()})
        optimizer.step()
    params = {n.removeprefix("module."): _full(p) for n, p in model.named_parameters()}
    return {"grads": grads, "params": params}


def _wrap(scenario: str, model: nn.Module) -> nn.Module:
    if scenario == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model:
        if isinstance(layer, cg.FusedCoordGateConv2d):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def run_rank(rank: int, port: int, out_dir: str) -> None:
    """Trains each scenario on this rank's share of every batch and saves {scenario: train's
    result, or {"error": the traceback}} to out_dir/rank<rank>.pt."""
    # Two processes share the machine's cores.
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for scenario in SCENARIOS:
            try:
                model = _wrap(scenario, make_model())
                results[scenario] = train(model, [x.chunk(WORLD_SIZE)[rank] for x in batches()])
            except Exception:
                results[scenario] = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
