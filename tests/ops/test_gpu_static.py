"""bench/gpu_static.py: the static model of the CUDA kernels on sm_90 (occupancy, load widths,
emulated global-memory traffic, launch plans), and the check CI runs on the built sm_90 code."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
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


# A streaming loop (0x10..0x90) that issues two 128-bit loads, uses the first, issues a third and
# uses the rest; a merge loop (0xb0..0xd0) of L1-bypassing loads of partial states.
SASS_FLIGHT = """
        Function : _Z6streamPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   FADD R20, R4, R5 ;
        /*0040*/                   LDG.E.U16 R12, desc[UR4][R2.64+0x20] ;
        /*0050*/                   FADD R20, R20, R9 ;
        /*0060*/                   HADD2.F32 R13, -RZ, R12.H0_H0 ;
        /*0070*/                   IADD3 R2, P0, R2, 0x30, RZ ;
        /*0080*/                   ISETP.NE.AND P1, PT, R2, R14, PT ;
        /*0090*/               @P1 BRA 0x10 ;
        /*00a0*/                   STG.E desc[UR4][R16.64], R20 ;
        /*00b0*/                   LDG.E.STRONG.GPU R21, desc[UR4][R18.64] ;
        /*00c0*/                   FADD R22, R22, R21 ;
        /*00d0*/               @P2 BRA 0xb0 ;
        /*00e0*/                   EXIT ;
"""


def test_sass_parser_finds_the_loads_a_thread_has_in_flight():
    info = gpu_static.parse_sass(SASS_FLIGHT)["_Z6streamPf"]
    # Both 128-bit loads are issued before the first use; the 16-bit one after R4's use, while R8's
    # load is still awaited: 32 bytes at most, 2 loads.
    assert info["in_flight"] == {"bytes": 32, "loads": 2}
    assert info["loop_loads"] == {"128": 2, "16": 1}  # the merge loop is not a streaming loop


def test_in_flight_counts_loads_issued_for_the_next_iteration():
    # Software pipelined: R4 is loaded at the end of the body for the next iteration, so while R8's
    # load is awaited R4's is too: 32 bytes, which one pass over the body (16) would miss.
    body = [
        (0x10, "LDG.E.128", "R8, desc[UR4][R2.64]"),
        (0x20, "FADD", "R20, R20, R4"),
        (0x30, "FADD", "R21, R21, R8"),
        (0x40, "LDG.E.128", "R4, desc[UR4][R2.64+0x10]"),
    ]
    assert gpu_static.peak_loads_in_flight(body) == {"bytes": 32, "loads": 2}


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
        "staging": 0,
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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_planner_reads_odd_planes_flat_where_that_fills_the_gpu(tmp_path):
    """The host code's plans on an H100/H200 (132 SMs, 2 blocks each): planes with S odd (7 x 7)
    take the flat element-wise kernel when its units fill the 264 block slots, the planes kernel
    where they would not, where the planes have wider loads in flight (14 x 14 of 16-bit input: 8
    rows of 8 bytes) and where S is a multiple of the vector width. The reductions, and the choice
    of the fused backward, do not change."""
    cases = {
        # (shape, layout, dtype): the normalize kernel expected
        ((256, 2048, 7, 7), "planes", "float16"): "elementwise_flat_kernel<NormalizeElementwise, 8>",
        ((256, 2048, 7, 7), "planes", "float32"): "elementwise_flat_kernel<NormalizeElementwise, 4>",
        ((256, 256, 14, 14), "planes", "bfloat16"): "elementwise_planes_kernel<NormalizeElementwise, 4>",
        ((256, 256, 14, 14), "planes", "float32"): "elementwise_planes_kernel<NormalizeElementwise, 4>",
        ((32, 512, 7, 7), "planes", "float16"): "elementwise_planes_kernel<NormalizeElementwise, 1>",
        ((32, 2048, 7, 7), "planes", "float16"): "elementwise_flat_kernel<NormalizeElementwise, 8>",
        ((256, 64, 56, 56), "planes", "float16"): "elementwise_planes_kernel<NormalizeElementwise, 8>",
        ((256, 2048, 7, 7), "last", "float16"): "elementwise_rows_kernel<NormalizeElementwise, 8>",
    }
    spec = [{"shape": list(s), "layout": layout, "dtype": dtype} for s, layout, dtype in cases]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        "CKBN_EMULATED_SMS": str(gpu_static.H100["sms"]),
        "CKBN_EMULATED_BLOCKS_PER_SM": "2",
        "CKBN_EMULATED_L2_BYTES": str(gpu_static.H100["l2_bytes"]),
    }
    plans = gpu_static.emulate("plans", ["--shapes", str(spec_path)], env)["plans"]
    gpu_static.name_launches([plans])
    got = {}
    for p in plans:
        key = (tuple(p["shape"]), p["layout"], p["dtype"])
        got.setdefault(key, {})[p["op"]] = [gpu_static.short(launch["kernel"]) for launch in p["launches"]]
    for key, expected in cases.items():
        assert got[key]["normalize"] == [expected], (key, got[key])
        assert all("flat" not in k for k in got[key]["batch_stats"]), (key, got[key])
        # The unfused backward's grad_input takes the same kind of kernel as normalize.
        grad_input = [k for k in got[key]["backward train"] if k.startswith("elementwise_")]
        assert all(k.split("<")[0] == expected.split("<")[0] for k in grad_input), (key, got[key])
    # Whole channels in L2, one fused kernel, as before the flat kernel (whose cost would tip it).
    assert got[((32, 2048, 7, 7), "planes", "float16")]["backward train"] == ["reduce_planes_kernel<GradReduction, 1>"]


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


def _bench_script(name):
    """bench/<name>.py as a module (bench_<name>)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "names, passes",
    [
        (
            [
                "void ckbn::(anonymous namespace)::reduce_planes_kernel<GradReduction<float, float>, 4>(...)",
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
    assert _bench_script("ops").passes_from_kernels(names)[0] == passes


def plan_launch(name, blocks, block=(512, 1, 1)):
    return dict(launch(name + "(args)", 0, 0, 0, 0, grid=(blocks, 1, 1), block=block), kernel=name, grid_stride=0)


STATS = "ckbn::gpu::reduce_planes_kernel<ckbn::gpu::StatsReduction<float, float>, 4>"
NORMALIZE = "ckbn::gpu::elementwise_planes_kernel<ckbn::gpu::NormalizeElementwise<float, float>, 4>"
GRAD = "ckbn::gpu::reduce_planes_kernel<ckbn::gpu::GradReduction<float, float, (ckbn::math::Activation)0, false>, 4>"
FUSED = "ckbn::gpu::reduce_planes_kernel<ckbn::gpu::GradReduction<float, float, (ckbn::math::Activation)0, true>, 4>"
GRAD_INPUT = "ckbn::gpu::elementwise_planes_kernel<ckbn::gpu::BackwardElementwise<float, float>, 4>"


@pytest.mark.parametrize(
    "backward, in_flight, problems",
    [
        ([FUSED], 32, []),
        ([GRAD, GRAD_INPUT], 32, ["4 reads + 1 writes, target 2 + 1"]),
        ([GRAD, GRAD_INPUT, GRAD_INPUT], 32, ["3 launches, target 2", "6 reads + 2 writes"]),
        ([FUSED], 16, ["KB in flight per SM, target 32 KB"]),
    ],
)
def test_targets_judge_launches_passes_and_bytes_in_flight(backward, in_flight, problems, monkeypatch):
    monkeypatch.setattr(gpu_static, "KNOWN_TARGET_MISSES", {})
    rows = {r["family"]: r for r in target_rows(backward, in_flight)}
    assert rows["forward"]["launches"] == 2 and (rows["forward"]["reads"], rows["forward"]["writes"]) == (2, 1)
    assert rows["replay"]["launches"] == 1
    assert rows["forward"]["per_launch"][0]["in_flight_per_sm"] == in_flight * 512 * 3
    got = rows["backward"]["problems"]
    assert len(got) == len(problems) and all(any(p in g for g in got) for p in problems), got


@pytest.mark.parametrize(
    "kernel, shape, block, busy",
    [
        # S = 49, scalar loads: rows of 64 lanes over 49 elements.
        ("reduce_planes_kernel<StatsReduction<c10::Half, float>, 1>", [256, 2048, 7, 7], [64, 8, 1], 49 / 64),
        # 56 x 56 of 8-element loads: 392 vectors, 512 lanes.
        (
            "elementwise_planes_kernel<NormalizeElementwise<c10::Half, float>, 8>",
            [32, 64, 56, 56],
            [512, 1, 1],
            0.765625,
        ),
        # A channels_last tile of 32 lanes over 37 channels: two tiles, 64 lanes.
        ("reduce_rows_kernel<StatsReduction<float, float>, 1>", [16, 37, 6, 6], [32, 16, 1], 37 / 64),
        ("elementwise_rows_kernel<NormalizeElementwise<float, float>, 4>", [8, 64, 4, 4], [16, 32, 1], 1.0),
        ("elementwise_flat_kernel<NormalizeElementwise<c10::Half, float>, 8>", [256, 2048, 7, 7], [512, 1, 1], 1.0),
    ],
)
def test_busy_lanes_follow_each_kernels_walk(kernel, shape, block, busy):
    assert gpu_static.busy_lanes(kernel, shape, block) == pytest.approx(busy)


def test_known_target_misses_are_listed_apart_and_only_for_the_figures_they_explain(monkeypatch):
    monkeypatch.setattr(
        gpu_static,
        "KNOWN_TARGET_MISSES",
        {
            ("passes", "backward", "planes"): "two kernels",
            ("in_flight", "backward", "planes", "float32"): ("why", 20000),
        },
    )
    (row,) = [r for r in target_rows([GRAD, GRAD_INPUT], 16) if r["family"] == "backward"]
    assert not row["problems"] and any("two kernels" in k for k in row["known"]), row  # 24 KB >= 20000 B
    (row,) = [r for r in target_rows([GRAD, GRAD_INPUT], 8) if r["family"] == "backward"]
    assert any("in flight" in p for p in row["problems"]), row  # 12 KB: not what the entry explains


def target_rows(backward, in_flight):
    # 40 registers: 3 blocks of 512 threads per SM, and a grid of 396 fills them; at 32 bytes a
    # thread that is 48 KB per SM, at 16 bytes 24 KB. 32 x 64 x 56 x 56 float32: 25.7 MB a tensor.
    kernels = {}
    for name in {STATS, NORMALIZE, *backward}:
        kernels[name] = kernel(name=name, **gpu_static.describe(name), regs=40, in_flight_bytes=in_flight)
    spec = {"shape": [32, 64, 56, 56], "layout": "planes", "dtype": "float32"}
    plans = [
        dict(spec, op="batch_stats", launches=[plan_launch(STATS, 396)]),
        dict(spec, op="normalize", launches=[plan_launch(NORMALIZE, 396)]),
        dict(spec, op="backward train", launches=[plan_launch(name, 396) for name in backward]),
    ]
    return gpu_static.judge_targets(plans, kernels)


def test_flat_vs_planes_benchmark_rehearses_on_the_cpu(tmp_path):
    """bench/flat_vs_planes.py, which gpu_check.sh runs on a lent GPU, runs end to end on the CPU
    operators: both variants of each op and dtype, the misaligned one 2- or 4-byte aligned."""
    out = tmp_path / "flat.json"
    script = os.path.join(ROOT, "bench", "flat_vs_planes.py")
    args = [sys.executable, script, "--device", "cpu", "--runs", "1", "--shapes", "1", "--json", str(out)]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["dtype"]) for r in rows] == [
        (op, dtype) for dtype in ("float32", "float16", "bfloat16") for op in ("normalize", "grad_input")
    ]
    assert all(r["flat_ms"] > 0 and r["planes_ms"] > 0 for r in rows), rows
    x = torch.randn(4, 3, 7, 7, dtype=torch.float16)
    moved = _bench_script("flat_vs_planes").misaligned(x)
    assert torch.equal(moved, x) and moved.stride() == x.stride() and moved.data_ptr() % 16 != 0
