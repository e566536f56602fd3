"""The autograd Function behind every ckbn module.

Its forward is the normalize op alone: the per-channel statistics arrive as inputs, computed by the
caller or replayed from a record (see :mod:`ckbn.checkpoint`). It saves exactly the input, the weight
(and the bias, when a fused activation needs it) and the per-channel mean and invstd, and its
first-order backward is the fused backward op on those. It never reads or writes running buffers;
that policy is :mod:`ckbn.policy`'s.

Every other derivative comes from :func:`batch_norm_composite`, the same computation in torch
operations: a backward run under grad mode (``create_graph=True``, double backward), forward-mode AD
(``jvp``) and the torch.func transforms. Under ``vmap`` the Function's rule is generated from its
forward and backward, whose ops have batching rules (:mod:`ckbn.ops`).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import activations, ops

# torch's words (batch_norm_jvp), for running statistics that carry tangents in eval mode.
_RUNNING_STATS_TANGENT_ERROR = (
    "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad defined"
)


def _channel_shape(input: Tensor) -> Tuple[int, ...]:
    return (1, input.size(1)) + (1,) * (input.dim() - 2)


def batch_norm_composite(
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
    """What :class:`BatchNormFunction` computes, in torch operations: differentiable to any order and
    under every torch.func transform.

    With ``batch_statistics``, ``mean`` and ``invstd`` are recomputed from ``input`` (biased variance,
    ``invstd = rsqrt(var + eps)``), equal to the given ones up to rounding, whether those were just
    computed or replayed by :func:`ckbn.checkpoint`.
    """
    shape = _channel_shape(input)
    x = input.to(mean.dtype)
    if batch_statistics and input.numel() > 0:
        # Recomputed, so that their dependence on the input is torch operations that every autograd
        # and transform level differentiates.
        var, mean = torch.var_mean(x, dim=(0,) + tuple(range(2, input.dim())), correction=0)
        invstd = torch.rsqrt(var + eps)
    z = (x - mean.reshape(shape)) * invstd.reshape(shape)
    if weight is not None:
        z = z * weight.to(mean.dtype).reshape(shape)
    if bias is not None:
        z = z + bias.to(mean.dtype).reshape(shape)
    return activations.apply(z, activation, activation_param).to(input.dtype)


def with_cached_signature(function_class: type) -> type:
    """``function_class``, its ``forward`` given its signature once (``__signature__``).

    ``Function.apply`` binds its arguments to ``forward``'s signature on every call of a Function
    with ``setup_context`` (torch's ``_bind_default_args``), and ``inspect.signature`` builds the
    signature anew each time unless the function carries it: 16 of the 80 microseconds of a small
    BatchNorm2d step on the CPU (forward and backward, 2x8x2x2, torch 2.14, 2026-12-04), where
    such steps are bound by Python, as the late layers on a GPU are."""
    forward = function_class.forward
    forward.__signature__ = inspect.signature(forward)
    return function_class


@with_cached_signature
class BatchNormFunction(torch.autograd.Function):
    """y = activation((x - mean) * invstd * weight + bias).

    ``apply(input, weight, bias, mean, invstd, batch_statistics, eps, activation, activation_param)``.

    With ``batch_statistics=True``, ``mean`` and ``invstd`` are taken to be the batch statistics of
    ``input`` (whether just computed or replayed, with ``invstd = 1 / sqrt(var + eps)``), so every
    derivative includes their dependence on the input, and they get no gradient of their own. With
    ``False`` they are constants (eval mode with running statistics); as in torch, tangents on them
    are an error once the output has a tangent. ``activation`` and ``activation_param`` name a fused
    activation (see :mod:`ckbn.activations`); ``"identity"`` is plain BatchNorm.
    """

    generate_vmap_rule = True

    @classmethod
    def apply(cls, *args, **kwargs):
        # Dynamo traces a Function's apply itself (never this method) and refuses one with a custom
        # jvp: it sees this class, which has none; eager calls get the subclass that adds forward mode.
        if cls is BatchNormFunction and not torch.compiler.is_compiling():
            cls = _BatchNormFunctionWithJvp
        return super(BatchNormFunction, cls).apply(*args, **kwargs)

    @staticmethod
    def forward(
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
        return ops.normalize(input, mean, invstd, weight, bias, activation, activation_param)

    @staticmethod
    def setup_context(ctx: Any, inputs: Sequence, output: Tensor) -> None:
        input, weight, bias, mean, invstd, batch_statistics, eps, activation, activation_param = inputs
        ctx.batch_statistics = batch_statistics
        ctx.eps = eps
        ctx.activation = activation
        ctx.activation_param = activation_param
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # Plain BatchNorm's derivatives do not depend on the bias: it is saved only for an activation.
        saved = (input, weight, bias if activation != "identity" else None, mean, invstd)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)  # the same tensors, so that a generated vmap rule sees one layout
        ctx.set_materialize_grads(False)  # jvp must tell a missing tangent from a zero one

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        if grad_output is None:
            return (None,) * 9
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            return _differentiable_backward(ctx, grad_output)
        input, weight, bias, mean, invstd = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        output_mask = [needs_input, needs_weight and weight is not None, needs_bias and ctx.has_bias]
        if not any(output_mask):
            return (None,) * 9
        grads = ops.backward(
            grad_output,
            input,
            mean,
            invstd,
            weight,
            ctx.batch_statistics,
            output_mask,
            bias,
            ctx.activation,
            ctx.activation_param,
        )
        return tuple(grad if needed else None for grad, needed in zip(grads, output_mask)) + (None,) * 6


class _BatchNormFunctionWithJvp(BatchNormFunction):
    """:class:`BatchNormFunction` with forward-mode AD, for every call not traced by Dynamo."""

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, mean_t, invstd_t, *_):
        stats_have_tangents = mean_t is not None or invstd_t is not None
        if not ctx.batch_statistics and stats_have_tangents:
            if input_t is not None or weight_t is not None or bias_t is not None:
                raise RuntimeError(_RUNNING_STATS_TANGENT_ERROR)
        # In training the statistics follow the input; tangents given to them are not theirs to add.
        # In eval mode torch ignores tangents on the running statistics alone (a zero tangent here).
        primal_tangents = (input_t, weight_t, bias_t)
        primals, rebuild, slots = _differentiable_primals(ctx, primal_tangents)
        if not slots:
            input = ctx.saved_tensors[0]
            return torch.zeros_like(input, memory_format=torch.preserve_format)
        # torch.func.jvp cannot open a dual level inside forward AD's own, so the tangent comes from
        # reverse mode: the vjp is linear in its cotangent; the vjp of that map, at the tangents, is the jvp.
        output, vjp = torch.func.vjp(rebuild, *primals)
        _, transposed_vjp = torch.func.vjp(vjp, torch.zeros_like(output))
        return transposed_vjp(tuple(primal_tangents[i] for i in slots))[0]


def _differentiable_primals(ctx, wanted: Sequence[object]):
    """The saved (input, weight, bias) entries whose ``wanted`` slot is not None, and a function of
    those entries that runs :func:`batch_norm_composite` with the rest fixed.

    Plain BatchNorm does not save its bias; its value does not matter to any derivative, so a zero
    bias stands in for it.
    """
    input, weight, bias, mean, invstd = ctx.saved_tensors
    if bias is None and ctx.has_bias:
        bias = mean.new_zeros(mean.shape, dtype=ctx.bias_dtype)
    fixed = [input, weight, bias]
    slots = [i for i, w in enumerate(wanted) if w is not None and fixed[i] is not None]

    def rebuild(*tensors: Tensor) -> Tensor:
        args = list(fixed)
        for i, tensor in zip(slots, tensors):
            args[i] = tensor
        return batch_norm_composite(
            *args, mean, invstd, ctx.batch_statistics, ctx.eps, ctx.activation, ctx.activation_param
        )

    return tuple(fixed[i] for i in slots), rebuild, slots


def _differentiable_backward(ctx, grad_output: Tensor):
    """Gradients for input, weight and bias as differentiable torch operations (double backward)."""
    wanted = [True if needed else None for needed in ctx.needs_input_grad[:3]]
    primals, rebuild, slots = _differentiable_primals(ctx, wanted)
    grads = [None] * 9
    if slots:
        _, vjp = torch.func.vjp(rebuild, *primals)
        for i, grad in zip(slots, vjp(grad_output)):
            grads[i] = grad
    return tuple(grads)
