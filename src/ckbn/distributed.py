"""SyncBatchNorm: BatchNorm whose batch statistics span every process of a torch.distributed group.

A training forward in a group of more than one rank:

* **forward**: each rank summarises its batch per channel as (count, mean, biased variance) with the
  ``batch_stats`` op; one ``all_gather`` of a fixed-size frame carries them, and every rank merges
  them with Chan's formula into the same global mean and invstd. Counts are part of the merge, so
  uneven batches, and a rank with an empty batch, give the statistics of the concatenated batch.
* **backward**: ``backward_reduce`` gives each rank's (sum dy, sum dy·(x−mean)); one ``all_reduce``
  sums them, with the counts, and ``backward_elemt`` finishes grad_input for the global batch.

The statistics go through :func:`ckbn.checkpointing.resolve_batch_stats` like BatchNorm's, so under
:func:`ckbn.checkpoint` the recompute replays them and runs no collective, and the running
statistics are updated once, by the real forward, identically on every rank.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import modules, ops, policy, surgery
from .autograd import with_cached_signature
from .reference import stats_dtype

# The forward's first all_gather sends this frame whatever C is: a header (C, count), then mean and
# variance for up to _FRAME_CHANNELS channels. Ranks that disagree on C thus still run collectives of
# one size and all see the disagreement; a larger C sends its remaining channels in a second all_gather.
_HEADER = 3
_FRAME_CHANNELS = 2048
_FRAME_SIZE = _HEADER + 2 * _FRAME_CHANNELS
# The count travels as two words below 2**24, which float32 holds exactly.
_COUNT_WORD = 2**24


def all_gather_rows(values: Tensor, group) -> Tensor:
    """Every rank's ``values`` (1-D), as rows of a [world_size, values.numel()] tensor in rank order."""
    world_size = dist.get_world_size(group)
    gathered = values.new_empty(world_size * values.numel())
    # all_gather_single is newer torch's name for all_gather_into_tensor, which there warns.
    all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather_single(gathered, values.contiguous(), group=group)
    return gathered.view(world_size, -1)


def global_batch_stats(input: Tensor, eps: float, group) -> Tuple[Tensor, Tensor, int]:
    """(mean, invstd, count) of the batch formed by every rank's ``input`` in ``group``.

    mean and invstd are in the statistics dtype of ``input``; count is the global number of values
    per channel. Every rank of ``group`` must call this with the same C; if they do not, every rank
    raises after the first collective.
    """
    channels = input.size(1)
    count = input.numel() // channels
    acc = stats_dtype(input.dtype)
    frame = input.new_zeros(max(_FRAME_SIZE, _HEADER + 2 * channels), dtype=acc)
    frame[0] = channels
    frame[1] = count // _COUNT_WORD
    frame[2] = count % _COUNT_WORD
    if count > 0:
        # eps=0: the biased variance then comes back from invstd to a few ulp, even far below eps.
        mean, invstd = ops.batch_stats(input, 0.0)
        frame[_HEADER : _HEADER + channels] = mean
        frame[_HEADER + channels : _HEADER + 2 * channels] = invstd.double().pow(-2)

    gathered = all_gather_rows(frame[:_FRAME_SIZE], group)
    # The header must reach the host, to raise on a channel mismatch before another collective and to
    # give update_running_stats its int count: on CUDA this is the forward's one host synchronisation.
    header = [[int(word) for word in row] for row in gathered[:, :_HEADER].tolist()]
    rank_channels = [c for c, _, _ in header]
    if any(c != channels for c in rank_channels):
        raise RuntimeError(
            "SyncBatchNorm: the ranks of the process group disagree on the number of channels "
            f"(input.size(1) by rank: {rank_channels}); every rank must run the same layer on input "
            "with the same number of channels"
        )
    if frame.numel() > _FRAME_SIZE:
        gathered = torch.cat([gathered, all_gather_rows(frame[_FRAME_SIZE:], group)], dim=1)

    total = sum(high * _COUNT_WORD + low for _, high, low in header)
    if total == 1:
        # torch's wording, about the batch that matters: the one spread over the group.
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()} on this "
            f"rank and 1 value per channel over the {len(header)} ranks of the process group"
        )
    if total == 0:
        zeros = input.new_zeros(channels, dtype=acc)
        return zeros, torch.rsqrt(zeros + eps), 0

    rows = gathered[:, : _HEADER + 2 * channels].double()  # the merge runs in float64
    counts = rows[:, 1:2] * _COUNT_WORD + rows[:, 2:3]
    means = rows[:, _HEADER : _HEADER + channels]
    variances = rows[:, _HEADER + channels :]
    mean = (counts * means).sum(0) / total
    # Chan et al.: M2 = sum over ranks of (M2_r + n_r * (mean_r - mean)^2), with M2_r = n_r * var_r.
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    return mean.to(acc), torch.rsqrt(var + eps).to(acc), total


@with_cached_signature
class SyncBatchNormFunction(torch.autograd.Function):
    """:class:`~ckbn.BatchNormFunction` with batch statistics of the whole ``group``.

    It saves the same tensors (input, weight, mean, invstd). Its backward sums the two per-channel
    reductions over the group, so grad_input is exact for the global batch; grad_weight and grad_bias
    are this rank's share, as torch's SyncBatchNorm gives them (DDP all-reduces parameter gradients).
    Like torch's SyncBatchNorm it has first-order reverse-mode gradients only: a collective per
    derivative would be needed for more.
    """

    @staticmethod
    def forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean, invstd, eps, group) -> Tensor:
        return ops.normalize(input, mean, invstd, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, weight, bias, mean, invstd, _, group = inputs
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, mean, invstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd = ctx.saved_tensors
        needs_input = ctx.needs_input_grad[0]
        needs_weight = ctx.needs_input_grad[1] and weight is not None
        needs_bias = ctx.needs_input_grad[2] and ctx.has_bias
        grad_input = grad_weight = grad_bias = None
        if not (needs_input or needs_weight or needs_bias):
            return (None,) * 7

        sum_dy, sum_dy_xmu = ops.backward_reduce(grad_output, input, mean)
        if needs_weight:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if needs_bias:
            grad_bias = sum_dy.to(weight.dtype)  # a bias comes with a weight (affine)
        if needs_input:
            channels = input.size(1)
            # The counts travel with the sums: a replayed recompute has no forward count to offer.
            local_count = sum_dy.new_full((1,), input.numel() // channels)
            sums = torch.cat([sum_dy, sum_dy_xmu, local_count])
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xmu = (sums[: 2 * channels] / sums[2 * channels]).split(channels)
            grad_input = ops.backward_elemt(grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xmu)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncStatistics(policy.LocalStatistics):
    """The batch statistics of every rank in ``group``, for :func:`ckbn.policy.batch_norm_forward`."""

    def __init__(self, group) -> None:
        self.group = group

    def check_batch_size(self, input: Tensor) -> None:
        """Nothing to check locally: one value per channel on a rank is fine; the global count is
        checked after the gather."""

    def compute(self, input: Tensor, eps: float) -> Tuple[Tensor, Tensor, int]:
        return global_batch_stats(input, eps, self.group)

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
        if activation != "identity":
            raise NotImplementedError("SyncBatchNorm fuses no activation")
        return SyncBatchNormFunction.apply(input, weight, bias, mean, invstd, eps, self.group)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """:class:`torch.nn.SyncBatchNorm` on the ckbn operators, exact under checkpointing, on any device.

    Constructor, parameters, buffers and state_dict are torch's. In training mode, in a process group
    of more than one rank, the batch statistics are those of every rank's batch together: one
    collective in the forward, one in the backward, none in a :func:`ckbn.checkpoint` recompute, and
    the running statistics updated once per step, identically on every rank. Without an initialised
    process group, with a group of one rank, and in eval mode it is ckbn's BatchNorm and runs no
    collective. It works with any torch.distributed backend: NCCL for CUDA tensors, gloo for CPU ones.

    It is not a subclass of torch.nn.SyncBatchNorm: DistributedDataParallel refuses those on CPU.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")  # torch's words

    def forward(self, input: Tensor) -> Tensor:
        group = self._sync_group()
        statistics = policy.LOCAL_STATISTICS if group is None else SyncStatistics(group)
        return policy.batch_norm_forward(self, input, statistics)

    def _sync_group(self):
        """The process group whose batches this forward normalizes over, or None for this rank's own.

        As in torch's SyncBatchNorm, only a training forward synchronises (in eval mode without running
        statistics each rank uses its own batch).
        """
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Replace every torch or ckbn BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` with a ckbn
        SyncBatchNorm on ``process_group`` (None: the default group), recursively.

        Parameters and buffers are shared, not copied, and the training flag is kept, as in
        :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. Returns the converted module.
        """

        def replacement(child: torch.nn.Module) -> Optional[torch.nn.Module]:
            if type(child) in _CONVERTIBLE:
                return surgery.transplant(child, cls, process_group=process_group)
            return None

        return surgery.replace_modules(module, replacement)


_CONVERTIBLE = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    modules.BatchNorm1d,
    modules.BatchNorm2d,
    modules.BatchNorm3d,
    SyncBatchNorm,
)
