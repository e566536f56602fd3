"""Where the time of bench/ops.py's ckpt-step case goes: torch.profiler's self CPU time per step of
each operator, for ckbn (ckbn.checkpoint, ckbn.BatchNorm2d + ReLU) and torch
(torch.utils.checkpoint, torch.nn.BatchNorm2d + ReLU), side by side.

    python bench/profile_step.py [--layout NHWC] [--shape 32x64x56x56] [--steps 10]
    python bench/profile_step.py --cold-backward   # the backward ops alone, caches flushed before each call
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.profiler import ProfilerActivity, profile

import ckbn
from ckbn import ops


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


def cold_backward(shape, fmt, rounds: int = 3, runs: int = 15) -> None:
    """ckbn's backward op and torch's batch-norm backward, each after writing 64 MB (more than the
    last-level caches this was measured on), minimum of `runs`."""
    flush = torch.empty(16 * 2**20)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    weight, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    mean, invstd = ops.batch_stats(x, 1e-5)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True)

    def best_ms(fn):
        times = []
        for _ in range(runs):
            flush.add_(1)
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        return min(times) * 1e3

    for _ in range(rounds):
        ckbn_ms = best_ms(lambda: ops.backward(dy, x, mean, invstd, weight, True, [True, True, True]))
        torch_ms = best_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True))
        print(
            f"cold backward {fmt}: ckbn {ckbn_ms:.2f} ms, torch {torch_ms:.2f} ms, torch/ckbn {torch_ms / ckbn_ms:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=("NCHW", "NHWC"), default="NHWC")
    parser.add_argument("--shape", default="32x64x56x56")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cold-backward", action="store_true", help="time the backward ops alone, caches flushed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split("x"))
    fmt = torch.channels_last if args.layout == "NHWC" else torch.contiguous_format
    if args.cold_backward:
        return cold_backward(shape, fmt)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=fmt)

    def step_of(batch_norm, checkpoint):
        block = torch.nn.Sequential(batch_norm(shape[1]), torch.nn.ReLU())
        return lambda: torch.autograd.grad(checkpoint(block, x), (x, *block.parameters()), dy)

    steps = {
        "ckbn": step_of(ckbn.BatchNorm2d, ckbn.checkpoint),
        "torch": step_of(
            torch.nn.BatchNorm2d, lambda f, t: torch.utils.checkpoint.checkpoint(f, t, use_reentrant=False)
        ),
    }
    results = {name: per_step_ms(step, args.steps) for name, step in steps.items()}
    print(
        f"ckpt-step {args.shape} {args.layout}, {args.threads} thread(s): self CPU ms per step "
        f"(torch.profiler, {args.steps} steps)\n"
    )
    print("| operator | ckbn | torch |\n|---|---:|---:|")
    names = sorted(set().union(*results.values()), key=lambda n: -max(r.get(n, 0) for r in results.values()))
    for name in names:
        if max(r.get(name, 0) for r in results.values()) >= 0.1:
            print(f"| {name} | {results['ckbn'].get(name, 0):.2f} | {results['torch'].get(name, 0):.2f} |")
    print(f"| **total** | {sum(results['ckbn'].values()):.2f} | {sum(results['torch'].values()):.2f} |")


if __name__ == "__main__":
    main()
