"""Every ckbn operator on small inputs in both layouts, checked against ckbn.reference.

    python bench/gpu_smoke.py [--device cuda|cpu]

It is the workload gpu_check.sh runs under compute-sanitizer (small enough for memcheck and
racecheck, yet reaching the scalar, vector, partial-tile, split-channel and fused paths), and its
test of last resort when pytest is not installed. Exits with status 1 on any mismatch, and with
status 3 when CKBN_REQUIRE_EXTENSION=1 and ckbn._C has no kernels for the device (so that a
sanitizer run over it cannot pass without running a ckbn kernel).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ckbn import ops, reference

EPS = 1e-5
# (shape, layout, dtype): what each reaches is in the comment.
CASES = [
    ((4, 3, 5, 7), "planes", torch.float32),  # scalar loads, fused backward
    ((8, 16, 8, 8), "planes", torch.float16),  # 16-byte loads
    ((2, 2, 256, 256), "planes", torch.float32),  # channel split across blocks, staged partials
    ((8, 37, 6, 6), "last", torch.float32),  # odd C: scalar, two channel tiles, the second partial
    ((8, 16, 8, 8), "last", torch.bfloat16),  # vector loads, C a multiple of the tile
    ((2, 16, 128, 128), "last", torch.float32),  # rows split across blocks
    ((256, 24), "planes", torch.float64),  # BatchNorm1d
]
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-3),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
}


def in_layout(x, layout):
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "last" else x.contiguous()


def check(name, got, want, tol, failures, scale=1.0):
    got_t = got if isinstance(got, (tuple, list)) else (got,)
    want_t = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got_t, want_t):
        try:
            torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * scale)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")


def run(ops, device) -> list:
    failures: list = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape, layout, dtype in CASES:
        label = f"{shape} {layout} {str(dtype).replace('torch.', '')}"
        make = lambda: in_layout(  # noqa: E731
            (torch.randn(shape, generator=gen, device=device, dtype=torch.float64) * 3 + 5).to(dtype), layout
        )
        x, dy = make(), make()
        channels, count = shape[1], x.numel() // shape[1]
        acc = reference.stats_dtype(dtype)
        weight = torch.rand(channels, generator=gen, device=device, dtype=acc) + 0.5
        bias = torch.randn(channels, generator=gen, device=device, dtype=acc)
        tol, stats_tol = TOL[dtype], TOL[acc]

        mean, invstd = ops.batch_stats(x, EPS)
        check(f"{label} batch_stats", (mean, invstd), reference.batch_stats(x, EPS), stats_tol, failures)
        mean, invstd = reference.batch_stats(x, EPS)
        check(
            f"{label} normalize",
            ops.normalize(x, mean, invstd, weight, bias),
            reference.normalize(x, mean, invstd, weight, bias),
            tol,
            failures,
        )
        running = [
            torch.zeros(channels, device=device),
            torch.ones(channels, device=device),
            torch.tensor(0, device=device),
        ]
        expected = [t.clone() for t in running]
        ops.update_running_stats(*running, mean, invstd, None, EPS, count)
        reference.update_running_stats(*expected, mean, invstd, None, EPS, count)
        check(f"{label} update_running_stats", running, expected, TOL[torch.float32], failures)
        # The last mask asks for nothing: no kernel may write into the empty grad_input.
        for train, mask in ((True, [True, True, True]), (False, [True, False, False]), (False, [False, False, False])):
            got = ops.backward(dy, x, mean, invstd, weight, train, mask)
            want = reference.backward(dy, x, mean, invstd, weight, train, mask)
            check(f"{label} backward train={train} grad_input", got[0], want[0], tol, failures)
            check(f"{label} backward train={train} grads", got[1:], want[1:], tol, failures, scale=count**0.5)
        sums = ops.backward_reduce(dy, x, mean)
        check(f"{label} backward_reduce", sums, reference.backward_reduce(dy, x, mean), tol, failures, scale=count**0.5)
        means = [s / count for s in reference.backward_reduce(dy, x, mean)]
        check(
            f"{label} backward_elemt",
            ops.backward_elemt(dy, x, mean, invstd, weight, *means),
            reference.backward_elemt(dy, x, mean, invstd, weight, *means),
            tol,
            failures,
        )
        print(f"{'ok  ' if not any(f.startswith(label) for f in failures) else 'FAIL'} {label}", flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    compiled = ops.extension_loaded and torch._C._dispatch_has_kernel_for_dispatch_key(
        "ckbn::batch_stats", args.device.upper()
    )
    if not compiled:
        if os.environ.get("CKBN_REQUIRE_EXTENSION", "0") not in ("", "0"):
            print(f"ERROR: CKBN_REQUIRE_EXTENSION=1 but ckbn._C has no {args.device} kernels", file=sys.stderr)
            return 3
        print(f"NOTE: no compiled ckbn {args.device} kernels; checking ckbn.reference against itself")
    failures = run(ops if compiled else reference, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    for failure in failures:
        print(failure)
    print(f"{len(CASES)} cases, {len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
