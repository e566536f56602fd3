"""Builds csrc/cuda/batch_norm.cu as host C++ on top of emulation.h and registers its kernels as
the CPU kernels of a `ckbn` library in this process.

The source is rewritten only where the host has no CUDA: its c10/cuda includes become emulation.h,
`kernel<<<grid, block, shared, stream>>>(args)` becomes `emu::launch(grid, block, shared, stream,
kernel, args)`, the is-this-a-CUDA-tensor checks accept CPU tensors, and the registration goes to
the CPU dispatch key. Import this module in a process that has not loaded ckbn._C (set
CKBN_BACKEND=reference), since both define the `ckbn` library.
"""

from __future__ import annotations

import os
import re

import torch.utils.cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")

_LAUNCH = re.compile(r"(\w+(?:<[^;<>]*>)?)\s*<<<(.*?)>>>\(", re.S)


def emulated_source() -> str:
    with open(os.path.join(CSRC, "cuda", "batch_norm.cu")) as f:
        text = f.read()
    text = re.sub(r"#include <c10/cuda/[^>]*>\n", "", text)
    text = '#include "emulation.h"\n' + text
    text, launches = _LAUNCH.subn(lambda m: f"emu::launch({m.group(2)}, {m.group(1)}, ", text)
    if launches == 0:
        raise RuntimeError("no kernel launches found in batch_norm.cu")
    text = text.replace(".is_cuda()", ".defined()")
    text = text.replace("TORCH_LIBRARY_IMPL(ckbn, CUDA, m)", "TORCH_LIBRARY_IMPL(ckbn, CPU, m)")
    return text


def load(verbose: bool = False) -> None:
    build_dir = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(build_dir, exist_ok=True)
    source = os.path.join(build_dir, "batch_norm_emulated.cpp")
    text = emulated_source()
    if not os.path.exists(source) or open(source).read() != text:
        with open(source, "w") as f:
            f.write(text)
    torch.utils.cpp_extension.load(
        name="ckbn_cuda_emulated",
        sources=[os.path.join(CSRC, "ops.cpp"), source],
        # C++20 for std::barrier, whatever standard this torch gives extensions by default.
        extra_cflags=["-O1", "-std=c++20", f"-iquote{CSRC}", f"-iquote{HERE}"],
        extra_ldflags=["-lpthread"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )
