"""ckbn: BatchNorm whose running statistics stay exact under activation checkpointing.

    import ckbn
    model = ckbn.convert_model(model)            # or build with ckbn.BatchNorm2d directly
    model = ckbn.convert_model(model, fuse_activations=True)  # also fuse BatchNorm + activation pairs
    y = ckbn.checkpoint(block, x)                # recompute replays BatchNorm statistics
    y = ckbn.functional.batch_norm(x, running_mean, running_var, training=True)
    with ckbn.frozen_running_stats(model):       # e.g. SAM's second forward: counts nothing
        loss = criterion(model(x), target)
    model = ckbn.SyncBatchNorm.convert_sync_batchnorm(model)  # DDP: statistics over every rank

See README.md for the backends and environment variables.
"""

from . import functional, ops
from .autograd import BatchNormFunction
from .block_checkpointing import CheckpointingReport, apply_checkpointing
from .checkpointing import checkpoint, checkpoint_sequential, update_running_stats_in_backward
from .conversion import ConversionReport, convert_model
from .distributed import SyncBatchNorm
from .fusion import FusionReport, fuse
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .norm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .ops import cuda_compiled
from .recalibration import recalibrate
from .running_stats import frozen_running_stats

__version__ = "0.1.0"


def backend() -> str:
    """The implementation behind the ckbn operators: "extension" (compiled) or "reference"."""
    return ops.BACKEND


__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "FusionReport",
    "BatchNormFunction",
    "ConversionReport",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "CheckpointingReport",
    "apply_checkpointing",
    "backend",
    "checkpoint",
    "checkpoint_sequential",
    "convert_model",
    "cuda_compiled",
    "frozen_running_stats",
    "functional",
    "fuse",
    "recalibrate",
    "update_running_stats_in_backward",
]
