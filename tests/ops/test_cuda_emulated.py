"""csrc/cuda run on the CPU: tests/cuda_emulation compiles the CUDA kernels as host C++ (a fiber
per CUDA thread) and compares every operator with ckbn.reference. On machines without a GPU this
is the only execution the kernels get, so it runs plain, on an H200-sized device, and under
ThreadSanitizer and AddressSanitizer with UndefinedBehaviorSanitizer; and each check is shown to
catch a defect seeded into the kernels."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

EMULATION = REPO_ROOT / "tests" / "cuda_emulation"
sys.path.insert(0, str(EMULATION))
import build  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler"),
]

# What a sanitizer prints when it finds something, whatever the exit status.
REPORTS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def start_check(*args, sanitizer=None, env=None):
    # A subprocess: the emulated kernels define the ckbn library, which ckbn._C defines here too,
    # and a sanitizer's runtime must be the first library its process loads.
    environment = dict(os.environ, CKBN_BACKEND="reference", **(env or {}))
    environment.pop("CKBN_REQUIRE_EXTENSION", None)
    environment = build.runtime_environment(sanitizer, environment)
    command = [sys.executable, str(EMULATION / "check_kernels.py"), *args]
    if sanitizer is not None:
        command += ["--sanitizer", sanitizer]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_check(*args, sanitizer=None, env=None):
    process = start_check(*args, sanitizer=sanitizer, env=env)
    out, err = process.communicate(timeout=3600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def output_of(result):
    return result.stdout[-6000:] + result.stderr[-6000:]


def test_cuda_kernels_match_reference_when_emulated():
    result = run_check()
    assert result.returncode == 0, output_of(result)
    assert re.search(r"^\d+ cases, 0 mismatches$", result.stdout, re.M), output_of(result)


def test_cuda_kernels_match_reference_on_an_h200_sized_device():
    # 132 SMs: blocks walk several units of work (grid-stride) in both layouts.
    result = run_check("--device", "h200")
    assert result.returncode == 0, output_of(result)


def test_sanitized_emulation_is_clean():
    # ThreadSanitizer and AddressSanitizer + UBSan side by side (each runs on one core), every
    # case in every dtype with the quick matrix (the plain run above has the full one).
    runs = {sanitizer: start_check("--quick", sanitizer=sanitizer) for sanitizer in ("thread", "address")}
    for sanitizer, process in runs.items():
        out, err = process.communicate(timeout=3600)
        assert process.returncode == 0, f"{sanitizer}:\n{out[-6000:]}{err[-6000:]}"
        assert re.search(r"^\d+ cases, 0 mismatches$", out, re.M), f"{sanitizer}:\n{out[-6000:]}"
        assert not any(report in err for report in REPORTS), f"{sanitizer}:\n{err[-6000:]}"


# (defect, sanitizer, case, what the report says): the cases take the defect's path in batch_stats.
SEEDED = [
    ("missing-barrier", "thread", "vector (8, 16, 8, 8) planes float32", r"ThreadSanitizer: data race"),
    ("load-past-end", "address", "odd-spatial (4, 3, 5, 7) planes float32", r"AddressSanitizer: heap-buffer-overflow"),
    (
        "misaligned-vector-load",
        "address",
        "vector (8, 16, 8, 8) planes float32",
        r"runtime error: .*misaligned address .* which requires 16 byte alignment",
    ),
    ("unwritten-shared-slot", None, "vector (8, 16, 8, 8) planes float32", r"FAIL vector .*\n(.|\n)*batch_stats"),
    (
        "divergent-barrier",
        None,
        "vector (8, 16, 8, 8) planes float32",
        r"met at different barriers: thread \d+ waits at __syncthreads at \S+kernels.cuh:(\d+), "
        r"thread \d+ at __syncthreads at \S+kernels.cuh:(?!\1)\d+",
    ),
    (
        "unpaired-barriers",
        None,
        "vector (8, 16, 8, 8) planes float32",
        r"barriers that cannot pair \(the block would hang\): threads 0\.\.0 __syncwarp at \S+kernels.cuh:\d+; "
        r"threads 1\.\.511 __syncthreads at \S+kernels.cuh:\d+;",
    ),
    (
        "block-over-launch-bounds",
        None,
        "vector (8, 16, 8, 8) planes float32",
        r"launch of reduce_planes_kernel: 1024 threads per block, more than its __launch_bounds__ of 512",
    ),
    (
        "shared-over-limit",
        None,
        "vector (8, 16, 8, 8) planes float32",
        r"launch of reduce_planes_kernel: \d+ bytes of shared memory \(static and dynamic\), more than 49152",
    ),
]


def test_every_defect_is_seeded_once():
    assert sorted(build.DEFECTS) == sorted(defect for defect, *_ in SEEDED)
    for defect in build.DEFECTS:
        build.emulated_sources(defect)  # raises unless each text occurs exactly once


@pytest.mark.parametrize("defect, sanitizer, case, report", SEEDED, ids=[s[0] for s in SEEDED])
def test_each_check_catches_its_seeded_defect(defect, sanitizer, case, report):
    result = run_check("--defect", defect, "--ops", "batch_stats", "-k", case, sanitizer=sanitizer)
    assert result.returncode != 0, output_of(result)
    assert re.search(report, result.stdout + result.stderr), output_of(result)
    if defect == "missing-barrier":
        # The report points at the block reduction the barrier was taken from.
        assert "block_reduce" in result.stderr, output_of(result)


def test_unwritten_shared_slot_passes_unpoisoned():
    # The same defect with shared memory zero-filled, as static storage is: the unwritten slots
    # read as the reduction's identity and the results are right, which is why it is poisoned.
    result = run_check(
        "--defect",
        "unwritten-shared-slot",
        "--ops",
        "batch_stats",
        "-k",
        "vector (8, 16, 8, 8) planes float32",
        env={"CKBN_EMULATED_SHARED_FILL": "0"},
    )
    assert result.returncode == 0, output_of(result)
