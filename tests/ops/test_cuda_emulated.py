"""csrc/cuda run on the CPU: tests/cuda_emulation compiles the CUDA kernels as host C++ (a thread
per CUDA thread) and compares every operator with ckbn.reference. On machines without a GPU this
is the only execution the kernels get."""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

ROOT = str(REPO_ROOT)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_cuda_kernels_match_reference_when_emulated():
    # A subprocess: the emulated kernels define the ckbn library, which ckbn._C defines here too.
    env = dict(os.environ, CKBN_BACKEND="reference")
    env.pop("CKBN_REQUIRE_EXTENSION", None)
    result = subprocess.run(
        [sys.executable, os.path.join("tests", "cuda_emulation", "check_kernels.py"), "--dtypes", "float32,float16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
