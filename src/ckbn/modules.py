"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d and LazyBatchNorm1d/2d/3d.

Each ckbn module subclasses its torch counterpart, so constructor, parameters, buffers, state_dict
keys, ``isinstance`` checks and ``extra_repr`` are torch's own. Only ``forward`` differs: it is
:func:`ckbn.policy.batch_norm_forward`, whose running statistics are updated once per training
forward (never by a checkpoint's recompute, never under :func:`ckbn.frozen_running_stats`, never by
a call that raises), whose recompute under :func:`ckbn.checkpoint` replays the recorded batch
statistics, and whose arithmetic runs in the ckbn operators (compiled kernels or the reference).
Converting a model is :mod:`ckbn.conversion`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .policy import batch_norm_forward


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


class LazyBatchNorm1d(torch.nn.LazyBatchNorm1d):
    """:class:`torch.nn.LazyBatchNorm1d` that becomes a :class:`ckbn.BatchNorm1d` on its first forward."""

    cls_to_become = BatchNorm1d

    def forward(self, input: Tensor) -> Tensor:  # the first forward runs before the class changes
        return batch_norm_forward(self, input)


class LazyBatchNorm2d(torch.nn.LazyBatchNorm2d):
    """:class:`torch.nn.LazyBatchNorm2d` that becomes a :class:`ckbn.BatchNorm2d` on its first forward."""

    cls_to_become = BatchNorm2d

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_forward(self, input)


class LazyBatchNorm3d(torch.nn.LazyBatchNorm3d):
    """:class:`torch.nn.LazyBatchNorm3d` that becomes a :class:`ckbn.BatchNorm3d` on its first forward."""

    cls_to_become = BatchNorm3d

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_forward(self, input)
