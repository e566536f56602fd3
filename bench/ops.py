"""Op-level benchmark: ckbn's operators against torch's batch norm, side by side in one process.

    python bench/ops.py --device cpu  [--threads 1] [--quick] [--shapes 32x64x56x56,...]
    python bench/ops.py --device cuda [--quick] [--dtypes float16,bfloat16] [--cases fwd+bwd]

Cases (ckbn | torch):
  train-fwd   batch_stats + normalize + update_running_stats | F.batch_norm(training=True) with running buffers
  eval-fwd    invstd from running_var + normalize            | F.batch_norm(training=False)
  replay-fwd  normalize with given statistics                | F.batch_norm(training=True): what a
              checkpointed forward recomputes with torch, and replays with ckbn
  bwd         backward(train=True)                           | autograd backward of F.batch_norm (graph prebuilt)
  fwd+bwd     train-fwd + bwd                                | training forward + autograd backward
  ckpt-step   BN+ReLU step under ckbn.checkpoint (modules)   | BN+ReLU step under torch.utils.checkpoint
              (forward, then backward with its recompute; ckbn's recompute replays the statistics)
  relu-fwd+bwd, silu-fwd+bwd
              training forward + backward of a BatchNorm with  | BatchNorm + ReLU/SiLU(inplace=True)
              the activation fused (one normalize, one backward)
  relu-ckpt-step, silu-ckpt-step
              ckpt-step with the fused layer                   | ckpt-step with BatchNorm + ReLU/SiLU(inplace=True)

--compiled (the default on CUDA) also times, for fwd+bwd, relu-fwd+bwd and silu-fwd+bwd, torch's
BatchNorm (+ activation) module under torch.compile (Inductor's generated kernels), the other
fused implementation a user could pick, in the same process and alternating with ckbn; the
compiled/ckbn column is its time over ckbn's (above 1: ckbn is faster). Compilation happens in the
warm-up.

Method. CPU: torch.set_num_threads(--threads), ckbn and torch runs alternate, the minimum of --runs
runs is reported. CUDA: CUDA events around each call, after a warm-up; ckbn and torch alternate
and rotate among enough input buffers that the L2 cache holds none of them; the median is
reported. Each row gives torch/ckbn (above 1: ckbn is faster) and, on CUDA, bandwidth as a
fraction of a device-to-device copy moving the same bytes, measured in the same run. The bytes are
ckbn's passes over a tensor of the input's size: 2 for normalize, 3 for the training forward, and
for the backward what its kernels do on that shape (see backward_passes): 5 when a reduction kernel
is followed by an element-wise grad_input kernel, 3 when one fused kernel does both (its second
read of x and dy is meant to come from L2). So the column cannot exceed 1.

Results go to bench/out/ops-<device>.{json,md,png} unless --json/--md/--plot say otherwise; the
JSON and markdown are rewritten after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint  # noqa: E402

import ckbn  # noqa: E402
from ckbn import ops, reference  # noqa: E402

EPS = 1e-5
MOMENTUM = 0.1
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
CASES = (
    "train-fwd",
    "eval-fwd",
    "replay-fwd",
    "bwd",
    "fwd+bwd",
    "ckpt-step",
    "relu-fwd+bwd",
    "silu-fwd+bwd",
    "relu-ckpt-step",
    "silu-ckpt-step",
)
FUSED_ACTIVATIONS = {"relu": torch.nn.ReLU, "silu": torch.nn.SiLU}
# ckbn's passes over a tensor of the input's size, for the bandwidth column (none for the module
# step); the backward's depend on the shape (backward_passes).
FORWARD_PASSES = {"train-fwd": 3, "eval-fwd": 2, "replay-fwd": 2}
BACKWARD_PASSES = {"fused": 3, "unfused": 5}


def _resnet50(batch: int) -> List[tuple]:
    return [
        (batch, c, hw, hw)
        for c, hw in ((64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7))
    ]


SHAPES = {
    "cpu": [(32, 64, 56, 56)],
    "cuda": _resnet50(256)
    + [(64, 64, 112, 112), (64, 256, 56, 56), (64, 1024, 14, 14), (64, 2048, 7, 7)]
    + [(4096, 1024)],
}
QUICK_SHAPES = {
    "cpu": [(8, 64, 28, 28)],
    "cuda": [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7), (4096, 1024)],
}
DTYPES = {"cpu": ["float32"], "cuda": ["float32", "float16", "bfloat16"]}


@dataclass
class Row:
    case: str
    shape: List[int]
    layout: str
    dtype: str
    ckbn_ms: float
    torch_ms: float
    ratio: float  # torch / ckbn
    tensor_mib: float
    bandwidth: Optional[float] = None  # fraction of copy bandwidth (CUDA)
    passes: Optional[int] = None  # passes over the tensor behind `bandwidth`
    compiled_ms: Optional[float] = None  # torch's module under torch.compile (--compiled)
    compiled_ratio: Optional[float] = None  # compiled / ckbn
    targets: List[str] = field(default_factory=list)
    missed: List[str] = field(default_factory=list)


def targets_for(device: str, row: Row, threads: int) -> Dict[str, Callable[[Row], bool]]:
    """The targets a row is held to, by name."""
    found: Dict[str, Callable[[Row], bool]] = {}
    if device == "cuda":
        if row.case == "fwd+bwd":
            found["torch/ckbn >= 1.10"] = lambda r: r.ratio >= 1.10
        if row.case == "replay-fwd":
            found["torch/ckbn >= 1.50"] = lambda r: r.ratio >= 1.50
        if row.case in {f"{act}-fwd+bwd" for act in FUSED_ACTIVATIONS}:
            found["torch/ckbn >= 1.40"] = lambda r: r.ratio >= 1.40
        # Only where the row has a pass count: the module steps and fused cases have no bandwidth.
        if row.tensor_mib >= 64 and row.passes is not None:
            found["bandwidth >= 85% of copy"] = lambda r: r.bandwidth >= 0.85
    elif row.dtype == "float32" and threads == 1 and tuple(row.shape) == (32, 64, 56, 56):
        fused = {
            ("fwd+bwd", "NCHW"): 1.5,
            ("fwd+bwd", "NHWC"): 1.2,
            ("ckpt-step", "NCHW"): 1.8,
            ("ckpt-step", "NHWC"): 1.4,
        }
        need = {
            ("fwd+bwd", "NCHW"): 1.5,
            ("fwd+bwd", "NHWC"): 1.0,
            ("ckpt-step", "NCHW"): 1.3,
            ("ckpt-step", "NHWC"): 1.1,
            **{
                (f"{act}-{case}", layout): target
                for (case, layout), target in fused.items()
                for act in FUSED_ACTIVATIONS
            },
        }.get((row.case, row.layout))
        if need is not None:
            found[f"torch/ckbn >= {need:.2f}"] = lambda r, need=need: r.ratio >= need
    return found


class FusedBatchNorm(torch.nn.Module):
    """A ckbn BatchNorm with its activation fused, as ckbn's BatchNormAct modules run it."""

    def __init__(self, batch_norm: torch.nn.Module, activation: str):
        super().__init__()
        self.bn, self.activation = batch_norm, activation

    def forward(self, x):
        return ckbn.policy.batch_norm_forward(self.bn, x, activation=self.activation)


def implementation(device: str):
    """The ckbn operators to measure on `device`, and a line saying which they are."""
    has_kernels = ops.extension_loaded and torch._C._dispatch_has_kernel_for_dispatch_key(
        "ckbn::batch_stats", device.upper()
    )
    if has_kernels:
        return ops, f"ckbn compiled {device} kernels"
    why = (
        "the compiled extension is not loaded"
        if not ops.extension_loaded
        else (f"this build of ckbn._C has no {device} kernels")
    )
    print(f"NOTE: {why}; measuring ckbn.reference (pure PyTorch) instead", file=sys.stderr)
    return reference, "ckbn.reference (no compiled kernels for this device)"


class Timer:
    """Times callables taking a buffer index: alternating two of them, rotating buffers."""

    def __init__(self, device: str, runs: int, warmup: int, buffers: int):
        self.device, self.runs, self.warmup, self.buffers = device, runs, warmup, buffers

    def pair(self, first: Callable[[int], object], second: Callable[[int], object]) -> List[float]:
        fns = (first, second)
        # The second callable runs half a rotation behind, never on the buffer the first just read.
        buffer = lambda run, k: (run + k * (self.buffers // 2)) % self.buffers  # noqa: E731
        for r in range(self.warmup):
            for k, fn in enumerate(fns):
                fn(buffer(r, k))
        samples: List[List[float]] = [[], []]
        if self.device == "cuda":
            events = []
            for r in range(self.runs):
                for k, fn in enumerate(fns):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(buffer(r, k))
                    end.record()
                    events.append((k, start, end))
            torch.cuda.synchronize()
            for k, start, end in events:
                samples[k].append(start.elapsed_time(end))
            return [statistics.median(s) for s in samples]
        for r in range(self.runs):
            for k, fn in enumerate(fns):
                begin = time.perf_counter()
                fn(buffer(r, k))
                samples[k].append((time.perf_counter() - begin) * 1e3)
        return [min(s) for s in samples]


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "NHWC" else x.contiguous()


class Setup:
    """Inputs, parameters, statistics and prebuilt autograd graphs for one shape, layout and dtype."""

    def __init__(self, ops, shape, layout, dtype, device, buffers, compiled=False):
        self.compiled = compiled
        self.ops = ops
        channels = shape[1]
        acc = reference.stats_dtype(dtype)
        make = lambda: in_layout(torch.randn(shape, device=device, dtype=dtype), layout)  # noqa: E731
        self.x = [make() for _ in range(buffers)]
        self.dy = [make() for _ in range(buffers)]
        # AMP keeps parameters and running buffers in float32 beside half input.
        self.weight = torch.rand(channels, device=device, dtype=acc) + 0.5
        self.bias = torch.randn(channels, device=device, dtype=acc)
        self.running_mean = torch.zeros(channels, device=device, dtype=acc)
        self.running_var = torch.ones(channels, device=device, dtype=acc)
        self.batches = torch.zeros((), device=device, dtype=torch.long)
        self.count = self.x[0].numel() // channels
        self.stats = [ops.batch_stats(x, EPS) for x in self.x]
        self.leaves = [x.detach().requires_grad_() for x in self.x]
        self.weight_leaf = self.weight.detach().requires_grad_()
        self.bias_leaf = self.bias.detach().requires_grad_()
        # The graphs save their running buffers, which no later forward may update in place.
        graph_running = (self.running_mean.clone(), self.running_var.clone())
        self.graphs = [self.torch_train(leaf, graph_running) for leaf in self.leaves]

    def torch_train(self, x, running=None):
        running_mean, running_var = running or (self.running_mean, self.running_var)
        return F.batch_norm(
            x, running_mean, running_var, self.weight_leaf, self.bias_leaf, training=True, momentum=MOMENTUM, eps=EPS
        )

    def torch_backward(self, i, y=None):
        return torch.autograd.grad(
            self.graphs[i] if y is None else y,
            (self.leaves[i], self.weight_leaf, self.bias_leaf),
            self.dy[i],
            retain_graph=y is None,
        )

    def ckbn_train(self, i):
        mean, invstd = self.ops.batch_stats(self.x[i], EPS)
        y = self.ops.normalize(self.x[i], mean, invstd, self.weight, self.bias)
        self.ops.update_running_stats(
            self.running_mean, self.running_var, self.batches, mean, invstd, MOMENTUM, EPS, self.count
        )
        return y, mean, invstd

    def ckbn_backward(self, i, mean=None, invstd=None):
        if mean is None:
            mean, invstd = self.stats[i]
        return self.ops.backward(self.dy[i], self.x[i], mean, invstd, self.weight, True, [True, True, True])

    def cases(self) -> Dict[str, tuple]:
        def ckbn_eval(i):
            invstd = torch.rsqrt(self.running_var + EPS)
            return self.ops.normalize(self.x[i], self.running_mean, invstd, self.weight, self.bias)

        def ckbn_fwd_bwd(i):
            _, mean, invstd = self.ckbn_train(i)
            return self.ckbn_backward(i, mean, invstd)

        def torch_fwd_bwd(i):
            return self.torch_backward(i, self.torch_train(self.leaves[i]))

        def batch_norm(cls):
            # Parameters in the statistics dtype, as AMP keeps them beside half activations.
            return cls(self.x[0].size(1), device=self.x[0].device, dtype=self.weight.dtype)

        def module_step(block, checkpoint=None):
            def step(i):
                y = block(self.leaves[i]) if checkpoint is None else checkpoint(block, self.leaves[i])
                return torch.autograd.grad(y, (self.leaves[i], *block.parameters()), self.dy[i])

            return step

        def checkpointed_step(batch_norm_cls, checkpoint):
            return module_step(torch.nn.Sequential(batch_norm(batch_norm_cls), torch.nn.ReLU()), checkpoint)

        dims = self.x[0].dim()
        ckbn_bn = {2: ckbn.BatchNorm1d, 3: ckbn.BatchNorm1d, 4: ckbn.BatchNorm2d, 5: ckbn.BatchNorm3d}[dims]
        torch_bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[
            dims
        ]
        torch_checkpoint = lambda fn, x: torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)  # noqa: E731

        def compiled_step(module):
            # Compiled on first use (the warm-up); fullgraph: a graph break would time eager code.
            return module_step(torch.compile(module, fullgraph=True)) if self.compiled else None

        fused_cases = {}
        for act, torch_act in FUSED_ACTIVATIONS.items():
            fused = FusedBatchNorm(batch_norm(ckbn_bn), act)
            unfused = torch.nn.Sequential(batch_norm(torch_bn), torch_act(inplace=True))
            fused_cases[f"{act}-fwd+bwd"] = (
                module_step(fused),
                module_step(unfused),
                compiled_step(torch.nn.Sequential(batch_norm(torch_bn), torch_act(inplace=True))),
            )
            fused_cases[f"{act}-ckpt-step"] = (
                module_step(fused, ckbn.checkpoint),
                module_step(unfused, torch_checkpoint),
            )

        return {
            **fused_cases,
            # torch's forwards record autograd history, as in training and in a checkpoint's recompute.
            "train-fwd": (lambda i: self.ckbn_train(i), lambda i: self.torch_train(self.x[i])),
            "eval-fwd": (
                ckbn_eval,
                lambda i: F.batch_norm(
                    self.x[i], self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=EPS
                ),
            ),
            "replay-fwd": (
                lambda i: self.ops.normalize(self.x[i], *self.stats[i], self.weight, self.bias),
                lambda i: self.torch_train(self.x[i]),
            ),
            "bwd": (self.ckbn_backward, self.torch_backward),
            "fwd+bwd": (ckbn_fwd_bwd, torch_fwd_bwd, compiled_step(batch_norm(torch_bn))),
            "ckpt-step": (checkpointed_step(ckbn_bn, ckbn.checkpoint), checkpointed_step(torch_bn, torch_checkpoint)),
        }


def backward_passes(setup: "Setup") -> tuple:
    """(passes, how they were found) of ckbn's training backward on setup's shape: the CUDA
    kernels one call launches, from the profiler. An element-wise kernel after the reduction makes
    it unfused (x and dy read twice, grad_input written: 5); without one, the reduction kernel
    wrote grad_input itself (3). If the profiler shows no ckbn kernel, 3: the fewest bytes any
    backward moves, so that the bandwidth column stays a lower bound."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            setup.ckbn_backward(0)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
    except Exception as exc:  # noqa: BLE001  (a profiler that cannot run leaves the lower bound)
        return BACKWARD_PASSES["fused"], f"profiler failed ({type(exc).__name__}): lower bound"
    return passes_from_kernels(names)


def passes_from_kernels(names: Sequence[str]) -> tuple:
    """backward_passes from the names of the kernels one backward launched."""
    names = [n for n in names if "ckbn" in n and "_kernel" in n]
    if not names:
        return BACKWARD_PASSES["fused"], "no ckbn kernel seen by the profiler: lower bound"
    if any("elementwise" in n for n in names):
        return BACKWARD_PASSES["unfused"], "reduction + element-wise kernels"
    return BACKWARD_PASSES["fused"], "one fused kernel"


def copy_ms(timer: Timer, nbytes_like: torch.Tensor, buffers: int) -> float:
    """Median time of a device-to-device copy of a tensor like `nbytes_like` (moves 2x its bytes)."""
    sources = [torch.empty_like(nbytes_like) for _ in range(buffers)]
    target = torch.empty_like(nbytes_like)
    copy = lambda i: target.copy_(sources[i])  # noqa: E731
    return timer.pair(copy, copy)[0]


def buffer_count(device: str, nbytes: int) -> int:
    if device != "cuda":
        return 1
    # Enough distinct inputs that the rotation spans several times the L2 cache (50 MB on H100).
    return max(2, min(8, math.ceil(256 * 2**20 / max(1, nbytes))))


def parse_shapes(text: str) -> List[tuple]:
    return [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item]


def layouts_for(shape: Sequence[int]) -> List[str]:
    return ["NCHW", "NHWC"] if len(shape) == 4 else ["NC"]


def markdown(meta: dict, rows: List[Row], device: str) -> str:
    head = ["case", "shape", "layout", "dtype", "ckbn ms", "torch ms", "torch/ckbn"]
    if device == "cuda":
        head.append("bandwidth")
    with_compiled = any(r.compiled_ms is not None for r in rows)
    if with_compiled:
        head += ["torch.compile ms", "compiled/ckbn"]
    head += ["target", "met"]
    lines = [
        f"# ckbn op benchmark ({device})",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            r.case,
            "x".join(map(str, r.shape)),
            r.layout,
            r.dtype,
            f"{r.ckbn_ms:.3f}",
            f"{r.torch_ms:.3f}",
            f"{r.ratio:.2f}x",
        ]
        if device == "cuda":
            cells.append("" if r.bandwidth is None else f"{100 * r.bandwidth:.0f}% of {r.passes} passes")
        if with_compiled:
            cells += ["", ""] if r.compiled_ms is None else [f"{r.compiled_ms:.3f}", f"{r.compiled_ratio:.2f}x"]
        cells += [
            "; ".join(r.targets),
            ("MISSED: " + "; ".join(r.missed)) if r.missed else ("yes" if r.targets else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Row], path: str, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = [c for c in CASES if any(r.case == c for r in rows)]
    fig, axes = plt.subplots(
        len(cases), 1, figsize=(max(8, 0.35 * len(rows) / max(1, len(cases))), 3 * len(cases)), squeeze=False
    )
    for ax, case in zip(axes[:, 0], cases):
        selected = [r for r in rows if r.case == case]
        labels = [f"{'x'.join(map(str, r.shape))} {r.layout} {r.dtype}" for r in selected]
        ax.bar(
            range(len(selected)),
            [r.ratio for r in selected],
            color=["tab:red" if r.missed else "tab:blue" for r in selected],
        )
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(selected)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylabel("torch / ckbn")
        ax.set_title(f"{case} ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # whatever the file is called
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="a short list of shapes and fewer runs")
    parser.add_argument(
        "--shapes", type=parse_shapes, help="comma-separated NxCxHxW or NxC, e.g. 32x64x56x56,4096x1024"
    )
    parser.add_argument("--dtypes", help="comma-separated, e.g. float32,bfloat16")
    parser.add_argument("--layouts", help="comma-separated subset of NCHW,NHWC,NC")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--runs", type=int, help="timed runs per implementation (default: CPU 20, CUDA 30; --quick halves)"
    )
    parser.add_argument("--json", help="default bench/out/ops-<device>.json")
    parser.add_argument("--md", help="default bench/out/ops-<device>.md")
    parser.add_argument("--plot", help="PNG of ratios per shape (needs matplotlib); default bench/out/ops-<device>.png")
    parser.add_argument(
        "--compiled",
        action=argparse.BooleanOptionalAction,
        help="also time torch's modules under torch.compile (default: on for CUDA, off for CPU)",
    )
    args = parser.parse_args(argv)

    device = args.device
    compiled = args.compiled if args.compiled is not None else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("ERROR: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(args.threads)
    ops, impl = implementation(device)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)[device]
    dtypes = [getattr(torch, d) for d in (args.dtypes.split(",") if args.dtypes else DTYPES[device])]
    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}")
    runs = args.runs or ((20 if device == "cpu" else 30) // (2 if args.quick else 1))
    if device == "cpu":
        runs = max(runs, 20)  # the minimum of at least 20 runs
    paths = {ext: getattr(args, ext) or os.path.join(OUT_DIR, f"ops-{device}.{ext}") for ext in ("json", "md")}
    paths["png"] = args.plot or os.path.join(OUT_DIR, f"ops-{device}.png")
    for path in paths.values():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "implementation": impl,
        "torch": torch.__version__,
        "ckbn": ckbn.__version__,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "timing": "min of runs" if device == "cpu" else "median of CUDA-event times",
        "runs": runs,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    rows: List[Row] = []
    print(
        f"{'case':<14} {'shape':<18} {'layout':<6} {'dtype':<9} {'ckbn ms':>9} {'torch ms':>9} {'ratio':>7}"
        + (f" {'bw':>5}" if device == "cuda" else "")
        + "  target"
    )
    for shape in shapes:
        for dtype in dtypes:
            for layout in layouts_for(shape):
                if args.layouts and layout not in args.layouts.split(","):
                    continue
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                buffers = buffer_count(device, nbytes)
                timer = Timer(device, runs, warmup=3 if device == "cuda" else 2, buffers=buffers)
                setup = Setup(ops, shape, layout, dtype, device, buffers, compiled)
                copy = copy_ms(timer, setup.x[0], buffers) if device == "cuda" else None
                passes = dict(FORWARD_PASSES)
                if copy is not None:
                    bwd, how = backward_passes(setup)
                    passes.update({"bwd": bwd, "fwd+bwd": passes["train-fwd"] + bwd})
                    print(f"  backward: {bwd} passes ({how})", flush=True)
                functions = setup.cases()
                for case in cases:
                    ckbn_fn, torch_fn, *compiled = functions[case]
                    ckbn_ms, torch_ms = timer.pair(ckbn_fn, torch_fn)
                    row = Row(
                        case,
                        list(shape),
                        layout,
                        str(dtype).replace("torch.", ""),
                        ckbn_ms,
                        torch_ms,
                        torch_ms / ckbn_ms,
                        nbytes / 2**20,
                    )
                    if compiled and compiled[0] is not None:
                        ckbn_again_ms, row.compiled_ms = timer.pair(ckbn_fn, compiled[0])
                        row.compiled_ratio = row.compiled_ms / ckbn_again_ms
                    if copy is not None and case in passes:
                        row.passes = passes[case]
                        row.bandwidth = copy * passes[case] / 2 / ckbn_ms
                    checks = targets_for(device, row, args.threads)
                    row.targets = list(checks)
                    row.missed = [name for name, ok in checks.items() if not ok(row)]
                    rows.append(row)
                    print(
                        f"{case:<14} {'x'.join(map(str, shape)):<18} {layout:<6} {row.dtype:<9} {ckbn_ms:9.3f} "
                        f"{torch_ms:9.3f} {row.ratio:6.2f}x"
                        + (f" {100 * row.bandwidth:4.0f}%" if row.bandwidth is not None else "")
                        + (f"  compiled/ckbn {row.compiled_ratio:.2f}x" if row.compiled_ratio else "")
                        + ("  " + "; ".join(row.targets) if row.targets else "")
                        + ("  MISSED" if row.missed else ""),
                        flush=True,
                    )
                    with open(paths["json"], "w") as f:
                        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
                    with open(paths["md"], "w") as f:
                        f.write(markdown(meta, rows, device))
                del setup
                if device == "cuda":
                    torch.cuda.empty_cache()
    plot(rows, paths["png"], device)
    missed = [r for r in rows if r.missed]
    print(
        f"\n{len(rows)} rows; {sum(bool(r.targets) for r in rows)} with targets, {len(missed)} missed. "
        f"Written: {paths['json']}, {paths['md']}" + (f", {paths['png']}" if os.path.exists(paths["png"]) else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
