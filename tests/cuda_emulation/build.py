"""Builds the CUDA sources of csrc/cuda as host C++ on top of emulation.h and registers their kernels
as the CPU kernels of a `ckbn` library in this process.

Each file of csrc/cuda is copied into the build directory, rewritten only where the host has no
CUDA: its c10/cuda includes become emulation.h, `kernel<<<grid, block, shared, stream>>>(args)`
becomes `emu::launch("kernel", max_threads, grid, block, shared, stream, kernel, args)` (max_threads
is the kernel's __launch_bounds__, which the launch checks), each `__shared__` declaration becomes
a reference to storage of the running block (`emu::shared_variable`, poisoned when made), the
is-this-a-CUDA-tensor checks accept CPU tensors, and the registrations go to the CPU dispatch key.
Each .cu file becomes one .cpp translation unit, as it is one for nvcc; the rewritten headers sit
beside them, so that their "quoted" includes find the rewritten copies first. Import this module in
a process that has not loaded ckbn._C (set CKBN_BACKEND=reference), since both define the `ckbn`
library.

Variants (`load(sanitizer=..., defect=...)`), each in its own build directory:
- sanitizer "thread": ThreadSanitizer; "address": AddressSanitizer with UndefinedBehaviorSanitizer's
  alignment and bounds checks, every report fatal. Their runtime must be the first library the
  process loads: run it under `runtime_environment(sanitizer)`.
- defect: one of DEFECTS, a bug seeded into the kernels' text, for the tests that prove each check
  catches what it is for.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from typing import Optional

import torch.utils.cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")

_LAUNCH = re.compile(r"(\w+)(<[^;<>]*>)?\s*<<<(.*?)>>>\(", re.S)
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\(([^,)]+)[^)]*\)\s*(\w+)\(")
_SHARED = re.compile(r"__shared__ ([^;]*?)\s*\b(\w+)\s*(\[[^\]]*\])?;")
# CUDA's limit of threads per block, for kernels without __launch_bounds__.
_MAX_THREADS = "1024"

# Seeded defects: name -> (file of csrc/cuda, [(text, replacement), ...], what catches it). Each
# text must occur exactly once in its file.
DEFECTS = {
    # The barrier between the warps' partial states and warp 0 reading them: a data race.
    "missing-barrier": (
        "kernels.cuh",
        [("    shared[warp] = s;\n  }\n  __syncthreads();\n", "    shared[warp] = s;\n  }\n")],
        "ThreadSanitizer",
    ),
    # Scalar loads read the element after the one asked for: the last is past the tensor's end.
    "load-past-end": (
        "kernels.cuh",
        [
            (
                "reinterpret_cast<const Pack<scalar_t, VEC>*>(data + offset)",
                "reinterpret_cast<const Pack<scalar_t, VEC>*>(data + offset + (VEC == 1))",
            )
        ],
        "AddressSanitizer",
    ),
    # 128-bit loads from one element past an aligned address.
    "misaligned-vector-load": (
        "kernels.cuh",
        [
            (
                "reinterpret_cast<const Pack<scalar_t, VEC>*>(data + offset)",
                "reinterpret_cast<const Pack<scalar_t, VEC>*>(data + offset + (sizeof(scalar_t) * VEC == 16))",
            )
        ],
        "UndefinedBehaviorSanitizer",
    ),
    # Warp 0 merges 32 slots of a 32-slot array of which the block writes only one per warp (16):
    # the rest were never written, and read as zeros they would be the identity and go unseen.
    "unwritten-shared-slot": (
        "kernels.cuh",
        [
            (
                "  __shared__ State shared[kThreads / 32];\n  __shared__ bool last_flag;\n",
                "  __shared__ State shared[32];\n  __shared__ bool last_flag;\n",
            ),
            ("warp_reduce<Red>(lane < warps ? shared[lane] : Red::identity())", "warp_reduce<Red>(shared[lane])"),
        ],
        "shared-memory poisoning",
    ),
    # Warp 0 waits at a barrier inside its branch while the other warps wait at the next one.
    "divergent-barrier": (
        "kernels.cuh",
        [
            (
                "      shared[0] = s;\n    }\n  }\n  __syncthreads();\n",
                "      shared[0] = s;\n    }\n    __syncthreads();\n  }\n",
            )
        ],
        "the barrier check",
    ),
    # Lane 0 alone waits at the warp barrier, its warp's other lanes at the next block barrier:
    # neither can complete (on a GPU, a hang).
    "unpaired-barriers": (
        "kernels.cuh",
        [
            (
                "    __syncwarp();  // every lane has read `shared` before lane 0 overwrites its first entry\n"
                "    if (lane == 0) {\n",
                "    if (lane == 0) {\n      __syncwarp();\n",
            )
        ],
        "the barrier check",
    ),
    # Blocks of twice the threads the kernels are compiled for.
    "block-over-launch-bounds": (
        "launch_plan.h",
        [("  p.block_y = kThreads / p.block_x;\n", "  p.block_y = 2 * kThreads / p.block_x;\n")],
        "the launch check",
    ),
    # A block-reduction buffer of 16 states per thread: more shared memory than a block may have.
    "shared-over-limit": (
        "kernels.cuh",
        [
            (
                "  __shared__ State shared[kThreads / 32];\n  __shared__ bool last_flag;\n",
                "  __shared__ State shared[kThreads * 16];\n  __shared__ bool last_flag;\n",
            )
        ],
        "the launch check",
    ),
}

SANITIZER_FLAGS = {
    None: [],
    "thread": ["-fsanitize=thread", "-g1"],
    "address": [
        "-fsanitize=address,alignment,bounds",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
        "-g1",
    ],
}
_RUNTIME = {"thread": "libtsan.so", "address": "libasan.so"}
# nvcc contracts a * b + c into one fused multiply-add by default (-fmad=true); the host compiler
# does so only when told, and only with FMA instructions to use. For comparing rounding with a GPU's.
FMA_FLAGS = ["-mfma", "-ffp-contract=fast"]


def runtime_environment(sanitizer: Optional[str], env: Optional[dict] = None) -> dict:
    """Environment for a Python process that loads a `sanitizer` build: its runtime preloaded,
    every report fatal (TSan exits with status 66 after its first report), leaks not checked (the
    interpreter keeps its objects at exit), torch on one thread."""
    env = dict(os.environ if env is None else env)
    if sanitizer is None:
        return env
    compiler = os.environ.get("CXX", "c++")
    runtime = subprocess.run(
        [compiler, f"-print-file-name={_RUNTIME[sanitizer]}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(runtime):
        raise RuntimeError(f"{compiler} has no {_RUNTIME[sanitizer]}")
    env["LD_PRELOAD"] = runtime
    env["CKBN_EMULATED_SANITIZER"] = sanitizer  # this process's runtime, for check_kernels.py
    # torch's intra-op threads come from OpenMP, whose synchronization ThreadSanitizer cannot see:
    # one thread, so that reports are about the kernels.
    env["OMP_NUM_THREADS"] = "1"
    env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:report_signal_unsafe=0"
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


def _rewrite_launch(match: re.Match, bounds: dict) -> str:
    name, template, config = match.group(1), match.group(2) or "", match.group(3)
    # As many lines as the launch took, so that the #line directive keeps every later line's number.
    newlines = "\n" * match.group(0).count("\n")
    limit = bounds.get(name, _MAX_THREADS)
    return f'emu::launch("{name}", {limit}, {" ".join(config.split())}, {name}{template},{newlines} '


def _rewrite_shared(match: re.Match) -> str:
    type_, name, extent = match.group(1), match.group(2), match.group(3) or ""
    return (
        f"static const char {name}_emu_key = 0; "
        f"auto& {name} = ::emu::shared_variable<{type_}{extent}>(&{name}_emu_key);"
    )


def emulated_sources(defect: Optional[str] = None) -> dict[str, str]:
    """File name in the build directory -> rewritten text, for every file of csrc/cuda; with
    `defect`, one of DEFECTS seeded."""
    texts = {}
    for path in sorted(glob.glob(os.path.join(CSRC, "cuda", "*"))):
        with open(path) as f:
            texts[os.path.basename(path)] = f.read()
    if defect is not None:
        name, replacements, _ = DEFECTS[defect]
        for old, new in replacements:
            if texts[name].count(old) != 1:
                raise RuntimeError(f"defect {defect}: its text is not exactly once in {name}")
            texts[name] = texts[name].replace(old, new)
    bounds = {}
    for text in texts.values():
        bounds.update({kernel: limit for limit, kernel in _LAUNCH_BOUNDS.findall(text)})
    sources = {}
    launches = 0
    for name, text in texts.items():
        # A removed include leaves its line, so that line numbers stay those of csrc/cuda, which the
        # #line directive names in compiler messages, barrier-check errors and sanitizer reports.
        text = re.sub(r"#include <c10/cuda/[^>]*>", "", text)
        path = os.path.join(CSRC, "cuda", name)
        text = f'#include "emulation.h"\n#line 1 "{path}"\n' + text
        text, count = _LAUNCH.subn(lambda m: _rewrite_launch(m, bounds), text)
        launches += count
        text = _SHARED.sub(_rewrite_shared, text)
        if "__shared__" in text:
            raise RuntimeError(f"{name}: a __shared__ declaration the emulator cannot rewrite")
        text = text.replace(".is_cuda()", ".defined()")
        text = text.replace("TORCH_LIBRARY_IMPL(ckbn, CUDA, m)", "TORCH_LIBRARY_IMPL(ckbn, CPU, m)")
        sources[name[: -len(".cu")] + "_emulated.cpp" if name.endswith(".cu") else name] = text
    if launches == 0:
        raise RuntimeError("no kernel launches found in csrc/cuda")
    return sources


def write_sources(build_dir: str, defect: Optional[str] = None) -> list:
    """Writes the emulated sources into build_dir; returns the paths of its translation units."""
    os.makedirs(build_dir, exist_ok=True)
    units = []
    for name, text in emulated_sources(defect).items():
        path = os.path.join(build_dir, name)
        # Rewritten only when changed, so that ninja rebuilds only what changed.
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        if name.endswith(".cpp"):
            units.append(path)
    return units


def load(
    verbose: bool = False,
    sanitizer: Optional[str] = None,
    defect: Optional[str] = None,
    units: Optional[list] = None,
    fma: bool = False,
) -> None:
    """Builds (when changed) and loads the emulated kernels. `units`: the .cu files to build (their
    operators only; default all), which keeps the seeded-defect builds short. `fma`: contract
    multiply-adds as nvcc does (FMA_FLAGS)."""
    suffix = "".join(f"_{part}" for part in (sanitizer, defect, "fma" if fma else None) if part).replace("-", "_")
    build_dir = os.path.join(ROOT, "build", "cuda_emulation" + suffix)
    sources = write_sources(build_dir, defect)
    if units is not None:
        sources = [p for p in sources if os.path.basename(p)[: -len("_emulated.cpp")] + ".cu" in units]
    # The compiler must not run under the sanitizer runtime this process may have preloaded.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        sanitizer_flags = SANITIZER_FLAGS[sanitizer]
        cflags = sanitizer_flags + (FMA_FLAGS if fma else [])
        _load(suffix, sources, build_dir, cflags, sanitizer_flags[:1], verbose)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def _load(suffix: str, sources: list, build_dir: str, cflags: list, ldflags: list, verbose: bool) -> None:
    torch.utils.cpp_extension.load(
        name="ckbn_cuda_emulated" + suffix,
        sources=[os.path.join(CSRC, "ops.cpp"), *sources],
        # C++20 for std::barrier, whatever standard this torch gives extensions by default.
        extra_cflags=["-O1", "-std=c++20", f"-I{CSRC}", f"-iquote{HERE}", *cflags],
        extra_ldflags=["-lpthread", *ldflags],
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )
