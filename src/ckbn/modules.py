"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d.

Each ckbn module subclasses its torch counterpart, so constructor, parameters, buffers, state_dict
keys, ``isinstance`` checks and ``extra_repr`` are torch's own. Only ``forward`` differs:

* the running statistics are updated once per training forward: never by a checkpoint's recompute,
  and never by a call that raises (the update is the last thing a forward does);
* under :func:`ckbn.checkpoint` the recompute replays the recorded batch statistics;
* the arithmetic runs in the ckbn operators (compiled kernels or the reference).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type

import torch
from torch import Tensor

from . import checkpointing
from ._backend import ops
from .function import BatchNormFunction
from .reference import stats_dtype

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _validate(module: torch.nn.modules.batchnorm._BatchNorm, input: Tensor) -> None:
    """Torch's checks, done before anything runs so that a failing call changes no state."""
    module._check_input_dim(input)  # torch's ValueError: "expected 4D input (got 3D input)"
    if input.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(
            f"{type(module).__name__}: expected a floating-point input (float64, float32, float16 or "
            f"bfloat16), but got {input.dtype}"
        )
    for name in ("running_mean", "weight"):
        vec = getattr(module, name)
        if vec is not None and vec.numel() != input.size(1):
            raise RuntimeError(f"{name} should contain {input.size(1)} elements not {vec.numel()}")


class LocalStatistics:
    """Where a training forward's batch statistics come from: this process's batch alone.

    The strategy :func:`batch_norm_forward` consults; SyncBatchNorm's (``ckbn.distributed``) merges
    the statistics of every process instead.
    """

    def check_batch_size(self, input: Tensor) -> None:
        if input.numel() == input.size(1):
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
    _validate(module, input)
    if module.training:
        statistics.check_batch_size(input)
    use_batch_stats = module.training or module.running_mean is None
    if not use_batch_stats:
        acc = stats_dtype(input.dtype)
        mean = module.running_mean.to(acc)
        invstd = torch.rsqrt(module.running_var.to(acc) + module.eps)
        return BatchNormFunction.apply(
            input, module.weight, module.bias, mean, invstd, False, module.eps, activation, activation_param
        )

    # Statistics are inputs of the Function, not part of its graph: its backward differentiates
    # through them analytically, so they are computed on a detached view.
    detached = input.detach()
    count = 0  # per channel, over the whole batch; known only when the statistics are computed

    def compute() -> checkpointing.Stats:
        nonlocal count
        mean, invstd, count = statistics.compute(detached, module.eps)
        return mean, invstd

    if torch.compiler.is_compiling():
        # The compiler traces the forward once and decides recomputation itself; it never reruns
        # the running-statistics update, so no recompute detection is needed (or traceable).
        (mean, invstd), replayed, recompute = compute(), False, False
    else:
        (mean, invstd), replayed = checkpointing.resolve_batch_stats(compute, input.size(1), input.device)
        recompute = replayed or checkpointing.in_backward_pass()

    output = statistics.normalize(
        input, module.weight, module.bias, mean, invstd, module.eps, activation, activation_param
    )

    if module.training and module.track_running_stats and not recompute and count > 0:
        ops.update_running_stats(
            module.running_mean,
            module.running_var,
            module.num_batches_tracked,
            mean,
            invstd,
            module.momentum,
            module.eps,
            count,
        )
    return output


class BatchNorm1d(torch.nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with checkpoint-exact running statistics and fused kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_forward(self, input)


class BatchNorm2d(torch.nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with checkpoint-exact running statistics and fused kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_forward(self, input)


class BatchNorm3d(torch.nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with checkpoint-exact running statistics and fused kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_forward(self, input)


_CONVERSIONS: Dict[Type[torch.nn.Module], Type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _transplant(source: torch.nn.modules.batchnorm._BatchNorm, target_cls: Type, **kwargs) -> torch.nn.Module:
    """A ``target_cls`` sharing ``source``'s parameters and buffers (the same tensors, so an
    optimizer built on the old model keeps working) and its training flag. ``kwargs`` go to the
    ``target_cls`` constructor."""
    target = target_cls(
        source.num_features,
        eps=source.eps,
        momentum=source.momentum,
        affine=source.affine,
        track_running_stats=source.track_running_stats,
        device="meta",
        **kwargs,
    )
    with torch.no_grad():
        for name, param in source.named_parameters(recurse=False):
            setattr(target, name, param)  # the same Parameter: requires_grad comes along
        for name, buf in source.named_buffers(recurse=False):
            target.register_buffer(name, buf, persistent=name not in source._non_persistent_buffers_set)
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target


def _replace_modules(module: torch.nn.Module, replacement: Callable[[torch.nn.Module], Optional[torch.nn.Module]]):
    """``module`` with every submodule for which ``replacement`` returns a module replaced by it,
    recursively; a new object when ``module`` itself is replaced."""
    replaced = replacement(module)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        converted = _replace_modules(child, replacement)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_model(module: torch.nn.Module, fuse_activations: bool = False) -> torch.nn.Module:
    """Replace every torch BatchNorm1d/2d/3d in ``module`` with its ckbn equivalent, recursively.

    With ``fuse_activations=True``, first :func:`ckbn.fuse` each BatchNorm whose only consumer is an
    activation into one ``ckbn.BatchNormAct*d`` module, then convert the rest.

    Parameters and buffers are shared, not copied, and ``requires_grad`` and the training flag are
    kept. Returns the converted module (a new object when ``module`` itself is a BatchNorm), like
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`.
    """

    if fuse_activations:
        from .fusion import fuse  # fusion builds on this module

        module = fuse(module)

    def replacement(child: torch.nn.Module) -> Optional[torch.nn.Module]:
        target_cls = _CONVERSIONS.get(type(child))
        return _transplant(child, target_cls) if target_cls is not None else None

    return _replace_modules(module, replacement)
