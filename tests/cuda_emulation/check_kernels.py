"""Runs the emulated CUDA kernels (see build.py) against ckbn.reference on CPU tensors.

    CKBN_BACKEND=reference python tests/cuda_emulation/check_kernels.py [-k SUBSTRING] [--dtypes float32,...]
        [--device small|h200] [--ops batch_stats,...] [--sanitizer thread|address] [--defect NAME]

The shapes are chosen so that every path of csrc/cuda runs: scalar and vector loads, channel
tiles that C does not fill, channels split across blocks (batch and spatial splits, staged partial
results) and whole channels in one block (the fused backward), 2-D to 5-D input, storage offsets,
empty input, and each fused activation. They run on a small emulated device (4 SMs, 2 blocks
each); `--device h200` runs H200_CASES on the SM count of an H100/H200 instead, where blocks take
several units of work (grid-stride) in both layouts. Exits with status 1 if any case differs
from the reference or an operator fails.

`--sanitizer` runs a sanitized build (see build.py), restarting itself with the sanitizer's runtime
preloaded (build.runtime_environment). `--defect` runs a build with one of build.DEFECTS seeded, of only the
operators it needs, for the tests that prove each check catches its defect.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ckbn import reference as ref  # noqa: E402

import build  # noqa: E402

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# (name, shape, layout): layout is "planes" (contiguous), "last" (channels innermost), "offset"
# (contiguous, storage starting one element in), "strided" (needs a copy)
CASES = [
    ("odd-spatial", (4, 3, 5, 7), "planes"),
    ("odd-channels", (4, 3, 5, 7), "last"),
    ("vector", (8, 16, 8, 8), "planes"),
    ("vector", (8, 16, 8, 8), "last"),
    ("partial-tile", (16, 20, 6, 6), "last"),
    ("partial-tile", (4, 100, 3, 3), "last"),
    ("two-tiles", (8, 37, 5, 5), "last"),
    ("split-batch", (32, 2, 64, 64), "planes"),
    ("split-spatial", (3, 2, 181, 181), "planes"),
    ("split-rows", (8, 8, 64, 64), "last"),
    ("batchnorm1d", (64, 10), "planes"),
    ("unit-spatial", (8, 24, 1, 1), "planes"),
    ("narrow-spatial", (16, 6, 3), "planes"),
    ("batchnorm1d-split", (5000, 16), "planes"),
    ("ncl", (4, 6, 10), "planes"),
    ("ncl", (4, 6, 10), "last"),
    ("ncdhw", (2, 3, 4, 5, 6), "planes"),
    ("ncdhw", (2, 3, 4, 5, 6), "last"),
    ("offset", (8, 16, 8, 8), "offset"),
    ("offset", (8, 16, 8, 8), "offset-last"),
    ("strided", (6, 5, 8, 8), "strided"),
    ("spatial-4", (4, 3, 6, 6), "planes"),  # 16-bit: 8-byte loads
    ("spatial-2", (4, 3, 5, 6), "planes"),  # 16-bit: 4-byte loads; 32-bit: 8-byte loads
    ("wide-few-rows", (2, 256, 3, 3), "last"),  # row splits of several channel tiles, finalized
    # Odd S of at least 8 units of the flat element-wise kernel (8 blocks resident): several groups
    # a unit, more units than blocks, a partial last unit and a tail of fewer than VEC elements;
    # S = 49 and C = 67 (a unit spans hundreds of planes), then C = 3 (channels wrap in a unit).
    ("flat", (41, 67, 7, 7), "planes"),
    ("flat-wrap", (15, 3, 55, 57), "planes"),
    ("empty-batch", (0, 3, 4, 4), "planes"),
    ("empty-spatial", (4, 3, 0, 5), "last"),
]
# Dtypes each case runs in: all for small cases, the two extremes for the large ones.
LARGE = {"split-batch", "split-spatial", "split-rows", "batchnorm1d-split"}
# On 132 SMs with 2 resident blocks each, 264 blocks take 1500 channels of planes (6 each), 266
# channels_last tiles split in 6 row ranges (7 units a block, then finalized), and 266 tiles of
# 2-D input whole (2 units for some blocks; the backward fused).
H200_CASES = [
    ("h200-planes", (3, 1500, 5), "planes"),
    ("h200-rows-split", (3, 8511, 1, 2), "last"),
    ("h200-rows", (2, 8511), "planes"),
]
DEVICES = {
    "small": {},
    "h200": {"CKBN_EMULATED_SMS": "132", "CKBN_EMULATED_BLOCKS_PER_SM": "2", "CKBN_EMULATED_L2_BYTES": str(50 << 20)},
}
OPS = ("batch_stats", "normalize", "backward", "backward_reduce", "backward_elemt", "update_running_stats")


def make_input(shape, layout, dtype, gen):
    # Far from zero, so that a naive sum-of-squares variance would visibly fail.
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 5).to(dtype)
    if layout in ("last", "offset-last"):
        values = values.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout.startswith("offset"):
        storage = torch.empty(values.numel() + 1, dtype=dtype)
        shifted = storage[1:].view(values.movedim(1, -1).shape if layout == "offset-last" else shape)
        if layout == "offset-last":
            shifted.copy_(values.movedim(1, -1))
            shifted = shifted.movedim(-1, 1)
        else:
            shifted.copy_(values)
        values = shifted
    if layout == "strided":
        values = torch.cat([values, values], dim=-1)[..., ::2]
    return values


def tolerance(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
    }[dtype]


STATS_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10)}
# Fused activations (name, param), run with parameters of input's dtype: a kink, a slope, an exp and
# a piecewise polynomial (relu6 is relu's kind, and the emulator is slow).
FUSED = [("relu", 0.0), ("leaky_relu", -0.3), ("silu", 0.0), ("hardswish", 0.0)]


def compare(name, got, want, tol, failures):
    try:
        if isinstance(got, torch.Tensor):
            torch.testing.assert_close(got, want, **tol)
            if got.numel() > 1 and got.dim() > 1 and got.stride() != want.stride():
                raise AssertionError(f"strides {got.stride()} != reference {want.stride()}")
        else:
            for g, w in zip(got, want):
                compare(name, g, w, tol, failures)
            return
    except AssertionError as exc:
        failures.append(f"{name}: {exc}")


# The backward's (train, output mask) variants: all, or a few that take each kernel (`--quick`).
MASKS = (
    (True, [True, True, True]),
    (True, [True, False, False]),
    (False, [True, True, True]),
    (False, [True, False, False]),
    (False, [False, True, True]),
    (True, [False] * 3),
    (False, [False] * 3),
)
QUICK_MASKS = ((True, [True, True, True]), (False, [True, False, False]), (False, [False, True, True]))


def run_case(label, shape, layout, dtype, gen, failures, wanted=OPS, fused=FUSED, quick=False):
    ops = torch.ops.ckbn
    acc = ref.stats_dtype(dtype)
    stats_tol = STATS_TOL.get(dtype, dict(rtol=1e-5, atol=1e-5))
    out_tol = tolerance(dtype)
    x = make_input(shape, layout, dtype, gen)
    eps = 1e-5
    compare(f"{label} batch_stats", ops.batch_stats(x, eps), ref.batch_stats(x, eps), stats_tol, failures)
    if wanted == ("batch_stats",):
        return
    mean, invstd = ref.batch_stats(x, eps)
    channels = shape[1]
    dy = make_input(shape, "planes", dtype, gen)  # grad_output in a different layout than last input
    # Parameters in the input's dtype, the accumulation dtype (mixed precision) and none; --quick
    # leaves out the first where it differs from the second.
    for param_dtype in (acc, None) if quick else (dtype, acc, None):
        weight = bias = None
        if param_dtype is not None:
            weight = torch.rand(channels, generator=gen, dtype=torch.float64).add(0.5).to(param_dtype)
            bias = torch.randn(channels, generator=gen, dtype=torch.float64).to(param_dtype)
        tag = f"{label} params={param_dtype}"
        compare(
            f"{tag} normalize",
            ops.normalize(x, mean, invstd, weight, bias),
            ref.normalize(x, mean, invstd, weight, bias),
            out_tol,
            failures,
        )
        for train, mask in QUICK_MASKS if quick else MASKS:
            got = ops.backward(dy, x, mean, invstd, weight, train, mask)
            want = ref.backward(dy, x, mean, invstd, weight, train, mask)
            # grad_weight and grad_bias are sums over the batch: compare relative to their size.
            compare(f"{tag} backward train={train} mask={mask} grad_input", got[0], want[0], out_tol, failures)
            sums_tol = dict(rtol=out_tol["rtol"], atol=out_tol["atol"] * max(1, x.numel() // channels) ** 0.5)
            compare(f"{tag} backward train={train} mask={mask} grads", got[1:], want[1:], sums_tol, failures)
            if got[1].dtype != want[1].dtype or got[2].dtype != want[2].dtype:
                failures.append(f"{tag} backward dtypes {got[1].dtype}, {got[2].dtype} != {want[1].dtype}")
    run_fused(label, x, dy, mean, invstd, gen, out_tol, failures, fused, QUICK_MASKS[:1] if quick else QUICK_MASKS)
    sums = ref.backward_reduce(dy, x, mean)
    sums_tol = dict(
        rtol=1e-4 if dtype != torch.float64 else 1e-10,
        atol=(1e-4 if dtype != torch.float64 else 1e-10) * max(1, x.numel() // channels),
    )
    compare(f"{label} backward_reduce", ops.backward_reduce(dy, x, mean), sums, sums_tol, failures)
    count = max(1, x.numel() // channels)
    mean_dy, mean_dy_xmu = sums[0] / count, sums[1] / count
    weight = torch.rand(channels, generator=gen, dtype=torch.float64).add(0.5).to(dtype)
    compare(
        f"{label} backward_elemt",
        ops.backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu),
        ref.backward_elemt(dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu),
        out_tol,
        failures,
    )


def run_fused(label, x, dy, mean, invstd, gen, out_tol, failures, fused=FUSED, masks=QUICK_MASKS):
    """normalize and backward with each fused activation; the bias spreads z over every piece."""
    ops = torch.ops.ckbn
    channels = x.size(1)
    weight = torch.rand(channels, generator=gen, dtype=torch.float64).add(0.5).mul(2).to(x.dtype)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64).mul(2).to(x.dtype)
    sums_tol = dict(rtol=out_tol["rtol"], atol=out_tol["atol"] * max(1, x.numel() // channels) ** 0.5)
    for activation, param in fused:
        tag = f"{label} {activation}"
        compare(
            f"{tag} normalize",
            ops.normalize(x, mean, invstd, weight, bias, activation, param),
            ref.normalize(x, mean, invstd, weight, bias, activation, param),
            out_tol,
            failures,
        )
        for train, mask in masks:
            got = ops.backward(dy, x, mean, invstd, weight, train, mask, bias, activation, param)
            want = ref.backward(dy, x, mean, invstd, weight, train, mask, bias, activation, param)
            compare(f"{tag} backward train={train} mask={mask} grad_input", got[0], want[0], out_tol, failures)
            compare(f"{tag} backward train={train} mask={mask} grads", got[1:], want[1:], sums_tol, failures)


def run_running_stats(gen, failures):
    ops = torch.ops.ckbn
    for stats_dtype in (torch.float32, torch.float64):
        for buffer_dtype in DTYPES:
            for momentum in (0.1, None):
                channels = 700  # more than one block's threads: the channel loop runs twice
                mean = torch.randn(channels, generator=gen, dtype=stats_dtype)
                invstd = torch.rand(channels, generator=gen, dtype=stats_dtype).add(0.5)
                start_mean = torch.randn(channels, generator=gen, dtype=torch.float64).to(buffer_dtype)
                start_var = torch.rand(channels, generator=gen, dtype=torch.float64).to(buffer_dtype)
                buffers = [start_mean.clone(), start_var.clone(), torch.tensor(4)]
                expected = [start_mean.clone(), start_var.clone(), torch.tensor(4)]
                ops.update_running_stats(*buffers, mean, invstd, momentum, 1e-5, 37)
                ref.update_running_stats(*expected, mean, invstd, momentum, 1e-5, 37)
                tol = tolerance(buffer_dtype if buffer_dtype != torch.float64 else stats_dtype)
                compare(
                    f"update_running_stats {stats_dtype} buffers={buffer_dtype} momentum={momentum}",
                    buffers,
                    expected,
                    tol,
                    failures,
                )
    # Strided running buffers are updated in place: mean 1 and biased variance 1 over 2 elements
    # (unbiased 2), averaged with zeros at momentum 0.5.
    running = torch.zeros(5, 2)
    ops.update_running_stats(running[:, 0], running[:, 1], torch.tensor(0), torch.ones(5), torch.ones(5), 0.5, 0.0, 2)
    compare("update_running_stats strided", running, torch.tensor([[0.5, 1.0]] * 5), dict(rtol=0, atol=1e-6), failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only cases whose label contains this")
    parser.add_argument("--dtypes", help="comma-separated subset of float64,float32,float16,bfloat16")
    parser.add_argument("--device", choices=tuple(DEVICES), default="small", help="the emulated device and its cases")
    parser.add_argument("--ops", default=",".join(OPS), help="batch_stats alone, or all (the default)")
    parser.add_argument("--sanitizer", choices=("thread", "address"), help="run a sanitized build")
    parser.add_argument("--defect", choices=sorted(build.DEFECTS), help="run a build with this defect seeded")
    parser.add_argument(
        "--quick", action="store_true", help="fewer parameter dtypes and backward masks per case (for the sanitizers)"
    )
    args = parser.parse_args()
    if os.environ.get("CKBN_BACKEND") != "reference":
        print("set CKBN_BACKEND=reference: the emulated kernels define the ckbn library themselves")
        return 2
    if args.sanitizer and os.environ.get("CKBN_EMULATED_SANITIZER") != args.sanitizer:
        # The sanitizer's runtime must be loaded before anything else: start again under it.
        env = build.runtime_environment(args.sanitizer)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    wanted = tuple(args.ops.split(","))
    if wanted not in (("batch_stats",), OPS):
        parser.error("--ops: batch_stats, or all of " + ",".join(OPS))
    # Read by the first launch plan of the process (the device's SM count is cached).
    os.environ.update(DEVICES[args.device])
    # A defect build holds only the operators batch_stats needs.
    build.load(sanitizer=args.sanitizer, defect=args.defect, units=["stats.cu"] if args.defect else None)
    gen = torch.Generator().manual_seed(0)
    failures: list[str] = []
    runs = 0
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else DTYPES
    quick = args.quick
    if args.device == "h200":
        # 264 blocks a launch: float32 and bfloat16 (its bit tricks), the quick matrix.
        dtypes = dtypes if args.dtypes else [torch.float32, torch.bfloat16]
        quick = True
    cases = H200_CASES if args.device == "h200" else CASES
    # On the large device, the fused activation whose coefficient table is shared (SiLU) only.
    fused = [("silu", 0.0)] if args.device == "h200" else FUSED
    for name, shape, layout in cases:
        for dtype in [d for d in (DTYPES[:2] if name in LARGE else DTYPES) if d in dtypes]:
            label = f"{name} {shape} {layout} {str(dtype).replace('torch.', '')}"
            if args.k not in label:
                continue
            start = time.time()
            before = len(failures)
            try:
                run_case(label, shape, layout, dtype, gen, failures, wanted, fused, quick)
            except RuntimeError as exc:  # an operator refused: a launch check, a barrier mismatch
                failures.append(f"{label}: {exc}")
            runs += 1
            print(f"{'ok  ' if len(failures) == before else 'FAIL'} {label} ({time.time() - start:.1f} s)", flush=True)
    if "update_running_stats" in wanted and args.device == "small" and ("running" in args.k or not args.k):
        before = len(failures)
        run_running_stats(gen, failures)
        runs += 1
        print(f"{'ok  ' if len(failures) == before else 'FAIL'} update_running_stats", flush=True)
    for failure in failures:
        print(failure)
    print(f"{runs} cases, {len(failures)} mismatches")
    if runs == 0:
        print("no case ran")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
