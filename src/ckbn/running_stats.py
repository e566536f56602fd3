"""Training-mode forwards that must not count: :func:`frozen_running_stats`.

SAM's second forward per step, or a consistency-loss pass over the same batch, is a training-mode
forward whose batch statistics should normalize but not be folded into the running statistics a
second time. Setting ``momentum = 0`` does not do it: ``num_batches_tracked`` still counts, and
``momentum=None`` averages anyway.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.nn.modules.batchnorm import _NormBase

from . import surgery

# A per-module nesting count, kept in the instance __dict__ so that it follows the module into
# DataParallel replicas and is gone once the outermost context closes.
_FROZEN = "_ckbn_running_stats_frozen"


def is_frozen(module: torch.nn.Module) -> bool:
    """Whether ``module``'s running statistics are frozen by an open :func:`frozen_running_stats`."""
    return module.__dict__.get(_FROZEN, 0) > 0


@contextlib.contextmanager
def frozen_running_stats(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, training-mode forwards of ``model``'s ckbn BatchNorm layers normalize with
    their batch statistics but update no buffer, ``num_batches_tracked`` included.

    Everything else is unchanged: gradients, eval-mode forwards, and the checkpoint policy (a
    recompute never updates, inside the block or out of it). Contexts nest, over the same model or
    over parts of it. The layers themselves are marked, so the block covers every thread that runs
    them (and DataParallel's replicas). ``model`` must hold no BatchNorm that updates running
    statistics outside ckbn (a TypeError names it): convert it with :func:`ckbn.convert_model` first.
    """
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, _NormBase):  # _NormBase: the fused ckbn.BatchNormAct*d too
            continue
        if surgery.is_ckbn_batch_norm(module):
            layers.append(module)
        elif surgery.keeps_running_stats(module):
            # convert_model's rules: a layer it converts needs converting first; one it cannot, never freezes.
            why_not = surgery.why_not_convertible(module)
            advice = (
                f"ckbn cannot convert it: {why_not}" if why_not else "convert the model with ckbn.convert_model first"
            )
            raise TypeError(
                f"ckbn.frozen_running_stats: {name or 'the model'} is a {type(module).__name__}, whose running "
                f"statistics ckbn cannot freeze; {advice}"
            )
    for module in layers:
        module.__dict__[_FROZEN] = module.__dict__.get(_FROZEN, 0) + 1
    try:
        yield model
    finally:
        for module in layers:
            remaining = module.__dict__[_FROZEN] - 1
            if remaining:
                module.__dict__[_FROZEN] = remaining
            else:
                del module.__dict__[_FROZEN]


__all__ = ["frozen_running_stats", "is_frozen"]
