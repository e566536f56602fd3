"""The per-call cost of a BatchNorm2d training step, forward and backward, on a tensor small enough
that Python and the dispatcher, not the kernels, take the time: ckbn against torch.

    python bench/small_step.py [--device cpu|cuda] [--shape 2x8x2x2] [--steps 2000] [--runs 7]

Side by side in one process, one thread, runs alternating; each figure is the minimum over the runs
of the mean step time. On a GPU the late layers of a CNN at small batch are in this regime.
"""

from __future__ import annotations

import argparse
import time

import torch

import ckbn


def step_time(module, x, steps: int, sync) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        module(x).sum().backward()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", default="2x8x2x2")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(s) for s in args.shape.split("x"))
    x = torch.randn(shape, device=args.device, requires_grad=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    modules = {
        "torch": torch.nn.BatchNorm2d(shape[1]).to(args.device),
        "ckbn": ckbn.BatchNorm2d(shape[1]).to(args.device),
    }
    best = {name: float("inf") for name in modules}
    for module in modules.values():  # warm-up
        step_time(module, x, 50, sync)
    for _ in range(args.runs):
        for name, module in modules.items():
            best[name] = min(best[name], step_time(module, x, args.steps, sync))
    print(
        f"{args.device} {args.shape}, torch {torch.__version__}, ckbn {ckbn.backend()}: "
        f"torch {best['torch'] * 1e6:.1f} us, ckbn {best['ckbn'] * 1e6:.1f} us, "
        f"torch/ckbn {best['torch'] / best['ckbn']:.2f}x"
    )


if __name__ == "__main__":
    main()
