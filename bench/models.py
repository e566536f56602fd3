"""Model-level benchmark: one checkpointed training step (forward and backward) of torchvision's
ResNet-18 and DenseNet-121 on small images and ResNet-50 (batch 8 of 128x128, one checkpoint per
stage), in four variants:

* ``no checkpoint``: torch's BatchNorm, every activation kept;
* ``torch``: torch.utils.checkpoint around every residual block (ResNet-18), stage (ResNet-50) or
  dense block and transition (DenseNet), torch's BatchNorm and activations;
* ``ckbn``: ckbn.checkpoint around the same blocks, ckbn's BatchNorm;
* ``ckbn fused``: the same, with BatchNorm + activation pairs fused
  (``ckbn.convert_model(model, fuse_activations=True)``).

The variants run side by side in one process, alternating run by run, and every figure is also
given as a ratio to ``torch`` from the same run. On CPU: time is the minimum over --repeats runs on
--threads threads, and memory is the bytes of activations saved for backward. On CUDA: time is the
median of CUDA-event timings, and memory is the peak of torch.cuda.max_memory_allocated above what
the model and its gradients hold before the step.

    python -m bench.models [--quick] [--device cuda] [--json PATH] [--md PATH] [--plot PATH]

(from the repository root, so that ``ckbn`` imports from the working tree).

Needs torchvision; writes a PNG plot only when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ckbn
from ckbn.__main__ import CheckpointedNet, SavedTensorBytes, default_device, torch_checkpoint

OUT = Path(__file__).resolve().parent / "out"
CLASSES = 10


class Variant(NamedTuple):
    name: str
    checkpoint: Optional[Callable]
    convert: Optional[Callable[[nn.Module], nn.Module]]  # applied to a copy of the torch model


VARIANTS = (
    Variant("no checkpoint", None, None),
    Variant("torch", torch_checkpoint, None),
    Variant("ckbn", ckbn.checkpoint, ckbn.convert_model),
    Variant("ckbn fused", ckbn.checkpoint, functools.partial(ckbn.convert_model, fuse_activations=True)),
)
BASELINE = "torch"


def resnet18() -> CheckpointedNet:
    m = torchvision.models.resnet18(num_classes=CLASSES)
    blocks = [*m.layer1, *m.layer2, *m.layer3, *m.layer4]
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return CheckpointedNet(stem, blocks, nn.Sequential(m.avgpool, nn.Flatten(), m.fc))


def resnet50() -> CheckpointedNet:
    m = torchvision.models.resnet50(num_classes=CLASSES)
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return CheckpointedNet(stem, [m.layer1, m.layer2, m.layer3, m.layer4], nn.Sequential(m.avgpool, nn.Flatten(), m.fc))


def densenet121() -> CheckpointedNet:
    m = torchvision.models.densenet121(num_classes=CLASSES)
    # features: conv0 norm0 relu0 pool0, then dense blocks and transitions, then norm5
    features = list(m.features.children())
    head = nn.Sequential(features[-1], nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), m.classifier)
    return CheckpointedNet(nn.Sequential(*features[:4]), features[4:-1], head)


# name -> (builder, default batch size, default image size)
MODELS: Dict[str, Tuple[Callable[[], CheckpointedNet], int, int]] = {
    "resnet18": (resnet18, 16, 32),
    "densenet121": (densenet121, 16, 32),
    "resnet50": (resnet50, 8, 128),
}


def variant_model(model: CheckpointedNet, variant: Variant) -> CheckpointedNet:
    model = copy.deepcopy(model)
    if variant.convert is not None:
        model = variant.convert(model)
    model.checkpoint = variant.checkpoint
    return model


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    # Gradients stay allocated from the warm-up on, so the memory figure is activations only.
    model.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()


def activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        held = torch.cuda.memory_allocated(x.device)
        train_step(model, x, y)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - held
    with SavedTensorBytes(model) as saved:
        train_step(model, x, y)
    return saved.total


def seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(model, x, y)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    train_step(model, x, y)
    return time.perf_counter() - begin


def benchmark(name: str, batch_size: int, image_size: int, repeats: int, device: torch.device) -> List[dict]:
    torch.manual_seed(0)
    base = MODELS[name][0]().to(device)
    models = {variant.name: variant_model(base, variant) for variant in VARIANTS}
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(CLASSES, (batch_size,), device=device)

    for model in models.values():
        train_step(model, x, y)  # warm-up; allocates the gradients
    memory = {variant: activation_bytes(model, x, y) for variant, model in models.items()}
    times: Dict[str, List[float]] = {variant: [] for variant in models}
    order = list(models)
    for _ in range(repeats):
        for variant in order:
            times[variant].append(seconds(models[variant], x, y))
        order.append(order.pop(0))  # rotate, so no variant always runs right after the same one

    pick = min if device.type == "cpu" else statistics.median
    time_ms = {variant: 1e3 * pick(samples) for variant, samples in times.items()}
    return [
        {
            "model": name,
            "batch_size": batch_size,
            "image_size": image_size,
            "variant": variant,
            "time_ms": time_ms[variant],
            "time_ratio": time_ms[variant] / time_ms[BASELINE],
            "memory_bytes": memory[variant],
            "memory_ratio": memory[variant] / memory[BASELINE],
        }
        for variant in models
    ]


def markdown(report: dict) -> str:
    lines = [
        f"{report['machine']}; ckbn backend: {report['ckbn_backend']}; torch {report['torch']}; "
        f"time: {report['time']}; memory: {report['memory']}. Ratios are to `{BASELINE}` "
        "(torch.utils.checkpoint + torch BatchNorm).",
        "",
        "| model | variant | batch | time (ms) | time / torch | memory (MiB) | memory / torch |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['batch_size']} of {r['image_size']}² | {r['time_ms']:.1f} | "
            f"{r['time_ratio']:.2f} | "
            f"{r['memory_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = report["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(variants)
    for ax, field, title in zip(axes, ("time_ratio", "memory_ratio"), ("time / torch", "memory / torch")):
        for i, variant in enumerate(variants):
            values = [next(r[field] for r in rows if r["model"] == m and r["variant"] == variant) for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=variant)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(models))], models)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(title)
    axes[0].legend()
    figure.suptitle(f"{report['machine']}, ckbn backend: {report['ckbn_backend']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")  # whatever the file is called
    plt.close(figure)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="torch device (default: cuda if ckbn can run there, else cpu)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant (default 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: each model's (16; ResNet-50: 8)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="default: each model's (32; ResNet-50: 128); DenseNet needs 32+"
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 2 of 32x32, 2 repeats")
    parser.add_argument("--json", type=Path, default=OUT / "models.json", help="default bench/out/models.json")
    parser.add_argument("--md", type=Path, default=OUT / "models.md", help="default bench/out/models.md")
    parser.add_argument("--plot", type=Path, default=OUT / "models.png", help="default bench/out/models.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.image_size, args.repeats = 2, 32, 2
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or default_device())
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = [
            row
            for name in args.models.split(",")
            for row in benchmark(
                name,
                args.batch_size or MODELS[name][1],
                args.image_size or MODELS[name][2],
                args.repeats,
                device,
            )
        ]
    finally:
        torch.set_num_threads(threads)
    cpu = device.type == "cpu"
    report = {
        "machine": f"CPU, threads: {args.threads}" if cpu else torch.cuda.get_device_name(device),
        "device": str(device),
        "ckbn_backend": ckbn.backend(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "time": f"minimum of {args.repeats} runs" if cpu else f"median of {args.repeats} runs (CUDA events)",
        "memory": "activation bytes saved for backward" if cpu else "max_memory_allocated above model and gradients",
        "rows": rows,
    }
    for path in (args.json, args.md, args.plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    args.md.write_text(markdown(report))
    plot(report, args.plot)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
