"""Chooses the implementation behind the ckbn operators and registers their fake kernels (their
batching rules are registered by :mod:`ckbn.batching`, which imports this module).

Two backends exist:

* ``"extension"``: the compiled library ``ckbn._C`` (CPU kernels, plus CUDA kernels when it was
  built with a CUDA toolkit), reached through ``torch.ops.ckbn``;
* ``"reference"``: :mod:`ckbn.reference`, plain PyTorch operations.

The extension is used when it imports, unless ``CKBN_BACKEND=reference``. ``CKBN_BACKEND=extension``
(or ``CKBN_REQUIRE_EXTENSION=1``) makes a missing or broken extension an ImportError instead of a
silent fallback.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Optional

import torch

from . import reference

OP_NAMES = (
    "batch_stats",
    "normalize",
    "update_running_stats",
    "backward",
    "backward_reduce",
    "backward_elemt",
)

_requested = os.environ.get("CKBN_BACKEND", "auto").strip().lower() or "auto"
if _requested not in ("auto", "extension", "reference"):
    raise ImportError(f"CKBN_BACKEND must be 'auto', 'extension' or 'reference', not {_requested!r}")
_require_extension = _requested == "extension" or os.environ.get("CKBN_REQUIRE_EXTENSION", "0") not in ("", "0")


def built_against() -> Optional[str]:
    """The torch version ckbn._C was compiled against, as the build recorded it; None without a build."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info.TORCH_VERSION


def torch_mismatch(built: Optional[str], running: str) -> Optional[str]:
    """Why a library built against torch ``built`` may not load into torch ``running``; None if it may."""
    if built is None or built == running:
        return None
    return (
        f"ckbn._C was built against torch {built} but torch {running} is loaded; "
        "rebuild ckbn in this environment (`pip install .` from its source)"
    )


extension_error: Optional[BaseException] = None
extension_loaded = False
_mismatch = torch_mismatch(built_against(), str(torch.__version__))
if _requested != "reference":
    try:
        from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)

        extension_loaded = True
    except ImportError as exc:  # not built, or built against another torch
        extension_error = exc
        reason = f"{_mismatch} ({exc})" if _mismatch else str(exc)
        if _require_extension:
            raise ImportError(
                "ckbn: the compiled extension ckbn._C is required (CKBN_BACKEND=extension or "
                f"CKBN_REQUIRE_EXTENSION=1) but could not be imported: {reason}"
            ) from exc
        if _requested == "auto":
            warnings.warn(
                f"ckbn: compiled extension not available: {reason}; using the pure-PyTorch reference backend",
                RuntimeWarning,
                stacklevel=2,
            )
    if extension_loaded and _mismatch:
        # It loaded, but torch's C++ ABI is not promised across releases: a crash may come later.
        warnings.warn(f"ckbn: {_mismatch}", RuntimeWarning, stacklevel=2)
elif _require_extension:
    raise ImportError("ckbn: CKBN_BACKEND=reference contradicts CKBN_REQUIRE_EXTENSION=1")

ACTIVE = "extension" if extension_loaded else "reference"

if extension_loaded:
    ops = types.SimpleNamespace(**{name: getattr(torch.ops.ckbn, name).default for name in OP_NAMES})
else:
    ops = types.SimpleNamespace(**{name: getattr(reference, name) for name in OP_NAMES})


def cuda_compiled() -> bool:
    """Whether the compiled extension carries CUDA kernels."""
    if not extension_loaded:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("ckbn::batch_stats", "CUDA")


def _register_fakes() -> None:
    """Shape-only kernels, so that FakeTensor, torch.compile and opcheck can run the ops."""

    def _stats_like(input: torch.Tensor) -> torch.Tensor:
        return input.new_empty((input.size(1),), dtype=reference.stats_dtype(input.dtype))

    def _like_input(input: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(input, memory_format=reference.memory_format(input))

    # Each fake checks eps and devices as the kernels do: a meta-device argument beside a CPU or
    # CUDA input sends the call here, and an unchecked fake would return an uninitialised result.
    @torch.library.register_fake("ckbn::batch_stats")
    def _(input, eps):
        reference.check_eps("ckbn::batch_stats", eps)
        return _stats_like(input), _stats_like(input)

    @torch.library.register_fake("ckbn::normalize")
    def _(input, mean, invstd, weight, bias, activation="identity", activation_param=0.0):
        reference.check_devices("ckbn::normalize", input, mean=mean, invstd=invstd, weight=weight, bias=bias)
        reference.check_activation(activation, activation_param, "ckbn::normalize")
        return _like_input(input)

    @torch.library.register_fake("ckbn::update_running_stats")
    def _(running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count):
        reference.check_running_stats_args(running_mean, running_var, num_batches_tracked, mean, invstd, eps)
        return None

    @torch.library.register_fake("ckbn::backward")
    def _(
        grad_output,
        input,
        mean,
        invstd,
        weight,
        train,
        output_mask,
        bias=None,
        activation="identity",
        activation_param=0.0,
    ):
        reference.check_devices(
            "ckbn::backward", input, grad_output=grad_output, mean=mean, invstd=invstd, weight=weight, bias=bias
        )
        reference.check_activation(activation, activation_param, "ckbn::backward")
        param_dtype = weight.dtype if weight is not None else mean.dtype
        grad_input = _like_input(input) if output_mask[0] else input.new_empty((0,))
        grad_weight = mean.new_empty((input.size(1),) if output_mask[1] else (0,), dtype=param_dtype)
        grad_bias = mean.new_empty((input.size(1),) if output_mask[2] else (0,), dtype=param_dtype)
        return grad_input, grad_weight, grad_bias

    @torch.library.register_fake("ckbn::backward_reduce")
    def _(grad_output, input, mean):
        reference.check_devices("ckbn::backward_reduce", input, grad_output=grad_output, mean=mean)
        return _stats_like(input), _stats_like(input)

    @torch.library.register_fake("ckbn::backward_elemt")
    def _(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
        reference.check_devices(
            "ckbn::backward_elemt",
            input,
            grad_output=grad_output,
            mean=mean,
            invstd=invstd,
            weight=weight,
            mean_dy=mean_dy,
            mean_dy_xmu=mean_dy_xmu,
        )
        return _like_input(input)


if extension_loaded:
    _register_fakes()
    # The batching rules (batching.py) are registered by that module, which imports this one.
