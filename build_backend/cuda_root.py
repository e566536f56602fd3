"""The CUDA toolkit root, found one way for every build of ckbn: setup.py imports this module and
CMakeLists.txt runs it as a script (it prints the root, or nothing when no toolkit is found).

CUDA_HOME or CUDA_PATH when set; else what nvcc on PATH reports as TOP. nvcc on PATH may be a
wrapper script elsewhere than the toolkit, which defeats torch's own guess (the directory above
the one holding `nvcc`) and CMake's; `nvcc --dryrun` prints the real root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional


def find_cuda_home() -> Optional[str]:
    """The toolkit root, or None when neither the environment nor nvcc on PATH names one."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        dry = None
    if dry is not None:
        for line in (dry.stdout + dry.stderr).splitlines():
            # Lines look like "#$ TOP=/usr/local/cuda-13.0/bin/..".
            key, _, value = line.lstrip("#$ ").partition("=")
            if key == "TOP" and value:
                top = os.path.realpath(value.strip())
                if os.path.isfile(os.path.join(top, "bin", "nvcc")):
                    return top
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


if __name__ == "__main__":
    print(find_cuda_home() or "")
