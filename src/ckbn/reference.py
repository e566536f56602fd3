"""Every ckbn operator written with plain PyTorch operations.

This module has two jobs: it is the backend when the compiled extension is absent (or when
``CKBN_BACKEND=reference``), and it is the oracle the compiled kernels are tested against. It is
written for clarity, not speed: inputs are upcast to the statistics dtype and reductions are
torch's own. Signatures and results match the ``torch.ops.ckbn`` schemas in ``csrc/ops.cpp``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import activations

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel statistics for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_input(input: Tensor, op: str) -> None:
    if input.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(
            f"{op}: expected input of a floating dtype (float64, float32, float16 or bfloat16), but got {input.dtype}"
        )
    if input.dim() < 2:
        raise RuntimeError(f"{op}: expected input with at least 2 dimensions (N, C, *), but got {input.dim()}D input")
    if input.size(1) == 0:
        raise RuntimeError(f"{op}: expected input with at least one channel, but got shape {tuple(input.shape)}")


def check_devices(op: str, input: Tensor, anchor: str = "input", **tensors: Optional[Tensor]) -> None:
    """Every tensor given (None: absent) on the device of ``input``, called ``anchor`` in the message.

    The fake kernels check this too: a meta-device argument sends a call to them, whatever the
    input's device.
    """
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(
                f"{op}: expected {name} to be on the same device as {anchor} ({input.device}), but got {tensor.device}"
            )


def check_eps(op: str, eps: float) -> None:
    """eps enters sqrt(var + eps): a negative (or NaN) one gives NaN statistics."""
    if not eps >= 0.0:
        raise RuntimeError(f"{op}: expected eps to be non-negative, but got {eps}")


def _check_vector(vec: Tensor, name: str, input: Tensor, dtypes: Sequence[torch.dtype], op: str) -> None:
    check_devices(op, input, **{name: vec})
    if vec.dim() != 1 or vec.numel() != input.size(1):
        raise RuntimeError(f"{op}: {name} should contain {input.size(1)} elements not {vec.numel()}")
    if vec.dtype not in dtypes:
        raise RuntimeError(
            f"{op}: expected {name} of dtype {' or '.join(str(d) for d in dict.fromkeys(dtypes))}, but got {vec.dtype}"
        )


def _check_stats(input: Tensor, op: str, **vectors: Tensor) -> None:
    for name, vec in vectors.items():
        _check_vector(vec, name, input, (stats_dtype(input.dtype),), op)


def _check_affine(input: Tensor, op: str, **params: Optional[Tensor]) -> None:
    for name, param in params.items():
        if param is not None:
            _check_vector(param, name, input, (input.dtype, stats_dtype(input.dtype)), op)


def _check_grad_output(grad_output: Tensor, input: Tensor, op: str) -> None:
    check_devices(op, input, grad_output=grad_output)
    if grad_output.shape != input.shape:
        raise RuntimeError(
            f"{op}: expected grad_output of shape {list(input.shape)}, but got {list(grad_output.shape)}"
        )
    if grad_output.dtype != input.dtype:
        raise RuntimeError(f"{op}: expected grad_output of dtype {input.dtype}, but got {grad_output.dtype}")


def check_activation(activation: str, activation_param: float, op: str) -> None:
    """The checks of csrc/ops.cpp's parse_activation, with its messages."""
    if activation not in activations.ACTIVATIONS:
        names = ", ".join(f"'{name}'" for name in activations.ACTIVATIONS)
        raise RuntimeError(f"{op}: activation must be one of {names}, but got '{activation}'")
    if activation == "leaky_relu":
        if not math.isfinite(activation_param):
            raise RuntimeError(
                f"{op}: leaky_relu's negative slope (activation_param) must be a finite number, "
                f"but got {activation_param}"
            )
    elif activation_param != 0.0:
        raise RuntimeError(
            f"{op}: activation '{activation}' takes no parameter, but got activation_param={activation_param}"
        )


def _channel_shape(input: Tensor) -> Tuple[int, ...]:
    """Shape that broadcasts a (C,) vector against input: (1, C, 1, ...)."""
    return (1, input.size(1)) + (1,) * (input.dim() - 2)


def _reduce_dims(input: Tensor) -> Tuple[int, ...]:
    return (0,) + tuple(range(2, input.dim()))


def _per_channel(vec: Optional[Tensor], input: Tensor, default: float) -> Tensor:
    acc = stats_dtype(input.dtype)
    if vec is None:
        return torch.full(_channel_shape(input), default, dtype=acc, device=input.device)
    return vec.to(acc).reshape(_channel_shape(input))


def memory_format(input: Tensor) -> torch.memory_format:
    """The memory format the kernels give their outputs: channels_last stays channels_last.

    Every empty tensor is contiguous; only its strides tell a channels_last empty batch apart.
    """
    if torch._C._functorch.is_batchedtensor(input):
        return torch.contiguous_format  # vmap cannot query another format (and lays samples out itself)
    for dim, channels_last in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if input.dim() == dim and input.is_contiguous(memory_format=channels_last):
            if input.numel() == 0 or not input.is_contiguous():
                return channels_last
    return torch.contiguous_format


def batch_stats(input: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    _check_input(input, "ckbn::batch_stats")
    check_eps("ckbn::batch_stats", eps)
    x = input.to(stats_dtype(input.dtype))
    if input.numel() == 0:
        zeros = x.new_zeros(input.size(1))
        return zeros, torch.rsqrt(zeros + eps)
    var, mean = torch.var_mean(x, dim=_reduce_dims(input), correction=0)
    return mean, torch.rsqrt(var + eps)


def _pre_activation(
    input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tensor:
    """(input - mean) * invstd * weight + bias in the statistics dtype."""
    scale = invstd.reshape(_channel_shape(input)) * _per_channel(weight, input, 1.0)
    return (input.to(mean.dtype) - mean.reshape(_channel_shape(input))) * scale + _per_channel(bias, input, 0.0)


def normalize(
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    activation: str = "identity",
    activation_param: float = 0.0,
) -> Tensor:
    op = "ckbn::normalize"
    _check_input(input, op)
    _check_stats(input, op, mean=mean, invstd=invstd)
    _check_affine(input, op, weight=weight, bias=bias)
    check_activation(activation, activation_param, op)
    out = activations.apply(_pre_activation(input, mean, invstd, weight, bias), activation, activation_param)
    return out.to(input.dtype).contiguous(memory_format=memory_format(input))


def check_running_stats_args(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, mean: Tensor, invstd: Tensor, eps: float
) -> None:
    """The checks of ckbn::update_running_stats that its fake kernel shares: eps, and one device."""
    op = "ckbn::update_running_stats"
    check_eps(op, eps)
    check_devices(
        op,
        mean,
        "mean",
        running_mean=running_mean,
        running_var=running_var,
        num_batches_tracked=num_batches_tracked,
        invstd=invstd,
    )


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
    op = "ckbn::update_running_stats"
    if count < 2:
        raise RuntimeError(f"{op}: expected count of at least 2, but got {count}")
    check_running_stats_args(running_mean, running_var, num_batches_tracked, mean, invstd, eps)
    if running_mean.shape != mean.shape or running_var.shape != mean.shape or invstd.shape != mean.shape:
        raise RuntimeError(f"{op}: running_mean, running_var, mean and invstd should all have shape {list(mean.shape)}")
    acc = mean.dtype
    if momentum is None:
        factor = 1.0 / (num_batches_tracked + 1).to(acc)
    else:
        factor = torch.tensor(momentum, dtype=acc, device=mean.device)
    biased_var = (1.0 / (invstd * invstd) - eps).clamp_min(0)
    unbiased_var = biased_var * (count / (count - 1))
    # The count last: a write that fails (under vmap, a batched update of unbatched buffers) comes first.
    running_mean.copy_((1 - factor) * running_mean.to(acc) + factor * mean)
    running_var.copy_((1 - factor) * running_var.to(acc) + factor * unbiased_var)
    num_batches_tracked.add_(1)


def backward_reduce(grad_output: Tensor, input: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    op = "ckbn::backward_reduce"
    _check_input(input, op)
    _check_grad_output(grad_output, input, op)
    _check_stats(input, op, mean=mean)
    return _grad_sums(grad_output, input, mean)


def _grad_sums(grad_output: Tensor, input: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    """sum(dy) and sum(dy * (x - mean)) per channel, in the statistics dtype."""
    acc = mean.dtype
    dy = grad_output.to(acc)
    dims = _reduce_dims(input)
    sum_dy = dy.sum(dim=dims)
    sum_dy_xmu = (dy * (input.to(acc) - mean.reshape(_channel_shape(input)))).sum(dim=dims)
    return sum_dy, sum_dy_xmu


def backward_elemt(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    mean_dy: Tensor,
    mean_dy_xmu: Tensor,
) -> Tensor:
    op = "ckbn::backward_elemt"
    _check_input(input, op)
    _check_grad_output(grad_output, input, op)
    _check_stats(input, op, mean=mean, invstd=invstd, mean_dy=mean_dy, mean_dy_xmu=mean_dy_xmu)
    _check_affine(input, op, weight=weight)
    return _grad_input(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu)


def _grad_input(
    grad_output: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    mean_dy: Optional[Tensor],
    mean_dy_xmu: Optional[Tensor],
) -> Tensor:
    """(dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight; eval mode passes None."""
    shape = _channel_shape(input)
    acc = mean.dtype
    centered_dy = grad_output.to(acc)
    if mean_dy is not None:
        projection = (invstd * invstd * mean_dy_xmu).reshape(shape)
        centered_dy = centered_dy - mean_dy.reshape(shape) - (input.to(acc) - mean.reshape(shape)) * projection
    grad_input = centered_dy * (invstd.reshape(shape) * _per_channel(weight, input, 1.0))
    return grad_input.to(input.dtype).contiguous(memory_format=memory_format(input))


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
    op = "ckbn::backward"
    _check_input(input, op)
    _check_grad_output(grad_output, input, op)
    _check_stats(input, op, mean=mean, invstd=invstd)
    _check_affine(input, op, weight=weight, bias=bias)
    check_activation(activation, activation_param, op)
    need_input, need_weight, need_bias = output_mask
    if activation != "identity":
        # The batch-norm backward of dz = dy * act'(z), z recomputed; dz stays in the statistics
        # dtype, so that half input loses no precision to it.
        z = _pre_activation(input, mean, invstd, weight, bias)
        grad_output = grad_output.to(mean.dtype) * activations.derivative(z, activation, activation_param)
    param_dtype = weight.dtype if weight is not None else mean.dtype

    if train or need_weight or need_bias:
        sum_dy, sum_dy_xmu = _grad_sums(grad_output, input, mean)
    count = input.numel() // input.size(1)

    grad_input = input.new_empty((0,))
    if need_input:
        if train and count > 0:
            grad_input = _grad_input(grad_output, input, mean, invstd, weight, sum_dy / count, sum_dy_xmu / count)
        else:
            grad_input = _grad_input(grad_output, input, mean, invstd, weight, None, None)
    no_grad = mean.new_empty((0,), dtype=param_dtype)
    grad_weight = (sum_dy_xmu * invstd).to(param_dtype) if need_weight else no_grad
    grad_bias = sum_dy.to(param_dtype) if need_bias else no_grad
    return grad_input, grad_weight, grad_bias
