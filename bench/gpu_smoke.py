"""Every ckbn operator on small inputs in both layouts, checked against ckbn.reference.

    python bench/gpu_smoke.py [--device cuda|cpu] [--no-fill]

It is the workload gpu_check.sh runs under compute-sanitizer's memcheck, racecheck, synccheck and
initcheck (small enough for them, yet reaching the scalar, vector, partial-tile, split-channel,
fused and shared-coefficient-table paths, and on an H100/H200's 132 SMs blocks that walk several
units of work in both layouts), and its test of last resort when pytest is not installed.

Outputs are checked with torch.use_deterministic_algorithms(True) and
torch.utils.deterministic.fill_uninitialized_memory, so every element a kernel forgets to write
is NaN (or the dtype's largest value) and fails the comparison; --no-fill leaves new memory
uninitialized, for initcheck to see such reads. Exits with status 1 on any mismatch, and with
status 3 when CKBN_REQUIRE_EXTENSION=1 and ckbn._C has no kernels for the device (so that a
sanitizer run over it cannot pass without running a ckbn kernel).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.utils.deterministic

from ckbn import ops, reference

EPS = 1e-5
# (shape, layout, dtype, fused activations): what each reaches is in the comment. Layouts: "planes"
# (contiguous), "last" (channels_last), "sliced" (a view that needs a copy), "offset" (contiguous,
# its storage starting one element in). Units per block are for 132 SMs at up to 4 blocks each.
CASES = [
    ((4, 3, 5, 7), "planes", torch.float32, ()),  # scalar loads, fused backward
    ((8, 16, 8, 8), "planes", torch.float16, ()),  # 16-byte loads
    ((2, 2, 256, 256), "planes", torch.float32, ()),  # channel split across blocks, staged partials
    ((8, 37, 6, 6), "last", torch.float32, ()),  # odd C: scalar, two channel tiles, the second partial
    ((8, 16, 8, 8), "last", torch.bfloat16, ()),  # vector loads, C a multiple of the tile
    ((2, 16, 128, 128), "last", torch.float32, ()),  # rows split across blocks
    ((256, 24), "planes", torch.float64, ()),  # BatchNorm1d
    ((4, 4096, 3), "planes", torch.float16, ("silu",)),  # 4096 planes: grid-stride, several a block
    ((2, 20001, 1, 2), "last", torch.float16, ("silu",)),  # 626 channel tiles: grid-stride
    ((2, 33001), "planes", torch.float32, ()),  # 2-D, 1032 channel tiles: grid-stride
    ((8, 64, 6, 6), "last", torch.float16, ("silu", "hardswish")),  # the shared coefficient table
    ((8, 64, 6, 6), "last", torch.bfloat16, ("silu", "hardswish")),
    ((16, 1, 9, 9), "planes", torch.float32, ("silu",)),  # C = 1
    ((16, 1, 9, 9), "last", torch.float16, ()),
    ((6, 5, 8, 10), "sliced", torch.float32, ("hardswish",)),
    ((8, 16, 8, 8), "offset", torch.float16, ()),  # misaligned for 16-byte loads: narrower ones
]
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-3),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
}


def in_layout(x, layout):
    if layout == "last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "sliced":
        return torch.cat([x, x], dim=-1)[..., 1::2]
    if layout == "offset":
        storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        return storage[1:].view(x.shape).copy_(x)
    return x.contiguous()


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
    for shape, layout, dtype, activations in CASES:
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
        for activation in activations:
            tag = f"{label} {activation}"
            check(
                f"{tag} normalize",
                ops.normalize(x, mean, invstd, weight, bias, activation, 0.0),
                reference.normalize(x, mean, invstd, weight, bias, activation, 0.0),
                tol,
                failures,
            )
            got = ops.backward(dy, x, mean, invstd, weight, True, [True, True, True], bias, activation, 0.0)
            want = reference.backward(dy, x, mean, invstd, weight, True, [True, True, True], bias, activation, 0.0)
            check(f"{tag} backward grad_input", got[0], want[0], tol, failures)
            check(f"{tag} backward grads", got[1:], want[1:], tol, failures, scale=count**0.5)
        print(f"{'ok  ' if not any(f.startswith(label) for f in failures) else 'FAIL'} {label}", flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--no-fill", action="store_true", help="leave new memory uninitialized (for initcheck)")
    args = parser.parse_args()
    if not args.no_fill:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
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
