"""Where a training step of bench/models.py's variants spends its time: torch.profiler's self CPU
time per step, grouped by kind of operator (convolution forward and backward, BatchNorm, activations
and adds, the rest), for the unchecked model and the checkpointed variants side by side.

It shows what bounds a checkpointed step from below: a selective checkpoint recomputes BatchNorm,
the activations and the adds, so its step costs at least the unchecked step plus those forwards.

    python -m bench.profile_models [--model resnet50] [--variants "no checkpoint,ckbn fused selective"]
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from bench.models import MODELS, VARIANTS, train_step, variant_model

GROUPS = (
    "convolution forward",
    "convolution backward",
    "BatchNorm",
    "activations and adds",
    "pooling, linear, loss",
    "other",
)


def group_of(key: str) -> str:
    """The group of a profiler key (an operator's name)."""
    if "conv" in key:  # aten::convolution*, _slow_conv2d_*, mkldnn_convolution*
        return "convolution backward" if "backward" in key else "convolution forward"
    if "batch_norm" in key or key.startswith("ckbn::"):
        return "BatchNorm"
    if any(fragment in key for fragment in ("relu", "threshold", "add", "cat")):
        return "activations and adds"
    if any(fragment in key for fragment in ("pool", "linear", "mm", "entropy", "nll_loss", "softmax")):
        return "pooling, linear, loss"
    return "other"


def per_step_ms(model, x, y, steps: int) -> Dict[str, float]:
    for _ in range(2):
        train_step(model, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(model, x, y)
    totals: Dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / steps
    return totals


def grouped(per_op: Dict[str, float]) -> Dict[str, float]:
    totals: Dict[str, float] = collections.Counter()
    for key, ms in per_op.items():
        totals[group_of(key)] += ms
    return totals


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument(
        "--variants",
        default="no checkpoint,torch selective,ckbn fused selective,ckbn fused",
        help="comma-separated names from bench/models.py",
    )
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    builder, batch_size, image_size = MODELS[args.model]
    base = builder()
    chosen: List = [v for v in VARIANTS if v.name in args.variants.split(",")]
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))
    results = {v.name: per_step_ms(variant_model(base, v).train(), x, y, args.steps) for v in chosen}
    groups = list(GROUPS)
    names = list(results)
    print(
        f"{args.model}, batch {batch_size} of {image_size}², CPU, 1 thread, self CPU ms per step "
        f"(torch.profiler, mean of {args.steps} steps); torch {torch.__version__}"
    )
    print()
    print("| operators | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    by_group = {name: grouped(per_op) for name, per_op in results.items()}
    for group in groups + ["total"]:
        cells = []
        for name in names:
            value = sum(by_group[name].values()) if group == "total" else by_group[name].get(group, 0.0)
            cells.append(f"{value:.0f}")
        print(f"| {group} | " + " | ".join(cells) + " |")
    print()
    for name in names:
        other = sorted(((ms, key) for key, ms in results[name].items() if group_of(key) == "other"), reverse=True)
        print(f"- {name}, largest in other: " + ", ".join(f"{key} {ms:.0f}" for ms, key in other[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
