"""Where the time of bench/ops.py's ckpt-step case goes: torch.profiler's self CPU time per step of
each operator, for ckbn (ckbn.checkpoint, ckbn.BatchNorm2d + ReLU) and torch
(torch.utils.checkpoint, torch.nn.BatchNorm2d + ReLU), side by side.

    python bench/profile_step.py [--layout NHWC] [--shape 32x64x56x56] [--steps 10]
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.utils.checkpoint
from torch.profiler import ProfilerActivity, profile

import ckbn


def per_step_ms(step, steps: int) -> dict:
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = collections.Counter()
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / steps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=("NCHW", "NHWC"), default="NHWC")
    parser.add_argument("--shape", default="32x64x56x56")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split("x"))
    fmt = torch.channels_last if args.layout == "NHWC" else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=fmt)

    def step_of(batch_norm, checkpoint):
        block = torch.nn.Sequential(batch_norm(shape[1]), torch.nn.ReLU())
        return lambda: torch.autograd.grad(checkpoint(block, x), (x, *block.parameters()), dy)

    steps = {
        "ckbn": step_of(ckbn.BatchNorm2d, ckbn.checkpoint),
        "torch": step_of(torch.nn.BatchNorm2d,
                         lambda f, t: torch.utils.checkpoint.checkpoint(f, t, use_reentrant=False)),
    }
    results = {name: per_step_ms(step, args.steps) for name, step in steps.items()}
    print(f"ckpt-step {args.shape} {args.layout}, {args.threads} thread(s): self CPU ms per step "
          f"(torch.profiler, {args.steps} steps)\n")
    print("| operator | ckbn | torch |\n|---|---:|---:|")
    names = sorted(set().union(*results.values()), key=lambda n: -max(r.get(n, 0) for r in results.values()))
    for name in names:
        if max(r.get(name, 0) for r in results.values()) >= 0.1:
            print(f"| {name} | {results['ckbn'].get(name, 0):.2f} | {results['torch'].get(name, 0):.2f} |")
    print(f"| **total** | {sum(results['ckbn'].values()):.2f} | {sum(results['torch'].values()):.2f} |")


if __name__ == "__main__":
    main()
