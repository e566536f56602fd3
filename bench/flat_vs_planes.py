"""The flat element-wise CUDA kernel against the planes kernel it replaced, side by side on one GPU.

    python bench/flat_vs_planes.py [--runs 30] [--json OUT.json] [--md OUT.md] [--device cpu]

For ResNet-50's 7x7 BatchNorm layers (NCHW, S = 49) at batch 32 and 256, in float32, float16 and
bfloat16, it times normalize and grad_input (backward_elemt) twice: on 16-byte-aligned tensors,
which the planner reads as one flat run (elementwise_flat_kernel) where its units fill the GPU,
and on the same values one element into their storage, which admits no 16-byte loads and so takes
the planes kernel. At S = 49 the planes kernel's loads are scalar at any alignment, so the second
is the kernel that ran before the flat one, unchanged. Median of CUDA-event times, the two
alternating on rotating buffers (bench/ops.py's Timer); planes/flat above 1 means the flat kernel
is faster. Each row names the ckbn kernel each variant launched, from the profiler, so that a
row in which the planner chose the same kernel for both says so. `--device cpu` rehearses the
script on the CPU operators (bench/gpu_check.sh's dry run), where both variants run the same code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Dict, List

import torch

import ckbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops import Timer, buffer_count  # noqa: E402

SHAPES = [(batch, channels, 7, 7) for batch in (32, 256) for channels in (512, 2048)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-5


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """x's values one element into a fresh storage: the same shape and strides, 2- or 4-byte aligned."""
    storage = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
    view = storage[1:].view(x.shape)
    view.copy_(x)
    return view


def kernel_names(fn, device: str) -> List[str]:
    if device != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name.split("<")[0].split("::")[-1] for e in prof.events() if "ckbn" in e.name and "_kernel" in e.name}
    return sorted(names)


def measure(shape, dtype, runs: int, device: str) -> List[dict]:
    ops = torch.ops.ckbn
    channels = shape[1]
    buffers = buffer_count(device, 2 * torch.Size(shape).numel() * torch.finfo(dtype).bits // 8)
    xs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(buffers)]
    dys = [torch.randn(shape, device=device, dtype=dtype) for _ in range(buffers)]
    variants = {"flat": (xs, dys), "planes": ([misaligned(x) for x in xs], [misaligned(d) for d in dys])}
    mean, invstd = ops.batch_stats(xs[0], EPS)
    weight = torch.rand(channels, device=device) + 0.5
    bias = torch.randn(channels, device=device)
    sums = ops.backward_reduce(dys[0], xs[0], mean)
    count = xs[0].numel() // channels
    mean_dy, mean_dy_xmu = sums[0] / count, sums[1] / count
    calls = {
        "normalize": lambda x, dy: ops.normalize(x, mean, invstd, weight, bias),
        "grad_input": lambda x, dy: ops.backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu),
    }
    timer = Timer(device, runs, warmup=3, buffers=buffers)
    rows = []
    for op, call in calls.items():
        fns: Dict[str, object] = {name: (lambda i, x=x, dy=dy: call(x[i], dy[i])) for name, (x, dy) in variants.items()}
        flat_ms, planes_ms = timer.pair(fns["flat"], fns["planes"])
        rows.append(
            {
                "op": op,
                "shape": list(shape),
                "dtype": str(dtype).replace("torch.", ""),
                "flat_ms": flat_ms,
                "planes_ms": planes_ms,
                "planes_over_flat": planes_ms / flat_ms,
                "kernels": {name: kernel_names(lambda fn=fn: fn(0), device) for name, fn in fns.items()},
            }
        )
    return rows


def markdown(meta: dict, rows: List[dict]) -> str:
    lines = [
        "# ckbn: the flat element-wise kernel against the planes kernel (NCHW, S = 49)",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| op | shape | dtype | flat ms | planes ms | planes/flat | kernels (aligned; misaligned) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernels = "; ".join(", ".join(k) or "none" for k in r["kernels"].values())
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['flat_ms']:.3f} | "
            f"{r['planes_ms']:.3f} | {r['planes_over_flat']:.2f}x | {kernels} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json")
    parser.add_argument("--md")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shapes", type=int, help="only the first SHAPES shapes (a quick rehearsal)")
    args = parser.parse_args()
    if args.device == "cuda" and not (torch.cuda.is_available() and ckbn.cuda_compiled()):
        print("needs a CUDA device and ckbn built with its CUDA kernels (--device cpu rehearses)")
        return 1
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (rehearsal)",
        "torch": torch.__version__,
        "timing": f"{'median of' if args.device == 'cuda' else 'least of'} {args.runs} runs, alternating",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    shapes = SHAPES[: args.shapes] if args.shapes else SHAPES
    rows = [row for shape in shapes for dtype in DTYPES for row in measure(shape, dtype, args.runs, args.device)]
    text = markdown(meta, rows)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
