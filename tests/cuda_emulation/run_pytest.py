"""The test suite's CPU cases run on the emulated CUDA sources instead of ckbn._C's CPU kernels.

    python tests/cuda_emulation/run_pytest.py [--fma] [--device small|h200] [--defect NAME] [PYTEST ARGS...]

e.g. `python tests/cuda_emulation/run_pytest.py --fma --device h200 -q tests/ops/test_fused_ops.py
-k cpu`. The emulated build (build.py) registers csrc/cuda's operators as the `ckbn` library's CPU
kernels; ckbn.ops is pointed at them, so every test that calls ckbn's operators on CPU tensors runs
the CUDA host code and kernels: its oracles (float64 torch, gradcheck, module_db, the error
messages) judge the CUDA source the way they judge the CPU kernels. `--fma` contracts multiply-adds
as nvcc does; `--device h200` plans launches for 132 SMs and an H200's L2, as on that GPU. The
tests that need ckbn._C itself (the extension's build info, opcheck's fake kernels, torch.compile)
are not meaningful here. Not run by CI: the fused-ops file alone takes minutes.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fma", action="store_true", help="contract multiply-adds, as nvcc does")
    parser.add_argument("--device", choices=("small", "h200"), default="small", help="the emulated device")
    parser.add_argument("--defect", help="a build with one of build.DEFECTS seeded, to see the tests fail")
    args, pytest_args = parser.parse_known_args()
    # ckbn must not load ckbn._C, which defines the `ckbn` library the emulated build defines.
    os.environ["CKBN_BACKEND"] = "reference"
    os.environ.pop("CKBN_REQUIRE_EXTENSION", None)
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from check_kernels import DEVICES

    import build

    os.environ.update(DEVICES[args.device])
    build.load(fma=args.fma, defect=args.defect)

    import pytest

    import ckbn.ops

    ckbn.ops.extension_loaded = True
    for name in ckbn.ops.OP_NAMES:
        ckbn.ops._IMPL[name] = ckbn.ops.implementation(name)  # the emulated library's, now
    return pytest.main(pytest_args)


if __name__ == "__main__":
    sys.exit(main())
