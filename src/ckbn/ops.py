"""The ckbn operators: which implementation runs them, and per operator its typed wrapper, its fake
kernel and its batching rule.

Two implementations (backends) exist:

* ``"extension"``: the compiled library ``ckbn._C`` (CPU kernels, plus CUDA kernels when it was
  built with a CUDA toolkit), whose ``TORCH_LIBRARY`` registrations define ``torch.ops.ckbn``;
* ``"reference"``: :mod:`ckbn.reference`, plain PyTorch operations.

The extension is used when it imports, unless ``CKBN_BACKEND=reference``. ``CKBN_BACKEND=extension``
(or ``CKBN_REQUIRE_EXTENSION=1``) makes a missing or broken extension an ImportError instead of a
silent fallback.

Every caller in ckbn goes through the wrappers below, so the backend is chosen once. For the
compiled operators this module also registers, per operator:

* a fake kernel, so that FakeTensor, torch.compile and ``torch.library.opcheck`` can run it;
* a batching rule, so that ``torch.vmap`` (and the torch.func transforms built on it, such as
  ``jacrev``) runs it without torch's slow per-sample fallback. A BatchNorm of each sample of a
  vmapped batch is a BatchNorm whose channels are the samples' channels side by side: the vmapped
  dimension is folded into the channel dimension, the operator runs once on ``(N, B*C, *)``, and
  its results are unfolded, as functorch does for torch's own batch_norm. The reference backend
  needs neither: its operators are torch operations.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference

OP_NAMES = (
    "batch_stats",
    "normalize",
    "update_running_stats",
    "backward",
    "backward_reduce",
    "backward_elemt",
)

# -- The backend ------------------------------------------------------------------------------------

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

BACKEND = "extension" if extension_loaded else "reference"


def implementation(name: str) -> Callable:
    """What runs the operator ``name`` on this backend: ``torch.ops.ckbn.<name>.default`` (for
    ``torch.library.opcheck``, for instance) or the reference function."""
    return getattr(torch.ops.ckbn, name).default if extension_loaded else getattr(reference, name)


_IMPL: Dict[str, Callable] = {name: implementation(name) for name in OP_NAMES}


def cuda_compiled() -> bool:
    """Whether the compiled extension carries CUDA kernels."""
    if not extension_loaded:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("ckbn::batch_stats", "CUDA")


# -- Shared by the fake kernels and the batching rules ----------------------------------------------


def _stats_like(input: Tensor) -> Tensor:
    return input.new_empty((input.size(1),), dtype=reference.stats_dtype(input.dtype))


def _like_input(input: Tensor) -> Tensor:
    return torch.empty_like(input, memory_format=reference.memory_format(input))


def _fold_input(tensor: Tensor, bdim: Optional[int], batch_size: int) -> Tensor:
    """A sample-shaped (N, C, *) tensor, batched along ``bdim``, as (N, B*C, *)."""
    if bdim is None:
        tensor = tensor.unsqueeze(0).expand(batch_size, *tensor.shape)
    else:
        tensor = tensor.movedim(bdim, 0)
    tensor = tensor.movedim(0, 1)  # (N, B, C, *): sample b's channels come b-th
    return tensor.flatten(1, 2)


def _unfold_input(tensor: Tensor, batch_size: int) -> Tensor:
    """(N, B*C, *) back to the vmapped layout (N, B, C, *), whose batch dimension is 1."""
    return tensor.unflatten(1, (batch_size, tensor.size(1) // batch_size))


def _fold_channels(vector: Optional[Tensor], bdim: Optional[int], batch_size: int) -> Optional[Tensor]:
    """A per-channel (C,) vector, batched along ``bdim`` or shared by every sample, as (B*C,)."""
    if vector is None:
        return None
    if bdim is None:
        return vector.repeat(batch_size)
    return vector.movedim(bdim, 0).flatten()


def _unfold_channels(vector: Tensor, batch_size: int) -> Tensor:
    """(B*C,) back to (B, C); an empty placeholder (a gradient not asked for) to (B, 0)."""
    if vector.numel() == 0:
        return vector.new_empty((batch_size, 0))
    return vector.unflatten(0, (batch_size, -1))


# Each fake kernel checks eps and devices as the kernels do: a meta-device argument beside a CPU or
# CUDA input sends the call to the fake, and an unchecked fake would return an uninitialised result.

# -- batch_stats ------------------------------------------------------------------------------------


def batch_stats(input: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and invstd = 1 / sqrt(biased variance + eps) of ``input`` (N, C, *), in
    float32 for reduced-precision input and in the input's dtype otherwise."""
    return _IMPL["batch_stats"](input, eps)


def _batch_stats_fake(input, eps):
    reference.check_eps("ckbn::batch_stats", eps)
    return _stats_like(input), _stats_like(input)


def _batch_stats_vmap(info, in_dims, input, eps):
    mean, invstd = batch_stats(_fold_input(input, in_dims[0], info.batch_size), eps)
    return (_unfold_channels(mean, info.batch_size), _unfold_channels(invstd, info.batch_size)), (0, 0)


# -- normalize --------------------------------------------------------------------------------------


def normalize(
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    activation: str = "identity",
    activation_param: float = 0.0,
) -> Tensor:
    """activation((input - mean) * invstd * weight + bias), per channel, in ``input``'s dtype and
    layout; ``activation`` is a name from :mod:`ckbn.activations`."""
    return _IMPL["normalize"](input, mean, invstd, weight, bias, activation, activation_param)


def _normalize_fake(input, mean, invstd, weight, bias, activation="identity", activation_param=0.0):
    reference.check_devices("ckbn::normalize", input, mean=mean, invstd=invstd, weight=weight, bias=bias)
    reference.check_activation(activation, activation_param, "ckbn::normalize")
    return _like_input(input)


def _normalize_vmap(info, in_dims, input, mean, invstd, weight, bias, *activation):
    B = info.batch_size
    output = normalize(
        _fold_input(input, in_dims[0], B),
        *(_fold_channels(vector, bdim, B) for vector, bdim in zip((mean, invstd, weight, bias), in_dims[1:5])),
        *activation,
    )
    return _unfold_input(output, B), 1


# -- update_running_stats ---------------------------------------------------------------------------


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    mean: Tensor,
    invstd: Tensor,
    momentum: Optional[float],
    eps: float,
    count: int,
) -> None:
    """In place: the running buffers move towards the batch's mean and unbiased variance (recovered
    from ``invstd``, ``eps`` and the per-channel ``count``) by ``momentum``, or by the cumulative
    average when it is None, and ``num_batches_tracked`` grows by one."""
    _IMPL["update_running_stats"](running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count)


def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count):
    reference.check_running_stats_args(running_mean, running_var, num_batches_tracked, mean, invstd, eps)
    return None


def _update_running_stats_vmap(
    info, in_dims, running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count
):
    if any(bdim is None for bdim in in_dims[:3]):
        # torch's words for its own batch_norm in this case.
        raise RuntimeError(
            "Batch norm got a batched tensor as input while the running_mean or running_var, which will be "
            "updated in place, were not batched.\nIf you are using a module and do not need eval mode, please "
            "set `track_running_stats` to be False. If you are using a prebuilt module and do not need eval "
            "mode, please see the functorch website for resources on how to patch your module to work with "
            "vmap (torch.func.replace_all_batch_norm_modules_)"
        )
    # Each sample's buffers are updated in turn, as its own num_batches_tracked may differ.
    args = (running_mean, running_var, num_batches_tracked, mean, invstd)
    for b in range(info.batch_size):
        sample = [arg if bdim is None else arg.select(bdim, b) for arg, bdim in zip(args, in_dims)]
        update_running_stats(*sample, momentum, eps, count)  # in place, through the views
    return None, None


# -- backward ---------------------------------------------------------------------------------------


def backward(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    train: bool,
    output_mask: Sequence[bool],
    bias: Optional[Tensor] = None,
    activation: str = "identity",
    activation_param: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of :func:`normalize`, the statistics' dependence on the
    input included when ``train``; a gradient ``output_mask`` does not ask for is empty. ``bias`` is
    needed only with a fused ``activation``, whose derivative is applied first."""
    return _IMPL["backward"](
        grad_output, input, mean, invstd, weight, train, output_mask, bias, activation, activation_param
    )


def _backward_fake(
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


def _backward_vmap(info, in_dims, grad_output, input, mean, invstd, weight, train, output_mask, *fused):
    B = info.batch_size
    if fused:  # bias, activation, activation_param (the fused-activation form of the op)
        fused = (_fold_channels(fused[0], in_dims[7], B),) + tuple(fused[1:])
    grad_input, grad_weight, grad_bias = backward(
        _fold_input(grad_output, in_dims[0], B),
        _fold_input(input, in_dims[1], B),
        *(_fold_channels(vector, bdim, B) for vector, bdim in zip((mean, invstd, weight), in_dims[2:5])),
        train,
        output_mask,
        *fused,
    )
    if output_mask[0]:
        grad_input, input_dim = _unfold_input(grad_input, B), 1
    else:
        grad_input, input_dim = grad_input.new_empty((B, 0)), 0
    return (grad_input, _unfold_channels(grad_weight, B), _unfold_channels(grad_bias, B)), (input_dim, 0, 0)


# -- backward_reduce and backward_elemt: the backward in two halves, for SyncBatchNorm ----------------


def backward_reduce(grad_output: Tensor, input: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    """Per channel, sum(grad_output) and sum(grad_output * (input - mean)), in the statistics dtype."""
    return _IMPL["backward_reduce"](grad_output, input, mean)


def _backward_reduce_fake(grad_output, input, mean):
    reference.check_devices("ckbn::backward_reduce", input, grad_output=grad_output, mean=mean)
    return _stats_like(input), _stats_like(input)


def _backward_reduce_vmap(info, in_dims, grad_output, input, mean):
    B = info.batch_size
    sum_dy, sum_dy_xmu = backward_reduce(
        _fold_input(grad_output, in_dims[0], B), _fold_input(input, in_dims[1], B), _fold_channels(mean, in_dims[2], B)
    )
    return (_unfold_channels(sum_dy, B), _unfold_channels(sum_dy_xmu, B)), (0, 0)


def backward_elemt(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    mean_dy: Tensor,
    mean_dy_xmu: Tensor,
) -> Tensor:
    """grad_input from the per-channel means of :func:`backward_reduce`'s sums (over every rank)."""
    return _IMPL["backward_elemt"](grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu)


def _backward_elemt_fake(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
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


def _backward_elemt_vmap(info, in_dims, grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
    B = info.batch_size
    vectors = (mean, invstd, weight, mean_dy, mean_dy_xmu)
    grad_input = backward_elemt(
        _fold_input(grad_output, in_dims[0], B),
        _fold_input(input, in_dims[1], B),
        *(_fold_channels(vector, bdim, B) for vector, bdim in zip(vectors, in_dims[2:])),
    )
    return _unfold_input(grad_input, B), 1


# -- Registration of the compiled operators' fakes and batching rules -------------------------------

FAKES: Dict[str, Callable] = {
    "batch_stats": _batch_stats_fake,
    "normalize": _normalize_fake,
    "update_running_stats": _update_running_stats_fake,
    "backward": _backward_fake,
    "backward_reduce": _backward_reduce_fake,
    "backward_elemt": _backward_elemt_fake,
}

BATCHING_RULES: Dict[str, Callable] = {
    "batch_stats": _batch_stats_vmap,
    "normalize": _normalize_vmap,
    "update_running_stats": _update_running_stats_vmap,
    "backward": _backward_vmap,
    "backward_reduce": _backward_reduce_vmap,
    "backward_elemt": _backward_elemt_vmap,
}


if extension_loaded:  # once, when ckbn first imports this module
    for _name in OP_NAMES:
        torch.library.register_fake(f"ckbn::{_name}", FAKES[_name])
        torch.library.register_vmap(f"ckbn::{_name}", BATCHING_RULES[_name])
