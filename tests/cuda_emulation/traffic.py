"""Global-memory traffic and launch plans of the CUDA kernels, from the emulator (traffic.cpp).

    CKBN_BACKEND=reference python tests/cuda_emulation/traffic.py traffic --json OUT
    CKBN_BACKEND=reference CKBN_EMULATED_SMS=132 python tests/cuda_emulation/traffic.py plans \\
        --shapes SPEC_JSON --occupancy OCC_JSON --json OUT

`traffic` runs every operator on small shapes that take each path of csrc/cuda (vector and scalar
loads, whole and split channels, both layouts) and records, per call, each launch's kernel and the
bytes its threads read and wrote in tensor storage. `plans` runs the operators on full-size shapes
without running their kernels (the tensors are allocated, never touched) and records the launches
the host code plans, asking the occupancy of each kernel from OCC_JSON (mangled name -> resident
blocks per SM). Both write JSON; bench/gpu_static.py judges them against the design.

The emulated sources are those of build.py, compiled with -fsanitize=address in callback mode so
that every access calls traffic.cpp's counters (no sanitizer runtime is linked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.utils.cpp_extension  # noqa: E402

import build  # noqa: E402

NAME = "ckbn_cuda_traffic"
BUILD_DIR = os.path.join(build.ROOT, "build", "cuda_emulation_traffic")
COUNT_FLAGS = [
    "-fsanitize=address",
    "--param=asan-instrumentation-with-call-threshold=0",
    "--param=asan-stack=0",
    "--param=asan-globals=0",
]
RECORD = 18  # numbers per launch from take_launches

# Shapes taking each path of the kernels on the emulated 4-SM device: (label, shape, layout).
TRAFFIC_CASES = [
    ("planes vector, whole channels", (8, 16, 16, 16), "planes"),
    ("planes vector, split channels", (32, 2, 64, 64), "planes"),
    ("planes scalar (odd spatial)", (8, 6, 7, 7), "planes"),
    ("planes flat (odd spatial, a unit for every block)", (41, 67, 7, 7), "planes"),
    ("rows vector, whole channels", (32, 64, 4, 4), "last"),
    ("rows vector, split channels", (32, 8, 16, 16), "last"),
]
TRAFFIC_DTYPES = ("float32", "float16")


def load(verbose: bool = False) -> str:
    """Builds (when changed) and loads the counting emulator; returns the library's path."""
    units = [os.path.join(build.CSRC, "ops.cpp"), os.path.join(HERE, "traffic.cpp")]
    units += build.write_sources(BUILD_DIR)
    torch.utils.cpp_extension.load(
        name=NAME,
        sources=units,
        extra_cflags=["-O1", "-std=c++20", f"-I{build.CSRC}", f"-iquote{HERE}", f"-iquote{BUILD_DIR}"] + COUNT_FLAGS,
        extra_ldflags=["-lpthread"],
        build_directory=BUILD_DIR,
        is_python_module=False,
        verbose=verbose,
    )
    return library_path()


def library_path() -> str:
    return os.path.join(BUILD_DIR, NAME + ".so")


def kernel_symbols(library: str) -> dict:
    """Offset in the library -> mangled name, for every kernel-like function in it."""
    out = subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW" and "_kernel" in parts[2]:
            symbols[int(parts[0], 16)] = parts[2]
    return symbols


def take(symbols: dict) -> list:
    flat = torch.ops.ckbn_emulation.take_launches()
    launches = []
    for i in range(0, len(flat), RECORD):
        r = flat[i : i + RECORD]
        launches.append(
            {
                "kernel": symbols.get(r[0], f"?+{r[0]:#x}"),
                "grid": r[1:4],
                "block": r[4:7],
                "shared_bytes": r[7],
                "grid_stride": r[8],
                "large": {"read": r[9], "write": r[10], "read_distinct": r[11], "write_distinct": r[12]},
                "small": {"read": r[13], "write": r[14], "read_distinct": r[15], "write_distinct": r[16]},
                "staging": r[17],
            }
        )
    return launches


def make(shape, layout, dtype, fill: bool):
    x = torch.randn(shape, dtype=torch.float32).to(dtype) if fill else torch.empty(shape, dtype=dtype)
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "last" else x.contiguous()


def operator_calls(x, dy, fill: bool):
    """(label, thunk) for every operator on x."""
    ops = torch.ops.ckbn
    channels = x.size(1)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if fill:
        mean, invstd = ops.batch_stats(x, 1e-5)
    else:
        mean, invstd = torch.zeros(channels, dtype=stats_dtype), torch.ones(channels, dtype=stats_dtype)
    weight = torch.ones(channels, dtype=stats_dtype)
    bias = torch.zeros(channels, dtype=stats_dtype)
    count = x.numel() // channels
    sums = torch.ones(channels, dtype=stats_dtype)
    return [
        ("batch_stats", lambda: ops.batch_stats(x, 1e-5)),
        ("normalize", lambda: ops.normalize(x, mean, invstd, weight, bias)),
        ("backward train", lambda: ops.backward(dy, x, mean, invstd, weight, True, [True, True, True])),
        ("backward eval grad_input", lambda: ops.backward(dy, x, mean, invstd, weight, False, [True, False, False])),
        ("backward eval grad_weight", lambda: ops.backward(dy, x, mean, invstd, weight, False, [False, True, True])),
        ("backward eval nothing", lambda: ops.backward(dy, x, mean, invstd, weight, False, [False, False, False])),
        ("backward_reduce", lambda: ops.backward_reduce(dy, x, mean)),
        ("backward_elemt", lambda: ops.backward_elemt(dy, x, mean, invstd, weight, sums, sums)),
        (
            "update_running_stats",
            lambda: ops.update_running_stats(
                torch.zeros(channels), torch.ones(channels), torch.tensor(0), mean, invstd, 0.1, 1e-5, count
            ),
        ),
    ]


def measure_traffic(symbols: dict) -> list:
    rows = []
    for label, shape, layout in TRAFFIC_CASES:
        for dtype_name in TRAFFIC_DTYPES:
            dtype = getattr(torch, dtype_name)
            x = make(shape, layout, dtype, fill=True)
            dy = make(shape, layout, dtype, fill=True)
            tensor_bytes = x.numel() * x.element_size()
            for op, call in operator_calls(x, dy, fill=True):
                torch.ops.ckbn_emulation.configure(True, False, tensor_bytes)
                call()
                rows.append(
                    {
                        "case": label,
                        "shape": list(shape),
                        "layout": layout,
                        "dtype": dtype_name,
                        "op": op,
                        "tensor_bytes": tensor_bytes,
                        "launches": take(symbols),
                    }
                )
                torch.ops.ckbn_emulation.configure(False, False, tensor_bytes)
    return rows


def record_plans(symbols: dict, spec: list, occupancy: dict) -> list:
    by_name = {name: offset for offset, name in symbols.items()}
    known = [(by_name[name], blocks) for name, blocks in occupancy.items() if name in by_name]
    torch.ops.ckbn_emulation.set_occupancy([k for k, _ in known], [b for _, b in known])
    rows = []
    for item in spec:
        dtype = getattr(torch, item["dtype"])
        x = make(tuple(item["shape"]), item["layout"], dtype, fill=False)
        dy = make(tuple(item["shape"]), item["layout"], dtype, fill=False)
        calls = operator_calls(x, dy, fill=False)
        for op, call in calls[:3] + calls[-1:]:  # the training ops
            torch.ops.ckbn_emulation.configure(False, True, 1)
            call()
            rows.append(dict(item, op=op, launches=take(symbols)))
        torch.ops.ckbn_emulation.configure(False, False, 1)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("traffic", "plans"))
    parser.add_argument("--json", required=True)
    parser.add_argument("--shapes", help="plans: JSON list of {shape, layout (planes|last), dtype}")
    parser.add_argument("--occupancy", help="plans: JSON object, mangled kernel name -> blocks per SM")
    args = parser.parse_args()
    if os.environ.get("CKBN_BACKEND") != "reference":
        print("set CKBN_BACKEND=reference: the emulated kernels define the ckbn library themselves")
        return 2
    library = load()
    symbols = kernel_symbols(library)
    if args.mode == "traffic":
        result = {"cases": measure_traffic(symbols)}
    else:
        with open(args.shapes) as f:
            spec = json.load(f)
        occupancy = {}
        if args.occupancy:
            with open(args.occupancy) as f:
                occupancy = json.load(f)
        result = {"plans": record_plans(symbols, spec, occupancy)}
    with open(args.json, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
