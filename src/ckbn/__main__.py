"""Demo: BatchNorm running statistics under activation checkpointing, torch's BatchNorm against ckbn's.

Trains one small residual CNN, from one initial state on one stream of synthetic batches, in four
configurations that take turns step by step, and prints what each one ends with. torch's BatchNorm
updates its running statistics again when a checkpoint recomputes a block's forward, so
configuration 2 counts every batch twice; the ckbn configurations update once.

The reference runs ckbn's BatchNorm without checkpointing, so the running statistics of
configurations 3 and 4 can be compared with it bit for bit. (Against torch's BatchNorm they would
differ by float32 rounding, which 60 SGD steps amplify to about 1e-2.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ckbn

CLASSES = 10
IMAGE_CHANNELS = 3
IMAGE_SIZE = 16
WIDTH = 16
BLOCKS = 3
EVAL_SIZE = 1024
PERIOD = 4


def torch_checkpoint(function: Callable, *args: Tensor) -> Tensor:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


@dataclass(frozen=True)
class Config:
    name: str
    checkpoint: Optional[Callable]
    ckbn_batchnorm: bool


# Blocks are checkpointed; the stem and the head are not.
CONFIGS = (
    Config("no checkpoint + ckbn BN (reference)", None, True),
    Config("torch checkpoint + torch BN", torch_checkpoint, False),
    Config("torch checkpoint + ckbn BN", torch_checkpoint, True),
    Config("ckbn.checkpoint + ckbn BN", ckbn.checkpoint, True),
)


class CheckpointedNet(nn.Module):
    """stem, then blocks, then head; each block runs through ``self.checkpoint`` when it is set."""

    def __init__(self, stem: nn.Module, blocks: Iterable[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head
        self.checkpoint: Optional[Callable] = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x) if self.checkpoint is None else self.checkpoint(block, x)
        return self.head(x)


def conv_bn_relu(channels_in: int, channels_out: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(width, width), conv_bn_relu(width, width, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


def residual_cnn() -> CheckpointedNet:
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, CLASSES))
    return CheckpointedNet(conv_bn_relu(IMAGE_CHANNELS, WIDTH), [ResidualBlock(WIDTH) for _ in range(BLOCKS)], head)


class SyntheticTask:
    """Each class is a periodic texture: a random PERIOD x PERIOD patch, tiled, shifted at random per
    sample, plus noise."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        patches = torch.randn(CLASSES, IMAGE_CHANNELS, PERIOD, PERIOD, generator=generator)
        self.textures = patches.repeat(1, 1, IMAGE_SIZE // PERIOD, IMAGE_SIZE // PERIOD)

    def batch(self, size: int, device: torch.device):
        g = self.generator
        labels = torch.randint(CLASSES, (size,), generator=g)
        shifts = torch.randint(PERIOD, (size, 2), generator=g)
        images = torch.stack(
            [self.textures[k].roll(tuple(shift), dims=(1, 2)) for k, shift in zip(labels.tolist(), shifts.tolist())]
        )
        return (images + torch.randn(images.shape, generator=g)).to(device), labels.to(device)


class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward inside the context, counted once per storage.

    The parameters and buffers of ``model`` are not counted, so the figure is activations. A
    checkpointed region saves only its inputs; its recompute during backward is invisible to these
    hooks. The saved set only grows during a forward, so its size when the forward returns is its
    peak over the step.
    """

    def __init__(self, model: nn.Module) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.storages = {}

    def pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def default_device() -> str:
    """cuda when there is a GPU that the active ckbn backend can run on, else cpu."""
    usable = torch.cuda.is_available() and (ckbn.backend() == "reference" or ckbn.cuda_compiled())
    return "cuda" if usable else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(label: str, done: int, total: int, width: int = 30) -> None:
    filled = width * done // total
    grew = done == 1 or filled > width * (done - 1) // total
    # In a terminal the bar is redrawn when it grows; in a log only the finished bar is written.
    if done < total and not (grew and sys.stderr.isatty()):
        return
    end = "\n" if done == total else ""
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
    sys.stderr.flush()


class Training:
    """One configuration's model, optimizer and measurements."""

    def __init__(self, config: Config, initial: CheckpointedNet, steps: int) -> None:
        self.config = config
        self.model = copy.deepcopy(initial)
        if config.ckbn_batchnorm:
            self.model = ckbn.convert_model(self.model)
        self.model.checkpoint = config.checkpoint
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, steps)
        self.seconds: List[float] = []
        self.saved_bytes = 0

    def step(self, x: Tensor, y: Tensor, count_saved: bool) -> None:
        synchronize(x.device)
        start = time.perf_counter()
        with SavedTensorBytes(self.model) if count_saved else contextlib.nullcontext() as saved:
            loss = F.cross_entropy(self.model(x), y)
        if count_saved:
            self.saved_bytes = saved.total
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        synchronize(x.device)
        self.seconds.append(time.perf_counter() - start)

    def result(self, eval_batch) -> dict:
        self.model.eval()
        with torch.no_grad():
            x, y = eval_batch
            logits = self.model(x)
        # The step that counted saved tensors is not timed: the hooks cost time.
        timed = self.seconds[1:] or self.seconds
        return {
            "name": self.config.name,
            "eval_loss": F.cross_entropy(logits, y).item(),
            "eval_accuracy": (logits.argmax(1) == y).float().mean().item(),
            "saved_bytes": self.saved_bytes,
            "ms_per_step": 1e3 * statistics.median(timed),
        }


def running_stats_deviation(buffers: dict, reference: dict) -> float:
    return max(
        (buffers[name] - reference[name]).abs().max().item()
        for name in reference
        if name.endswith(("running_mean", "running_var"))
    )


def num_batches_tracked(buffers: dict) -> int:
    """The largest count: the stem's BatchNorm runs outside the checkpoints and is never recomputed."""
    return max(int(buf) for name, buf in buffers.items() if name.endswith("num_batches_tracked"))


def run(steps: int, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    """Train every configuration and return the comparison (what --json writes)."""
    torch.manual_seed(seed)
    initial = residual_cnn().to(device)
    task = SyntheticTask(torch.Generator().manual_seed(seed))
    batches = [task.batch(batch_size, device) for _ in range(steps)]
    eval_batch = task.batch(EVAL_SIZE, device)

    trainings = [Training(config, initial, steps) for config in CONFIGS]
    # The configurations take turns step by step, so a change in machine load affects them alike.
    for step, (x, y) in enumerate(batches):
        for training in trainings:
            training.step(x, y, count_saved=step == 0)
        progress("training", step + 1, steps)

    reference = dict(trainings[0].model.named_buffers())
    results = []
    for training in trainings:
        buffers = dict(training.model.named_buffers())
        results.append(training.result(eval_batch))
        results[-1]["running_stats_max_deviation"] = running_stats_deviation(buffers, reference)
        results[-1]["num_batches_tracked"] = num_batches_tracked(buffers)
    return {
        "ckbn_backend": ckbn.backend(),
        "torch": torch.__version__,
        "device": str(device),
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "configs": results,
    }


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(report: dict) -> str:
    head = (
        "configuration",
        "running stats: max deviation",
        "num_batches_tracked",
        "eval loss",
        "eval accuracy",
        "saved for backward",
        "ms/step",
    )
    rows = [
        (
            r["name"],
            f"{r['running_stats_max_deviation']:.2e}",
            str(r["num_batches_tracked"]),
            f"{r['eval_loss']:.4f}",
            f"{100 * r['eval_accuracy']:.1f}%",
            _bytes(r["saved_bytes"]),
            f"{r['ms_per_step']:.1f}",
        )
        for r in report["configs"]
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ckbn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per configuration (default 60)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if ckbn can run there, else cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: the model is too small to gain from more; 0 keeps torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial state and the data (default 0)")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also write the results as JSON to PATH; with no PATH (or '-') the JSON goes to stdout and "
        "the header and table to stderr",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be at least 1 and --batch-size at least 2")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or default_device())
    text = sys.stderr if args.json == "-" else sys.stdout
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        where = f"{device}, threads: {torch.get_num_threads()}" if device.type == "cpu" else str(device)
        header = f"ckbn {ckbn.__version__}, backend: {ckbn.backend()}; torch {torch.__version__}; {where}"
        print(header, file=text, flush=True)
        started = time.perf_counter()
        report = run(args.steps, args.batch_size, device, args.seed)
        report["seconds"] = time.perf_counter() - started
        report["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    print(table(report), file=text)
    print(f"{args.steps} steps of batch {args.batch_size} per configuration; {report['seconds']:.1f} s", file=text)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
