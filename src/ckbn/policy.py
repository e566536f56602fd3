"""The policy every ckbn BatchNorm follows, shared by the module classes, SyncBatchNorm, the fused
BatchNorm + activation modules and :func:`ckbn.functional.batch_norm`:

* torch.nn.functional.batch_norm's checks, in its order and words, before anything runs, so that a
  call that raises changes no state;
* in training, the batch statistics come from a :class:`LocalStatistics` (this process's batch;
  SyncBatchNorm's merges every rank's), or are replayed by :func:`ckbn.checkpoint`'s recompute;
* the running statistics are updated once per training forward: never by a checkpoint's
  recompute, never under :func:`ckbn.frozen_running_stats`, never by an empty batch, and never by a
  call that raises (the update is the last thing a forward does).

The arithmetic is the operators' (:mod:`ckbn.ops`) and the derivatives the autograd Function's
(:mod:`ckbn.autograd`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checkpointing, ops, running_stats
from .autograd import BatchNormFunction
from .reference import stats_dtype

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class LocalStatistics:
    """Where a training forward's batch statistics come from: this process's batch alone.

    The strategy :func:`run_batch_norm` consults; SyncBatchNorm's (``ckbn.distributed``) merges the
    statistics of every process instead.
    """

    def check_batch_size(self, input: Tensor) -> None:
        if input.size(0) * math.prod(input.shape[2:]) == 1:
            # torch's own wording (torch.nn.functional._verify_batch_size).
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")

    def compute(self, input: Tensor, eps: float) -> Tuple[Tensor, Tensor, int]:
        """(mean, invstd, count) of a fresh (non-replayed) training forward; count is per channel."""
        mean, invstd = ops.batch_stats(input, eps)
        return mean, invstd, input.numel() // input.size(1)

    def normalize(
        self,
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        mean: Tensor,
        invstd: Tensor,
        eps: float,
        activation: str = "identity",
        activation_param: float = 0.0,
    ) -> Tensor:
        return BatchNormFunction.apply(input, weight, bias, mean, invstd, True, eps, activation, activation_param)


LOCAL_STATISTICS = LocalStatistics()


def _torch_allows_eps_zero_in_eval() -> bool:
    """Which eps rule the installed torch's F.batch_norm applies, so that ckbn's errors are its own:
    torch 2.10 and 2.11 want eps > 0 in every mode, later releases only in training."""
    try:
        F.batch_norm(torch.zeros(2, 1), torch.zeros(1), torch.ones(1), training=False, eps=0.0)
    except ValueError:
        return False
    return True


_EPS_ZERO_IN_EVAL = _torch_allows_eps_zero_in_eval()


def _check_eps(eps: float, training: bool) -> None:
    """torch.nn.functional.batch_norm's eps check, in its words."""
    if not _EPS_ZERO_IN_EVAL:
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
    elif training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_arguments(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    eps: float,
    statistics: LocalStatistics,
) -> None:
    """torch.nn.functional.batch_norm's checks, in its order and words, done before anything runs so
    that a failing call changes no state."""
    if input.dim() < 2:
        raise RuntimeError(
            f"batch_norm: expected input with at least 2 dimensions (N, C, *), but got {input.dim()}D input"
        )
    if training:
        statistics.check_batch_size(input)
    _check_eps(eps, training)
    if not training:
        for name, buffer in (("running_mean", running_mean), ("running_var", running_var)):
            if buffer is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    channels = input.size(1)
    for name, vec in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if vec is None:
            continue
        if vec.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {vec.numel()}")
        if vec.dim() != 1:
            raise RuntimeError(f"{name} should be a 1-D tensor of {channels} elements, but got shape {list(vec.shape)}")
        if vec.device != input.device:
            raise RuntimeError(f"Tensor on device {vec.device} is not on the expected device {input.device}!")
    if input.dtype not in _FLOAT_DTYPES:
        # torch's exception type; its message names the dtype as "Long", ckbn's as torch.int64.
        raise NotImplementedError(
            f'"batch_norm" not implemented for {input.dtype}: expected a floating-point input (float64, float32, '
            "float16 or bfloat16)"
        )


def run_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
    frozen: bool = False,
    statistics: LocalStatistics = LOCAL_STATISTICS,
    activation: str = "identity",
    activation_param: float = 0.0,
) -> Tensor:
    """torch.nn.functional.batch_norm's semantics with ckbn's running-statistics policy.

    The policy every ckbn module and :func:`ckbn.functional.batch_norm` share: with ``training``,
    the batch statistics (from ``statistics``, or replayed by :func:`ckbn.checkpoint`) normalize,
    and the running buffers, when given, are updated once per forward: never by a checkpoint's
    recompute, never while ``frozen``, never by an empty batch, and never by a call that raises (the
    update is the last thing it does). ``momentum=None`` is the cumulative average, counted in
    ``num_batches_tracked``. ``activation`` (a name from :mod:`ckbn.activations`) is applied in the
    same kernel.
    """
    _check_arguments(input, running_mean, running_var, weight, bias, training, eps, statistics)
    if not training:
        acc = stats_dtype(input.dtype)
        mean = running_mean.to(acc)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        return BatchNormFunction.apply(input, weight, bias, mean, invstd, False, eps, activation, activation_param)

    # Statistics are inputs of the Function, not part of its graph: its backward differentiates
    # through them analytically, so they are computed on a detached view.
    detached = input.detach()
    count = 0  # per channel, over the whole batch; known only when the statistics are computed

    def compute() -> checkpointing.Stats:
        nonlocal count
        mean, invstd, count = statistics.compute(detached, eps)
        return mean, invstd

    if torch.compiler.is_compiling():
        # The compiler traces the forward once and decides recomputation itself; it never reruns
        # the running-statistics update, so no recompute detection is needed (or traceable).
        (mean, invstd), replayed, recompute = compute(), False, False
    else:
        (mean, invstd), replayed = checkpointing.resolve_batch_stats(compute, input.size(1), input.device)
        recompute = replayed or checkpointing.in_backward_pass()

    output = statistics.normalize(input, weight, bias, mean, invstd, eps, activation, activation_param)

    if running_mean is not None and not frozen and not recompute and count > 0:
        if num_batches_tracked is None:  # the functional form keeps no count; momentum is then a float
            num_batches_tracked = torch.zeros((), dtype=torch.long, device=mean.device)
        ops.update_running_stats(running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count)
    return output


def batch_norm_forward(
    module: torch.nn.modules.batchnorm._BatchNorm,
    input: Tensor,
    statistics: LocalStatistics = LOCAL_STATISTICS,
    activation: str = "identity",
    activation_param: float = 0.0,
) -> Tensor:
    """The forward of every ckbn BatchNorm module; ``statistics`` supplies the batch statistics.

    ``activation`` (a name from :mod:`ckbn.activations`) is applied in the same kernel.
    """
    module._check_input_dim(input)  # torch's ValueError: "expected 4D input (got 3D input)"
    # As torch's _BatchNorm.forward: batch statistics in training mode, and in eval mode without
    # running statistics; the buffers are updated in training mode only if they are tracked.
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    buffers_in_use = not module.training or module.track_running_stats
    momentum = module.momentum
    if momentum is None and module.num_batches_tracked is None:
        momentum = 0.0  # as torch: without a counter the cumulative average leaves the buffers alone
    return run_batch_norm(
        input,
        module.running_mean if buffers_in_use else None,
        module.running_var if buffers_in_use else None,
        module.weight,
        module.bias,
        use_batch_stats,
        momentum,
        module.eps,
        num_batches_tracked=module.num_batches_tracked,
        frozen=running_stats.is_frozen(module),
        statistics=statistics,
        activation=activation,
        activation_param=activation_param,
    )


class BatchNormForward:
    """ckbn's BatchNorm forward for one layer whose class is another library's BatchNorm subclass
    with torch's own forward: :func:`ckbn.convert_model` sets it as the instance's ``forward``, so the
    layer keeps its class, methods, attributes and input check.

    A class rather than a bound method, so that the layer still deep-copies and pickles.
    """

    is_ckbn_forward = True  # what ckbn.surgery.is_ckbn_batch_norm looks for

    def __init__(self, module: torch.nn.modules.batchnorm._BatchNorm) -> None:
        self.module = module

    def __call__(self, input: Tensor) -> Tensor:
        return batch_norm_forward(self.module, input)
