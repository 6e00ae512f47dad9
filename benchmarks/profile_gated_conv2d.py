"""Where the fused CPU op's time goes: torch.profiler over a few steps of FusedCoordGateConv2d,
training forward and forward+backward (N=4, 32->32, 3x3, 256x256, float32 by default).

    PYTHONPATH=. .venv/bin/python benchmarks/profile_gated_conv2d.py [--size 256] [--steps 5]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

import coordgate_ext as cg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(4, 32, args.size, args.size, requires_grad=True)
    layer = cg.FusedCoordGateConv2d(32, 32, 3, padding=1, backend="cpu", gate_init="default")
    for mode in ("train_fwd", "fwd+bwd"):
        def step():
            out = layer(x)
            if mode == "fwd+bwd":
                out.backward(torch.ones_like(out))

        for _ in range(2):  # warm-up, outside the profile
            step()
        with profile() as prof:
            for _ in range(args.steps):
                step()
        print(f"{mode}, {args.steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
