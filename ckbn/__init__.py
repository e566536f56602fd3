"""ckbn: BatchNorm whose running statistics stay exact under activation checkpointing."""

from ._backend import ACTIVE as _ACTIVE
from ._backend import cuda_compiled

__version__ = "0.1.0"


def backend() -> str:
    """The implementation behind the ckbn operators: "extension" (compiled) or "reference"."""
    return _ACTIVE


__all__ = ["backend", "cuda_compiled", "__version__"]
