"""Builds ckbn._C: the CPU kernels always, the CUDA kernels when a toolkit is found.

Environment:
  CKBN_CUDA=auto|1|0       auto (default): CUDA kernels when nvcc and a CUDA build of torch exist.
  CUDA_HOME                toolkit root; otherwise asked of nvcc on PATH.
  TORCH_CUDA_ARCH_LIST     architectures to build, e.g. "9.0"; default below when no GPU is visible.
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build).
  CKBN_DEBUG=1             -O0 -g builds.
"""

import glob
import os
import sys

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The build backend (pyproject.toml) has already made the target environment's torch importable;
# it also holds the range of torch releases ckbn supports.
sys.path.insert(0, os.path.join(ROOT, "build_backend"))
from ckbn_build import OLDEST_TORCH, SUPPORTED_TORCH  # noqa: E402
from cuda_root import find_cuda_home  # noqa: E402

try:
    import torch
except ImportError:
    sys.exit(f"ckbn: building needs torch ({SUPPORTED_TORCH}). Install torch first, then run `pip install .`")

if tuple(int(part) for part in torch.__version__.split(".")[:2]) < OLDEST_TORCH:
    sys.exit(f"ckbn: torch {torch.__version__} is too old to build against; ckbn supports {SUPPORTED_TORCH}")

if "bdist_wheel" in sys.argv or "dist_info" in sys.argv:
    # setuptools before 70.1 builds wheels only with the `wheel` package, which a fresh venv lacks.
    try:
        from setuptools.command.bdist_wheel import bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    except ImportError:
        try:
            import wheel  # noqa: F401
        except ImportError:
            sys.exit(
                f"ckbn: setuptools {setuptools.__version__} needs the `wheel` package to build a wheel:\n"
                "    pip install wheel        (or: pip install 'setuptools>=70.1')\n"
                "then run `pip install --no-build-isolation .` again."
            )

# Architectures shipped when no GPU is visible to pick from: sm_80 code, which also runs on the
# other Ampere and Ada GPUs (sm_86, sm_89: same major version), sm_90 for Hopper, and PTX for the
# newest so that later GPUs can JIT it. Each architecture adds about as much compile time as the
# host code of every .cu file; docs/install.md gives the measured costs.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def want_cuda(cuda_home):
    mode = os.environ.get("CKBN_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"ckbn: CKBN_CUDA must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return False
    torch_has_cuda = torch.version.cuda is not None
    if mode == "1":
        if cuda_home is None:
            sys.exit("ckbn: CKBN_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
        if not torch_has_cuda:
            sys.exit(f"ckbn: CKBN_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        return True
    return cuda_home is not None and torch_has_cuda


cuda_home = find_cuda_home()
with_cuda = want_cuda(cuda_home)
if with_cuda:
    # torch.utils.cpp_extension reads CUDA_HOME once, when it is first imported.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def extension():
    debug = os.environ.get("CKBN_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = list(opt)  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    # at::parallel_for is inline and runs serially unless the calling code is compiled with OpenMP;
    # GOMP's symbols then resolve to the libgomp that torch already loaded.
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc_flags = opt + ["-lineinfo"]
        return CUDAExtension(
            "ckbn._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DCKBN_WITH_CUDA"], "nvcc": nvcc_flags + ["-DCKBN_WITH_CUDA"]},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "ckbn._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


print(
    f"ckbn: building {'CPU + CUDA' if with_cuda else 'CPU'} kernels"
    + (f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})" if with_cuda else ""),
    file=sys.stderr,
)


class BuildExtensionRecordingTorch(BuildExtension):
    """Also writes ckbn/_build_info.py beside the compiled library: the torch it was built against,
    which `import ckbn` compares with the torch it is loaded into."""

    def run(self):
        super().run()
        package_dir = os.path.dirname(self.get_ext_fullpath("ckbn._C"))
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None
        with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
            f.write(
                '"""Written by setup.py when ckbn._C was built."""\n\n'
                f"TORCH_VERSION = {str(torch.__version__)!r}\n"
                f"CUDA_KERNELS = {with_cuda!r}\n"
                f"CUDA_ARCH_LIST = {arch_list!r}\n"
            )


def license_metadata():
    """BSD-3-Clause as an SPDX expression where setuptools knows them (77+), as plain text before."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "BSD-3-Clause"} if major >= 77 else {"license": "BSD-3-Clause"}


setup(
    **license_metadata(),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionRecordingTorch},
)
