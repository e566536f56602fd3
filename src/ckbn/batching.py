"""Batching rules for the ckbn operators, so that ``torch.vmap`` (and every torch.func transform
built on it, such as ``jacrev``) runs them without torch's slow per-sample fallback.

A BatchNorm of each sample of a vmapped batch is a BatchNorm whose channels are the samples'
channels side by side: the vmapped dimension is folded into the channel dimension, the op runs once
on ``(N, B*C, *)``, and its results are unfolded. This is what functorch does for torch's own
batch_norm. The update of running statistics is the exception: each sample's buffers are updated
in turn, as its own ``num_batches_tracked`` may differ.

Only the compiled extension needs these: the reference backend's ops are torch operations, which
vmap batches by itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._backend import ops


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


def batch_stats_rule(info, in_dims, input, eps):
    mean, invstd = ops.batch_stats(_fold_input(input, in_dims[0], info.batch_size), eps)
    return (_unfold_channels(mean, info.batch_size), _unfold_channels(invstd, info.batch_size)), (0, 0)


def normalize_rule(info, in_dims, input, mean, invstd, weight, bias, *activation):
    B = info.batch_size
    output = ops.normalize(
        _fold_input(input, in_dims[0], B),
        *(_fold_channels(vector, bdim, B) for vector, bdim in zip((mean, invstd, weight, bias), in_dims[1:5])),
        *activation,
    )
    return _unfold_input(output, B), 1


def backward_rule(info, in_dims, grad_output, input, mean, invstd, weight, train, output_mask, *fused):
    B = info.batch_size
    if fused:  # bias, activation, activation_param (the fused-activation form of the op)
        fused = (_fold_channels(fused[0], in_dims[7], B),) + tuple(fused[1:])
    grad_input, grad_weight, grad_bias = ops.backward(
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


def backward_reduce_rule(info, in_dims, grad_output, input, mean):
    B = info.batch_size
    sum_dy, sum_dy_xmu = ops.backward_reduce(
        _fold_input(grad_output, in_dims[0], B), _fold_input(input, in_dims[1], B), _fold_channels(mean, in_dims[2], B)
    )
    return (_unfold_channels(sum_dy, B), _unfold_channels(sum_dy_xmu, B)), (0, 0)


def backward_elemt_rule(info, in_dims, grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
    B = info.batch_size
    vectors = (mean, invstd, weight, mean_dy, mean_dy_xmu)
    grad_input = ops.backward_elemt(
        _fold_input(grad_output, in_dims[0], B),
        _fold_input(input, in_dims[1], B),
        *(_fold_channels(vector, bdim, B) for vector, bdim in zip(vectors, in_dims[2:])),
    )
    return _unfold_input(grad_input, B), 1


def update_running_stats_rule(
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
    args = (running_mean, running_var, num_batches_tracked, mean, invstd)
    for b in range(info.batch_size):
        sample = [arg if bdim is None else arg.select(bdim, b) for arg, bdim in zip(args, in_dims)]
        ops.update_running_stats(*sample, momentum, eps, count)  # in place, through the views
    return None, None


RULES = {
    "batch_stats": batch_stats_rule,
    "normalize": normalize_rule,
    "backward": backward_rule,
    "backward_reduce": backward_reduce_rule,
    "backward_elemt": backward_elemt_rule,
    "update_running_stats": update_running_stats_rule,
}


def register() -> None:
    """Register every rule with torch.library (the compiled extension's ops only)."""
    for name, rule in RULES.items():
        torch.library.register_vmap(f"ckbn::{name}", rule)


if _backend.extension_loaded:
    register()  # once, when ckbn imports this module
