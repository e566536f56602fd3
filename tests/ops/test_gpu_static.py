"""bench/gpu_static.py: the static model of the CUDA kernels on sm_90 (occupancy, load widths,
emulated global-memory traffic, launch plans), and the check CI runs on the built sm_90 code."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

import ckbn
from ckbn import ops

ROOT = str(REPO_ROOT)
spec = importlib.util.spec_from_file_location("gpu_static", os.path.join(ROOT, "bench", "gpu_static.py"))
gpu_static = importlib.util.module_from_spec(spec)
sys.modules["gpu_static"] = gpu_static  # its dataclasses look their module up
spec.loader.exec_module(gpu_static)


@pytest.mark.parametrize(
    "regs, shared, threads, warps",
    [
        # CUDA C++ Best Practices Guide, "Calculating Occupancy": 37 registers a thread, 128-thread
        # blocks give 75% (48 of 64 warps), 320-thread blocks 63% (40 warps); cc 7.0 has sm_90's
        # register file, allocation unit and warp limit.
        (37, 0, 128, 48),
        (37, 0, 320, 40),
        # CUDA C++ Programming Guide, launch bounds: 64 registers x 512 threads use half the file.
        (64, 0, 512, 32),
        # Threads alone: 2048 per SM.
        (16, 0, 1024, 64),
        # Shared memory alone: 100 KB blocks, two fit in 228 KB with the 1 KB reserved per block.
        (16, 100 * 1024, 64, 4),
    ],
)
def test_occupancy_formula_matches_known_cases(regs, shared, threads, warps):
    got = gpu_static.occupancy(regs, shared, threads)
    assert got["blocks_per_sm"] * ((threads + 31) // 32) == warps
    assert got["occupancy"] == warps / 64


SASS = """
        Function : _Z6kernelPf
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R6.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R6.64] ;
        /*0030*/              @!P0 BRA 0x10 ;
        /*0040*/                   STL [R1], R2 ;
        /*0050*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*0060*/                   EXIT ;
"""


def test_sass_parser_finds_widths_loops_and_local_memory():
    info = gpu_static.parse_sass(SASS)["_Z6kernelPf"]
    assert info["loads"] == {"32": 1, "128": 1, "16": 1}
    assert info["loop_loads"] == {"128": 1, "16": 1}  # 0x10..0x30 is the loop
    assert info["stores"] == {"64": 1} and info["loop_stores"] == {}
    assert info["local"] == 1


def kernel(**kw):
    fields = dict(name="k", base="elementwise_planes_kernel", op="NormalizeElementwise", dtype="float", vec=4)
    fields.update(kw)
    k = gpu_static.Kernel(**{f: fields.pop(f) for f in ("name", "base", "op", "dtype", "vec")})
    for key, value in fields.items():
        setattr(k, key, value)
    return k


@pytest.mark.parametrize(
    "fields, problem",
    [
        (dict(loop_loads={"128": 2}), None),
        (dict(loop_loads={"128": 2}, stack=8, spill_instructions=2), "local memory"),
        (dict(loop_loads={"128": 1, "32": 4}), "hot-loop loads"),
        (dict(dtype="c10::Half", vec=8, loop_loads={"16": 8}), "hot-loop loads"),
        (dict(dtype="c10::Half", vec=1, loop_loads={"16": 8}), None),
        (dict(loop_loads={}), "no global loads"),
    ],
)
def test_kernel_checks_flag_spills_and_narrow_hot_loops(fields, problem):
    k = kernel(**fields)
    gpu_static.judge_kernel(k, 512)
    assert (problem is None) == (not k.problems), k.problems
    assert problem is None or any(problem in p for p in k.problems)


def launch(name, read, write, read_distinct, write_distinct, grid=(1, 1, 1), block=(512, 1, 1)):
    zero = {"read": 0, "write": 0, "read_distinct": 0, "write_distinct": 0}
    return {
        "kernel": name,
        "grid": list(grid),
        "block": list(block),
        "shared_bytes": 0,
        "small": zero,
        "large": {"read": read, "write": write, "read_distinct": read_distinct, "write_distinct": write_distinct},
    }


REDUCE = "ckbn::reduce_planes_kernel<ckbn::GradReduction<float, float>, 4>(args)"
ELEMENT = "ckbn::elementwise_planes_kernel<ckbn::BackwardElementwise<float, float>, 4>(args)"


@pytest.mark.parametrize(
    "op, launches, ok",
    [
        ("normalize", [launch(ELEMENT, 100, 100, 100, 100)], True),
        ("normalize", [launch(ELEMENT, 200, 100, 100, 100)], False),  # reads x twice in one pass
        ("backward train", [launch(REDUCE, 400, 100, 200, 100)], True),  # fused: rereads from L2
        ("backward train", [launch(REDUCE, 200, 0, 200, 0), launch(ELEMENT, 200, 100, 200, 100)], True),
        (
            "backward train",
            [launch(REDUCE, 200, 0, 200, 0), launch(ELEMENT, 200, 100, 200, 100), launch(ELEMENT, 200, 100, 200, 100)],
            False,
        ),
        ("batch_stats", [launch(REDUCE, 200, 0, 200, 0)], False),
    ],
)
def test_traffic_check_holds_operators_to_their_design(op, launches, ok):
    case = {
        "case": "c",
        "shape": [1],
        "layout": "planes",
        "dtype": "float32",
        "op": op,
        "tensor_bytes": 100,
        "launches": launches,
    }
    (row,) = gpu_static.judge_traffic([case])
    assert (not row["problems"]) == ok, row["problems"]


@pytest.mark.parametrize(
    "blocks, grid_stride, ok",
    # grid_stride as the emulator records it: -1 no units argument, 0 units = blocks, 1 units > blocks.
    [
        (132 * 2 * 3, -1, True),
        (132 * 2 * 2 + 20, -1, False),
        (132 * 2, -1, False),
        (132 * 2, 0, True),
        (132 * 2 - 10, 1, True),
        (100, 1, False),
    ],
)
def test_plan_check_wants_full_waves(blocks, grid_stride, ok):
    k = kernel(name="ckbn::elementwise_planes_kernel<ckbn::NormalizeElementwise<float, float>, 4>", regs=64)
    plan = {
        "shape": [1],
        "layout": "planes",
        "dtype": "float32",
        "op": "normalize",
        "launches": [
            dict(launch(k.name + "(args)", 0, 0, 0, 0, grid=(blocks, 1, 1)), kernel=k.name, grid_stride=grid_stride)
        ],
    }
    (row,) = gpu_static.judge_plans([plan], {k.name: k})
    assert row["blocks_per_sm"] == 2
    assert (not row["problems"]) == ok, row


@pytest.mark.parametrize(
    "blocks, ok",
    # 40 registers: 3 blocks of 512 threads per SM, 396 slots; the design's 2 per SM: 264.
    [(132 * 3, True), (132 * 2 - 8, True), (132 * 3 + 20, False), (140, False)],
)
def test_plan_check_accepts_a_lighter_kernel_filling_its_designed_slots(blocks, ok):
    k = kernel(name="ckbn::elementwise_planes_kernel<ckbn::NormalizeElementwise<float, float>, 4>", regs=40)
    plan = {
        "shape": [1],
        "layout": "planes",
        "dtype": "float32",
        "op": "normalize",
        "launches": [dict(launch(k.name + "(args)", 0, 0, 0, 0, grid=(blocks, 1, 1)), kernel=k.name, grid_stride=0)],
    }
    (row,) = gpu_static.judge_plans([plan], {k.name: k})
    assert row["blocks_per_sm"] == 3
    assert (not row["problems"]) == ok, row


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_emulated_operators_move_no_more_than_their_design():
    """Traffic alone, from the emulator: runs wherever a C++ compiler does, CUDA build or not."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_static.py"), "--traffic-only", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert result.stdout.count("ok  ") >= 60, result.stdout  # every case ran


def _compiled_library():
    module = sys.modules.get("ckbn._C")
    return getattr(module, "__file__", None) if ops.extension_loaded else None


@pytest.mark.slow
def test_built_sm90_code_passes_the_static_model(tmp_path):
    """The CI gate: no spills, designed load widths, traffic within design, full waves."""
    if os.environ.get("CKBN_BACKEND") == "reference":
        pytest.skip("the run on the compiled backend checks its sm_90 code")
    required = os.environ.get("CKBN_REQUIRE_CUDA_BUILD", "0") not in ("", "0")
    library = _compiled_library()
    missing = None
    if library is None or not ckbn.cuda_compiled():
        missing = "ckbn._C is not loaded or has no CUDA kernels"
    elif gpu_static.tool("cuobjdump") is None or gpu_static.tool("nvdisasm") is None:
        missing = "cuobjdump/nvdisasm not found (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm wheels)"
    if missing:
        if required:
            pytest.fail(f"CKBN_REQUIRE_CUDA_BUILD=1 but {missing}")
        pytest.skip(missing)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "gpu_static.py"),
            "--check",
            "--library",
            library,
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]


def _bench_ops():
    spec = importlib.util.spec_from_file_location("bench_ops", os.path.join(ROOT, "bench", "ops.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ops"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "names, passes",
    [
        (
            [
                "void ckbn::(anonymous namespace)::reduce_planes_kernel<GradReduction<float, float>, 4>(...)",
                "void ckbn::(anonymous namespace)::finalize_kernel<GradReduction<float, float> >(...)",
                "void ckbn::(anonymous namespace)::elementwise_planes_kernel"
                "<BackwardElementwise<float, float>, 4>(...)",
            ],
            5,
        ),
        (["void ckbn::(anonymous namespace)::reduce_rows_kernel<GradReduction<float, float>, 4>(...)"], 3),
        (["void at::native::vectorized_elementwise_kernel<...>(...)"], 3),  # no ckbn kernel: the lower bound
    ],
)
def test_ops_benchmark_counts_the_backward_passes_its_kernels_make(names, passes):
    assert _bench_ops().passes_from_kernels(names)[0] == passes
