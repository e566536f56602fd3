"""Model-level benchmark: one checkpointed training step (forward and backward) of torchvision's
ResNet-18 and DenseNet-121 on small images and ResNet-50 (batch 8 of 128x128, one checkpoint per
stage), in four variants:

* ``no checkpoint``: torch's BatchNorm, every activation kept;
* ``torch``: torch.utils.checkpoint around every residual block (ResNet-18), stage (ResNet-50) or
  dense block and transition (DenseNet), torch's BatchNorm and activations;
* ``ckbn``: ckbn.checkpoint around the same blocks, ckbn's BatchNorm;
* ``ckbn fused``: the same, with BatchNorm + activation pairs fused
  (``ckbn.convert_model(model, fuse_activations=True)``);
* ``torch selective``: torch's selective checkpointing around the same blocks, keeping the outputs
  of ckbn's ``COMPUTE_INTENSIVE_OPS`` (convolutions, matrix products), torch's BatchNorm;
* ``ckbn fused selective``: ``ckbn.checkpoint(save="compute")`` with fused ckbn BatchNorm.

The variants run side by side in one process, alternating run by run, and every figure is also
given as a ratio to ``torch`` from the same run. On CPU: time is the minimum over --repeats runs on
--threads threads. Memory is given three ways on CPU: the bytes autograd saves for backward (which
cannot see what a selective policy keeps outside autograd's saved tensors), and what the step really
holds: the resident bytes held when the forward returns and the peak during the backward, above what
the process held before the step. Those are measured in a child process started with
``MALLOC_MMAP_THRESHOLD_`` set, so that every freed tensor leaves the process at once, which resets
the kernel's peak (``VmHWM``) before each step; the times are measured in the parent, with the
allocator as training has it. On CUDA: time is the median of CUDA-event timings, and memory is the peak of
torch.cuda.max_memory_allocated above what the model and its gradients hold before the step.

    python -m bench.models [--quick] [--device cuda] [--json PATH] [--md PATH] [--plot PATH]

(from the repository root, so that ``ckbn`` imports from the working tree).

Needs torchvision; writes a PNG plot only when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


def torch_selective_checkpoint(function: Callable, *args: torch.Tensor) -> torch.Tensor:
    ops = sorted(ckbn.checkpointing.COMPUTE_INTENSIVE_OPS, key=str)
    context_fn = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, ops)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=context_fn)


FUSED = functools.partial(ckbn.convert_model, fuse_activations=True)
VARIANTS = (
    Variant("no checkpoint", None, None),
    Variant("torch", torch_checkpoint, None),
    Variant("ckbn", ckbn.checkpoint, ckbn.convert_model),
    Variant("ckbn fused", ckbn.checkpoint, FUSED),
    Variant("torch selective", torch_selective_checkpoint, None),
    Variant("ckbn fused selective", functools.partial(ckbn.checkpoint, save="compute"), FUSED),
)
BASELINE = "torch"
UNCHECKED = "no checkpoint"
# Every freed allocation from this size up goes back to the kernel at once, so resident bytes follow live tensors.
MMAP_THRESHOLD = "65536"


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
    "densenet121": (densenet121, 8, 128),  # its last stage 4x4: 128 values per channel at batch 8
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


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def resident_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[int, int]:
    """(bytes held when the forward returns, peak bytes during the backward), above what the
    process held before the step (CPU, Linux)."""
    model.zero_grad(set_to_none=False)
    gc.collect()
    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM, the peak resident set, to the current one
    loss = F.cross_entropy(model(x), y)
    held = _proc_status_bytes("VmRSS") - before
    loss.backward()
    peak = _proc_status_bytes("VmHWM") - before
    return held, peak


def _ratio(value: float, reference: float) -> float:
    # A tiny model can hold nothing measurable above the page granularity of resident memory.
    return value / reference if reference > 0 else float("nan")


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


def _setup(name: str, batch_size: int, image_size: int, device: torch.device):
    torch.manual_seed(0)
    base = MODELS[name][0]().to(device)
    models = {variant.name: variant_model(base, variant) for variant in VARIANTS}
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(CLASSES, (batch_size,), device=device)
    for model in models.values():
        train_step(model, x, y)  # warm-up; allocates the gradients
    return models, x, y


def resident_of_every_variant(name: str, batch_size: int, image_size: int) -> Dict[str, Tuple[int, int]]:
    models, x, y = _setup(name, batch_size, image_size, torch.device("cpu"))
    return {variant: resident_bytes(model, x, y) for variant, model in models.items()}


def resident_in_child(args: argparse.Namespace) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """The resident-memory figures, measured in a child process started with MALLOC_MMAP_THRESHOLD_
    (glibc reads it at start-up), so that every freed tensor leaves the process at once. Times are
    measured here, with the allocator as training runs it: with the threshold, each large tensor is
    a fresh mapping whose pages the kernel faults in and zeroes, which would slow every variant."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "resident.json"
        command = [sys.executable, "-m", "bench.models", "--resident-json", str(out), "--models", args.models]
        for flag, value in (
            ("--batch-size", args.batch_size),
            ("--image-size", args.image_size),
            ("--threads", args.threads),
        ):
            if value is not None:
                command += [flag, str(value)]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
        subprocess.run(command, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
        return json.loads(out.read_text())


def benchmark(
    name: str,
    batch_size: int,
    image_size: int,
    repeats: int,
    device: torch.device,
    resident: Dict[str, Tuple[int, int]],
) -> List[dict]:
    models, x, y = _setup(name, batch_size, image_size, device)
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
            "time_vs_unchecked": time_ms[variant] / time_ms[UNCHECKED],
            **(
                {
                    "held_bytes": resident[variant][0],
                    "held_vs_unchecked": _ratio(resident[variant][0], resident[UNCHECKED][0]),
                    "backward_peak_bytes": resident[variant][1],
                    "backward_peak_vs_unchecked": _ratio(resident[variant][1], resident[UNCHECKED][1]),
                }
                if resident
                else {}
            ),
        }
        for variant in models
    ]


def markdown(report: dict) -> str:
    resident = "held_bytes" in report["rows"][0]
    lines = [
        f"{report['machine']}; ckbn backend: {report['ckbn_backend']}; torch {report['torch']}; "
        f"time: {report['time']}; memory: {report['memory']}. Ratios are to `{BASELINE}` "
        f"(torch.utils.checkpoint + torch BatchNorm) and to `{UNCHECKED}`.",
        "",
        "| model | variant | batch | time (ms) | time / torch | time / unchecked "
        "| saved for backward (MiB) | saved / torch |"
        + (
            " held after forward (MiB) | held / unchecked | backward peak (MiB) | peak / unchecked |"
            if resident
            else ""
        ),
        "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if resident else ""),
    ]
    for r in report["rows"]:
        line = (
            f"| {r['model']} | {r['variant']} | {r['batch_size']} of {r['image_size']}² | {r['time_ms']:.1f} | "
            f"{r['time_ratio']:.2f} | {r['time_vs_unchecked']:.2f} | "
            f"{r['memory_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f} |"
        )
        if resident:
            line += (
                f" {r['held_bytes'] / 2**20:.1f} | {r['held_vs_unchecked']:.2f} | "
                f"{r['backward_peak_bytes'] / 2**20:.1f} | {r['backward_peak_vs_unchecked']:.2f} |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Per model, step time against memory (held after the forward on CPU, the peak on CUDA), one
    point per variant: the frontier the checkpointing choices span."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = report["rows"]
    memory = "held_bytes" if "held_bytes" in rows[0] else "memory_bytes"
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == model):
            ax.scatter(r[memory] / 2**20, r["time_ms"], label=r["variant"])
            ax.annotate(
                r["variant"], (r[memory] / 2**20, r["time_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel("held after forward (MiB)" if memory == "held_bytes" else "peak memory (MiB)")
        ax.set_ylabel("step time (ms)")
        ax.set_title(model)
    figure.suptitle(f"{report['machine']}, ckbn backend: {report['ckbn_backend']}", fontsize=9)
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
    parser.add_argument("--resident-json", type=Path, default=None, help=argparse.SUPPRESS)  # the child's output
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
    names = args.models.split(",")
    sizes = {name: (args.batch_size or MODELS[name][1], args.image_size or MODELS[name][2]) for name in names}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.resident_json is not None:
            if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
                raise SystemExit(f"--resident-json needs MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in the environment")
            figures = {name: resident_of_every_variant(name, *sizes[name]) for name in names}
            args.resident_json.write_text(json.dumps(figures))
            return 0
        resident = resident_in_child(args) if device.type == "cpu" else {}
        rows = [
            row for name in names for row in benchmark(name, *sizes[name], args.repeats, device, resident.get(name, {}))
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
        "memory": "bytes saved for backward, and resident bytes held after the forward and at the backward's peak "
        f"(measured in a child process with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; times without it)"
        if cpu
        else "max_memory_allocated above model and gradients",
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
