"""bench/gpu_smoke.py, the workload gpu_check.sh runs under compute-sanitizer, on the CPU: it must
pass here (on the CPU kernels, or on the reference when no extension is built) so that a failure on
a lent GPU is the GPU's. It runs in a subprocess because it switches torch to deterministic
algorithms with new memory filled with NaN."""

import os
import re
import subprocess
import sys

from helpers import REPO_ROOT


def test_gpu_smoke_passes_on_the_cpu():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_smoke.py"), "--device", "cpu"],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert re.search(r"^\d+ cases, 0 mismatches$", result.stdout, re.M), result.stdout[-4000:]
    assert "FAIL" not in result.stdout
