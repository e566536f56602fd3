"""BatchNorm fused with its activation: ``activation(batch_norm(x))`` in one ckbn operator call.

:class:`BatchNormAct2d` and its 1d/3d siblings hold exactly a BatchNorm's parameters and buffers, so
their state_dict is a BatchNorm's (a torch BatchNorm checkpoint loads into them, and theirs into a
torch BatchNorm, with ``strict=True``). The forward is every ckbn BatchNorm's: running statistics are
updated once per training step, never by a checkpoint's recompute, and never by a call that raises.

They deliberately are *not* BatchNorm classes (they subclass torch's ``_NormBase``, not
``_BatchNorm``, ``torch.nn.BatchNorm2d`` or :class:`ckbn.BatchNorm2d`): code that recognises a
BatchNorm by ``isinstance`` treats it as plain, and would silently drop the activation. Conv-BN
folding (``torch.ao.quantization.fuse_modules``, ``torch.fx.experimental.optimization.fuse``),
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, :func:`ckbn.convert_model` and
:meth:`ckbn.SyncBatchNorm.convert_sync_batchnorm` all leave these modules alone instead, so a fused
module keeps computing its activation (with this process's batch statistics).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from . import activations
from .policy import batch_norm_forward


class _BatchNormAct(_NormBase):
    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        activation_param: Optional[float] = None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        # Validated first, so that a bad name fails before any tensor is allocated.
        name, param = activations.canonical(activation, activation_param)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._activation, self._activation_param = name, param

    # Read-only: the pair is validated once, at construction.
    @property
    def activation(self) -> str:
        return self._activation

    @property
    def activation_param(self) -> float:
        return self._activation_param

    def forward(self, input: Tensor) -> Tensor:
        return batch_norm_forward(self, input, activation=self._activation, activation_param=self._activation_param)

    def extra_repr(self) -> str:
        fused = f"activation={self._activation}"
        if self._activation == "leaky_relu":
            fused += f", activation_param={self._activation_param}"
        return f"{super().extra_repr()}, {fused}"


class BatchNormAct1d(_BatchNormAct):
    """``activation(BatchNorm1d(x))`` in one pass; a (N, C) or (N, C, L) input, as torch.nn.BatchNorm1d.

    ``activation`` is one of :data:`ckbn.activations.ACTIVATIONS`; ``activation_param`` is
    leaky_relu's negative slope (default 0.01). The other arguments are torch.nn.BatchNorm1d's.
    """

    _check_input_dim = torch.nn.BatchNorm1d._check_input_dim  # torch's check and words


class BatchNormAct2d(_BatchNormAct):
    """``activation(BatchNorm2d(x))`` in one pass; see :class:`BatchNormAct1d` for the arguments."""

    _check_input_dim = torch.nn.BatchNorm2d._check_input_dim


class BatchNormAct3d(_BatchNormAct):
    """``activation(BatchNorm3d(x))`` in one pass; see :class:`BatchNormAct1d` for the arguments."""

    _check_input_dim = torch.nn.BatchNorm3d._check_input_dim


__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]
