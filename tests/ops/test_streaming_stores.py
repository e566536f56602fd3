"""The CPU element passes with streaming stores: the tests of normalize and backward, run again in a
process where every output is written that way (CKBN_CPU_STREAMING_BYTES=0).

By default only passes larger than the last-level cache stream their output, far larger than any
test tensor; the shapes of those tests include planes whose starts miss the stores' alignment.
"""

import os
import subprocess
import sys

import pytest

import ckbn

TESTS = os.path.dirname(os.path.abspath(__file__))
ELEMENT_PASS_TESTS = [
    "test_ops.py::test_normalize",
    "test_ops.py::test_backward",
    "test_ops.py::test_backward_reduce_and_elemt",
    "test_ops.py::test_inputs_split_into_chunks_and_threads",
    "test_fused_ops.py::test_fused_normalize_and_backward",
    "test_fused_ops.py::test_fused_inputs_split_into_chunks_and_threads",
]


@pytest.mark.skipif(ckbn.backend() != "extension", reason="streaming stores are the compiled CPU kernels'")
def test_element_passes_with_every_output_streamed():
    # The same ckbn as this process, wherever it was imported from.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(ckbn.__file__)))
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "CKBN_CPU_STREAMING_BYTES": "0", "CKBN_REQUIRE_EXTENSION": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-k",
            "cpu",
            *[os.path.join(TESTS, test) for test in ELEMENT_PASS_TESTS],
        ],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]
