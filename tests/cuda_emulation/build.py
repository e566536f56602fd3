"""Builds the CUDA sources of csrc/cuda as host C++ on top of emulation.h and registers their kernels
as the CPU kernels of a `ckbn` library in this process.

Each file of csrc/cuda is copied into the build directory, rewritten only where the host has no
CUDA: its c10/cuda includes become emulation.h, `kernel<<<grid, block, shared, stream>>>(args)`
becomes `emu::launch(grid, block, shared, stream, kernel, args)`, the is-this-a-CUDA-tensor checks
accept CPU tensors, and the registrations go to the CPU dispatch key. Each .cu file becomes one
.cpp translation unit, as it is one for nvcc; the rewritten headers sit beside them, so that their
"quoted" includes find the rewritten copies first. Import this module in a process that has not
loaded ckbn._C (set CKBN_BACKEND=reference), since both define the `ckbn` library.
"""

from __future__ import annotations

import glob
import os
import re

import torch.utils.cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")

_LAUNCH = re.compile(r"(\w+(?:<[^;<>]*>)?)\s*<<<(.*?)>>>\(", re.S)


def emulated_sources() -> dict[str, str]:
    """File name in the build directory -> rewritten text, for every file of csrc/cuda."""
    sources = {}
    launches = 0
    for path in sorted(glob.glob(os.path.join(CSRC, "cuda", "*"))):
        with open(path) as f:
            text = f.read()
        text = re.sub(r"#include <c10/cuda/[^>]*>\n", "", text)
        text = '#include "emulation.h"\n' + text
        text, count = _LAUNCH.subn(lambda m: f"emu::launch({m.group(2)}, {m.group(1)}, ", text)
        launches += count
        text = text.replace(".is_cuda()", ".defined()")
        text = text.replace("TORCH_LIBRARY_IMPL(ckbn, CUDA, m)", "TORCH_LIBRARY_IMPL(ckbn, CPU, m)")
        name = os.path.basename(path)
        sources[name[: -len(".cu")] + "_emulated.cpp" if name.endswith(".cu") else name] = text
    if launches == 0:
        raise RuntimeError("no kernel launches found in csrc/cuda")
    return sources


def write_sources(build_dir: str) -> list:
    """Writes the emulated sources into build_dir; returns the paths of its translation units."""
    os.makedirs(build_dir, exist_ok=True)
    units = []
    for name, text in emulated_sources().items():
        path = os.path.join(build_dir, name)
        # Rewritten only when changed, so that ninja rebuilds only what changed.
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        if name.endswith(".cpp"):
            units.append(path)
    return units


def load(verbose: bool = False) -> None:
    build_dir = os.path.join(ROOT, "build", "cuda_emulation")
    units = write_sources(build_dir)
    torch.utils.cpp_extension.load(
        name="ckbn_cuda_emulated",
        sources=[os.path.join(CSRC, "ops.cpp"), *units],
        # C++20 for std::barrier, whatever standard this torch gives extensions by default.
        extra_cflags=["-O1", "-std=c++20", f"-I{CSRC}", f"-iquote{HERE}"],
        extra_ldflags=["-lpthread"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )
