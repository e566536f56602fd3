"""The autograd Function behind every ckbn module.

Its forward is the normalize op alone: the per-channel statistics arrive as inputs, computed by the
caller or replayed from a record (see :mod:`ckbn.checkpoint`). It saves exactly the input, the weight
and the per-channel mean and invstd (and the bias, when an activation is fused), and its backward
recomputes the normalization from those. It never reads or writes running buffers; that policy
belongs to the module.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._backend import ops


class BatchNormFunction(torch.autograd.Function):
    """y = activation((x - mean) * invstd * weight + bias).

    With ``batch_statistics=True``, ``mean`` and ``invstd`` are taken to be the batch statistics of
    ``input`` (whether just computed or replayed, with ``invstd = 1 / sqrt(var + eps)``), so the
    gradient includes their dependence on the input. With ``False`` they are constants (eval mode
    with running statistics). ``activation`` and ``activation_param`` name a fused activation (see
    :mod:`ckbn.activations`); ``"identity"`` is plain BatchNorm.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        mean: Tensor,
        invstd: Tensor,
        batch_statistics: bool,
        eps: float,
        activation: str,
        activation_param: float,
    ) -> Tensor:
        ctx.batch_statistics = batch_statistics
        ctx.has_bias = bias is not None
        ctx.activation = (activation, activation_param)
        if activation == "identity":
            ctx.save_for_backward(input, weight, mean, invstd)
            return ops.normalize(input, mean, invstd, weight, bias)
        # The backward recomputes the activation's input, which needs the bias too.
        ctx.save_for_backward(input, weight, mean, invstd, bias)
        return ops.normalize(input, mean, invstd, weight, bias, activation, activation_param)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd, *bias = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        output_mask = [needs_input, needs_weight and weight is not None, needs_bias and ctx.has_bias]
        if not any(output_mask):
            return (None,) * 9
        activation, activation_param = ctx.activation
        if activation == "identity":
            grads = ops.backward(grad_output, input, mean, invstd, weight, ctx.batch_statistics, output_mask)
        else:
            grads = ops.backward(
                grad_output, input, mean, invstd, weight, ctx.batch_statistics, output_mask,
                bias[0], activation, activation_param,
            )
        grad_input, grad_weight, grad_bias = grads
        return (
            grad_input if output_mask[0] else None,
            grad_weight if output_mask[1] else None,
            grad_bias if output_mask[2] else None,
        ) + (None,) * 6
